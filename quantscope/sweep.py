"""Studies: a grid of models x formats x texts, written as a TOML file, measured resumably.

A study file::

    name = "smollm2-4bit"              # run directory name under the runs root
    models = ["default"]               # model references (as for --model)
    formats = ["bf16", "int8", "int4-g128", "nf4"]
    texts = ["python-docs"]            # text references (as for --text)
    tasks = ["arc-easy", "piqa"]       # optional: task accuracy, carried in each record's `tasks`
    ctx = 512
    windows = 16
    score_second_half = false          # optional

`run_study` walks the grid in a fixed order and, for every cell not already in the run's store,
calls the injected `measure_fn(model, format, eval_spec) -> record` and commits the record before
moving on, so a killed sweep resumes where it stopped and never measures a cell twice. A caller that
measures several cells at once (on a Ray cluster: :mod:`quantscope.sweep_measure`) passes
`measure_all`, which yields each finished cell in whatever order they finish: each is committed as
it arrives, under the same key, so a study run partly one way and partly the other has one set of
records. The measurement itself (worker processes, baselines) belongs to the caller: this module
only decides what is left to do and keeps what is done.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from quantscope import __version__
from quantscope.errors import QuantscopeError
from quantscope.fileio import sha256_file
from quantscope.results.record import Record
from quantscope.results.db import DEFAULT_RUNS_ROOT
from quantscope.results.keys import record_key
from quantscope.results.store import RunStore

MeasureFn = Callable[[str, str, dict], Record]
# progress(done_index, total, model, format, text, skipped): called after each grid cell.
ProgressFn = Callable[[int, int, str, str, str, bool], None]


@dataclass(frozen=True)
class Study:
    """A reproducible comparison: every model x format x text, each scored on the same protocol."""

    name: str  # the run directory's name: re-running the same study resumes it
    formats: tuple[str, ...]  # format names, measured in this order
    windows: int  # windows scored per text: the main cost knob, so no silent default
    models: tuple[str, ...] = ("default",)
    texts: tuple[str, ...] = ("python-docs",)
    tasks: tuple[str, ...] = ()  # evaluated with every (model, format, text) cell, stored in `tasks`
    ctx: int = 512  # tokens per window
    score_second_half: bool = False  # llama.cpp's convention: score only each window's second half

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name in (".", ".."):
            raise QuantscopeError(f"study name {self.name!r} must be a plain directory name")
        for field_name in ("models", "formats", "texts"):
            if not getattr(self, field_name):
                raise QuantscopeError(f"study '{self.name}': `{field_name}` must list at least one entry")
        for field_name in ("models", "formats", "texts", "tasks"):
            values = getattr(self, field_name)
            duplicates = sorted({v for v in values if values.count(v) > 1})
            if duplicates:
                raise QuantscopeError(f"study '{self.name}': `{field_name}` repeats {', '.join(duplicates)}")
        if self.ctx < 2:
            raise QuantscopeError(f"study '{self.name}': ctx must be >= 2, got {self.ctx}")
        if self.windows < 1:
            raise QuantscopeError(f"study '{self.name}': windows must be >= 1, got {self.windows}")

    @property
    def size(self) -> int:
        return len(self.models) * len(self.formats) * len(self.texts)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


_LIST_FIELDS = ("models", "formats", "texts", "tasks")
_TYPES: dict[str, type] = {"name": str, "ctx": int, "windows": int, "score_second_half": bool}


def study_from_dict(data: dict[str, Any], source: str = "<study>") -> Study:
    """Validate a parsed study table; errors name the source file and the offending key."""
    known = [f.name for f in dataclasses.fields(Study)]
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" — did you mean '{close[0]}'?" if close else f" (known keys: {', '.join(known)})"
            raise QuantscopeError(f"{source}: unknown key '{key}'{hint}")
    for key in ("name", "formats", "windows"):
        if key not in data:
            raise QuantscopeError(f"{source}: missing required key '{key}'")
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key in _LIST_FIELDS:
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                raise QuantscopeError(f"{source}: '{key}' must be a list of non-empty strings, got {value!r}")
            values[key] = tuple(value)
        else:
            expected = _TYPES[key]
            # bool is an int in Python; a study saying `ctx = true` is a mistake.
            if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
                raise QuantscopeError(f"{source}: '{key}' must be {expected.__name__}, got {value!r}")
            values[key] = value
    try:
        return Study(**values)
    except QuantscopeError as e:
        raise QuantscopeError(f"{source}: {e}") from e


def load_study(path: str | os.PathLike) -> Study:
    """Read a study TOML file."""
    path = Path(path)
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        try:
            import tomli as tomllib
        except ImportError as e:
            raise QuantscopeError("reading study files on Python 3.10 needs tomli: pip install tomli") from e
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError as e:
        raise QuantscopeError(f"study file not found: {path}") from e
    except tomllib.TOMLDecodeError as e:
        raise QuantscopeError(f"{path}: invalid TOML: {e}") from e
    return study_from_dict(data, source=str(path))


def text_fingerprint(text_ref: str) -> str:
    """sha256 of a text's content: a file's bytes, or a built-in text as loaded by `load_text`."""
    path = Path(text_ref)
    if path.is_file():
        return sha256_file(path)
    from quantscope.evaluate.text import load_text

    return load_text(text_ref).sha256


def model_fingerprint(model_ref: str) -> str:
    """A cheap identity for a model reference: the reference plus, for local files, names/sizes/mtimes.

    Hashing gigabytes of weights on every resume would cost more than some measurements; a file that
    changes keeps neither its size nor its mtime in practice. Callers that know a stronger identity
    (e.g. a Hub commit hash) pass their own `fingerprint_fn`.
    """
    h = hashlib.sha256(f"ref:{model_ref}\n".encode())
    path = Path(model_ref)
    if path.is_file():
        files = [(path.name, path)]
    elif path.is_dir():
        files = [(str(p.relative_to(path)), p) for p in sorted(path.rglob("*")) if p.is_file()]
    else:  # a Hub id or "default": the reference is all we know without loading it
        files = []
    for name, p in files:
        st = p.stat()
        h.update(f"{name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def eval_spec_for(study: Study, text_ref: str, text_sha256: str) -> dict[str, Any]:
    """What defines the numbers of one cell apart from model and format (part of the record key)."""
    return {
        "text": text_ref,
        "text_sha256": text_sha256,
        "ctx": study.ctx,
        "windows": study.windows,
        "tasks": sorted(study.tasks),
        "score_second_half": study.score_second_half,
    }


@dataclass(frozen=True)
class Cell:
    """One cell of a study's grid: what to measure and the key its record is stored under."""

    index: int  # 1-based position in grid order
    model: str
    text: str
    format: str
    spec: dict  # eval_spec_for(...): the evaluation apart from model and format
    key: str


# measure_all(cells) measures the cells still to do and yields (cell, record) as each is finished,
# in any order (a Ray cluster finishes them as they come); run_study commits each one as it arrives.
MeasureAll = Callable[[list[Cell]], Iterable[tuple[Cell, Record]]]


@dataclass(frozen=True)
class SweepOutcome:
    run_dir: Path
    measured: int  # cells measured by this call
    skipped: int  # cells already in the store
    records: list[Record]  # every record of the study, in grid order


def study_cells(study: Study, model_fps: dict[str, str], text_fps: dict[str, str],
                version: str = __version__) -> list[Cell]:
    """The grid in its fixed order (model, then text, then format), each cell with its record key."""
    cells = []
    for model in study.models:
        for text in study.texts:
            spec = eval_spec_for(study, text, text_fps[text])
            for fmt in study.formats:
                key = record_key(model_fps[model], fmt, spec, version)
                cells.append(Cell(len(cells) + 1, model, text, fmt, spec, key))
    return cells


def run_study(
    study: Study,
    out_dir: str | os.PathLike | None,
    measure_fn: MeasureFn,
    *,
    fingerprint_fn: Callable[[str], str] = model_fingerprint,
    text_hash_fn: Callable[[str], str] = text_fingerprint,
    retry_errors: bool = False,
    progress: ProgressFn | None = None,
    version: str = __version__,
    measure_all: MeasureAll | None = None,
) -> SweepOutcome:
    """Measure every cell of `study` not yet stored in `out_dir` (default: quantscope-runs/<name>).

    Each record is committed as soon as `measure_fn` returns it (or `measure_all` yields it: cells
    measured elsewhere, several at a time). Records with an `error` (skipped formats) count as done
    unless `retry_errors`. Exceptions from the measurement propagate; what was committed before
    stays, and re-running resumes.
    """
    run_dir = Path(out_dir) if out_dir is not None else DEFAULT_RUNS_ROOT / study.name
    model_fps = {m: fingerprint_fn(m) for m in study.models}
    text_fps = {t: text_hash_fn(t) for t in study.texts}
    measured = skipped = 0
    with RunStore.open(run_dir, {"study": study.to_dict(), "quantscope_version": version}) as store:
        cells = study_cells(study, model_fps, text_fps, version)
        done: dict[str, Record] = {}
        for cell in cells:
            record = store.get(cell.key)
            if record is not None and not (retry_errors and record.get("error")):
                done[cell.key] = record
        todo = [c for c in cells if c.key not in done]
        todo_keys = {c.key for c in todo}

        def commit(cell: Cell, record: Record) -> None:
            nonlocal measured
            record = dict(record)
            record.setdefault("format", cell.format)
            record.setdefault("model", cell.model)
            record.setdefault("text", cell.text)
            record.setdefault("ctx", study.ctx)
            record.setdefault("windows", study.windows)
            record["text_sha256"] = text_fps[cell.text]
            record["model_fingerprint"] = model_fps[cell.model]
            store.put(cell.key, record)
            done[cell.key] = record
            measured += 1
            if progress is not None:
                progress(cell.index, study.size, cell.model, cell.format, cell.text, False)

        for cell in cells:  # in grid order; one at a time unless measure_all takes them together
            if cell.key not in todo_keys:
                skipped += 1
                if progress is not None:
                    progress(cell.index, study.size, cell.model, cell.format, cell.text, True)
            elif measure_all is None:
                commit(cell, measure_fn(cell.model, cell.format, dict(cell.spec)))
        if measure_all is not None and todo:
            for cell, record in measure_all(todo):
                commit(cell, record)
        missing = [c.format for c in cells if c.key not in done]
        if missing:
            raise QuantscopeError(f"internal: the sweep ended without records for {', '.join(missing)}")
    return SweepOutcome(run_dir=run_dir, measured=measured, skipped=skipped,
                        records=[done[c.key] for c in cells])
