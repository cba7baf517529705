"""One quantize entry point: a format name resolved once into a :class:`Format`, one handler per kind.

    fmt = resolve("gptq-int4-g128")          # Format(kind="calibrated", ...), resolved once
    done = quantize(model, fmt, QuantizeOptions(calib=seqs))
    done.model, done.storage, done.notes, done.record

Four kinds of format, each with one handler registered in :data:`HANDLERS` (as torchao registers
one handler per config type behind ``quantize_(model, config)``):

- ``own``: quantscope's round-to-nearest formats (:mod:`quantscope.formats`), swapped in with
  :func:`quantscope.modules.swap.apply_plan`;
- ``calibrated``: GPTQ / AWQ / AWQ+GPTQ on calibration token sequences
  (:mod:`quantscope.methods.calibrate`), into the same packed storage as round-to-nearest;
- ``mixed``: a format per layer (:mod:`quantscope.methods.mixed`);
- ``library``: an external library's format (:mod:`quantscope.backends`), imported only here;
- ``recovered``: ``<format>+lora[-merged]...``: another format with LoRA adapters trained on the
  calibration tokens (:mod:`quantscope.methods.recover`), kept or merged and requantized.

Method settings that are not part of a format's name (calibration batch size, AWQ's grid and
clipping) are :class:`quantscope.methods.calibrate.CalibConfig`, passed in the options.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Iterable

import torch
from torch import nn

from .backends import BACKEND_FORMATS
from .errors import QuantscopeError
from .formats.registry import storage_bytes
from .formats.spec import FormatSpec, UnknownFormatError, parse_format, suggest

# progress(label, done, total): what a handler reports while it works (calibration blocks, a scan)
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Format:
    """A resolved format: its canonical name, its kind, and the definition its handler reads.

    `spec` is a :class:`FormatSpec` (own and calibrated: the storage grid, and for calibrated ones the
    method's name-borne settings), a :class:`quantscope.methods.mixed.MixedSpec` or a
    :class:`BackendFormat`."""

    name: str
    kind: str
    spec: Any

    @property
    def needs_calibration(self) -> bool:
        """True when quantizing reads calibration tokens (GPTQ/AWQ, mixed-auto's sensitivity scan,
        llm-compressor): the harness then keeps those tokens apart from the evaluation windows."""
        if self.kind == "calibrated":
            return True
        return bool(getattr(self.spec, "needs_calibration", False))

    @property
    def backend(self) -> str:
        """Who stores and runs the quantized weights: 'quantscope' or the library's name."""
        if self.kind == "recovered":  # adapters on a library's layers (bnb-nf4+lora): that library's
            return resolve(self.spec.base).backend
        return self.spec.backend if self.kind == "library" else "quantscope"

    def storage_bytes(self, out_features: int, in_features: int) -> int:
        """Exact bytes of one [out, in] matrix in this format's storage (own and calibrated formats)."""
        if self.kind not in ("own", "calibrated"):
            raise QuantscopeError(f"'{self.name}' has no single storage grid ({self.kind} format)")
        return storage_bytes(self.spec, out_features, in_features)


@functools.lru_cache(maxsize=512)
def resolve(name: str) -> Format:
    """The one place a format name is resolved; unknown names get one error with the closest names."""
    key = name.strip().lower()
    if "+lora" in key:
        return _resolve_recovered(key)
    if key.startswith("mixed-"):
        from .methods.mixed import parse_mixed

        spec = parse_mixed(key)
        return Format(spec.name, "mixed", spec)
    if key in BACKEND_FORMATS:
        return Format(key, "library", BACKEND_FORMATS[key])
    try:
        spec = parse_format(key)
    except UnknownFormatError as e:
        if str(e).startswith("unknown format"):
            raise UnknownFormatError(f"unknown format '{name}'" + suggest(key, tuple(BACKEND_FORMATS))) from None
        raise
    return Format(spec.name, "calibrated" if spec.calibrated else "own", spec)


def _resolve_recovered(key: str) -> Format:
    from .methods.recover_config import parse_recovered, with_outcome

    spec = parse_recovered(key)
    base = resolve(spec.base)
    lib_4bit = base.kind == "library" and base.spec.backend == "bitsandbytes" and dict(base.spec.options).get("kind") == "4bit"
    if base.kind == "recovered" or (base.kind == "library" and not lib_4bit) or (
            base.kind == "own" and base.spec.is_lossless_fp32):
        raise QuantscopeError(f"'{key}': nothing to adapt in {base.name} (LoRA recovery works on quantscope's own "
                              "formats, gptq-/awq-/mixed- formats and bnb-nf4/bnb-fp4)")
    if spec.config.init == "loftq" and base.kind == "calibrated":
        raise QuantscopeError(f"'{key}': LoftQ alternates round-to-nearest quantization with an SVD; {base.name}'s "
                              f"codes come from {base.spec.method.upper()} calibration: use plain init or {base.spec.rtn().name}")
    if spec.outcome == "merged-rtn" and base.kind != "calibrated":
        spec = with_outcome(spec, "merged")  # round-to-nearest is the base's own method
    spec = with_outcome(replace(spec, base=base.name), spec.outcome)  # named with the base's canonical name
    return Format(spec.name, "recovered", spec)


def as_format(fmt: "str | Format | FormatSpec") -> Format:
    if isinstance(fmt, Format):
        return fmt
    if isinstance(fmt, FormatSpec):
        return resolve(fmt.name)
    return resolve(fmt)


@dataclass
class QuantizeOptions:
    """What quantizing needs besides the model and the format."""

    include: tuple[str, ...] = ()  # module-name patterns added to the default selection (decoder linears)
    exclude: tuple[str, ...] = ()  # module-name patterns removed from it
    calib: torch.Tensor | list[torch.Tensor] | None = None  # calibration token sequences (1-D each)
    source: str | None = None  # llama.cpp formats start from the model's GGUF: the reference it was loaded from
    n_ctx: int | None = None  # llama.cpp: the longest window it will be asked to score
    progress: Progress | None = None
    calib_config: Any = None  # methods.calibrate.CalibConfig (batch size, AWQ grid/clipping); None: defaults
    sensitivity_cache: Any = None  # methods.sensitivity.SensitivityCache for mixed-auto's scan
    # recovered formats: where LoRA training keeps its checkpoints (a run directory's `recover/`);
    # None: quantscope's cache
    work_dir: str | None = None

    def calib_list(self, fmt: Format) -> list[torch.Tensor]:
        if self.calib is None or len(self.calib) == 0:
            raise QuantscopeError(f"format '{fmt.name}' is calibrated: pass calib token sequences")
        return list(self.calib)


@dataclass
class Quantized:
    """What a handler returns: the quantized model (the same object for quantscope's own formats),
    the tensors that hold it when a library stores it its own way (None: walk the modules), notes,
    and record fields the method adds (a mixed plan and its predicted KLD, a library's file types)."""

    model: nn.Module
    storage: list[torch.Tensor] | None = None
    notes: list[str] = field(default_factory=list)
    record: dict = field(default_factory=dict)
    seconds: float = 0.0


Handler = Callable[[nn.Module, Format, QuantizeOptions], Quantized]
HANDLERS: dict[str, Handler] = {}


def handler(kind: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        HANDLERS[kind] = fn
        return fn

    return register


def quantize(model: nn.Module, fmt: "str | Format | FormatSpec", options: QuantizeOptions | None = None,
             **kw) -> Quantized:
    """Quantize `model` into `fmt` (in place for quantscope's own formats). `kw` are QuantizeOptions
    fields, for calls that need only one or two of them: quantize(model, "int4-g128", exclude=("mlp",))."""
    fmt = as_format(fmt)
    unknown = set(kw) - {f.name for f in fields(QuantizeOptions)}
    if unknown:
        raise TypeError(f"quantize() got unexpected options {sorted(unknown)}")
    kw = {k: tuple(v) if k in ("include", "exclude") else v for k, v in kw.items()}
    options = replace(options or QuantizeOptions(), **kw)  # the caller's options are never changed
    t0 = time.perf_counter()
    done = HANDLERS[fmt.kind](model, fmt, options)
    if fmt.kind != "library":
        done.notes.extend(_ragged_note(done.model))
    # an engine of its own reports its quantizer's time alone (not the one-off export to its format)
    own = getattr(done.model, "quantscope_quantize_seconds", None)
    done.seconds = time.perf_counter() - t0 if own is None else own
    return done


def _ragged_note(model: nn.Module) -> list[str]:
    from .modules.qmodules import ragged_layers

    ragged = ragged_layers(model)
    if not ragged:
        return []
    name, width, g = ragged[0]
    return [f"{len(ragged)} layer(s) have input widths that are not a multiple of their group "
            f"size (e.g. {name}: {width} = {width // g}x{g} + {width % g}), so their last group is partial; "
            "measured as stored, but `quantscope save` refuses them (serving formats need whole groups)"]


@handler("own")
def _own(model: nn.Module, fmt: Format, opts: QuantizeOptions) -> Quantized:
    from .modules.swap import apply_plan, uniform_plan

    with torch.no_grad():
        apply_plan(model, uniform_plan(model, fmt.spec, opts.include, opts.exclude))
    return Quantized(model)


@handler("calibrated")
def _calibrated(model: nn.Module, fmt: Format, opts: QuantizeOptions) -> Quantized:
    from .methods.calibrate import quantize_calibrated

    step = None
    if opts.progress is not None:
        step = lambda done, total, label: opts.progress(f"{fmt.name}: calibrating ({label})", done, total)  # noqa: E731
    model, report = quantize_calibrated(model, fmt.spec, opts.calib_list(fmt), include=opts.include,
                                        exclude=opts.exclude, progress=step, config=opts.calib_config)
    return Quantized(model, notes=list(report.get("notes", [])))


@handler("mixed")
def _mixed(model: nn.Module, fmt: Format, opts: QuantizeOptions) -> Quantized:
    from .methods.mixed import quantize_mixed, sensitivity_windows

    windows = sensitivity_windows(torch.stack(opts.calib_list(fmt))) if fmt.needs_calibration else None
    step = None
    if opts.progress is not None:
        step = lambda done, total: opts.progress(f"{fmt.name}: sensitivity scan", done, total)  # noqa: E731
    result = quantize_mixed(model, fmt.spec, windows, opts.include, opts.exclude,
                            cache=opts.sensitivity_cache, progress=step)
    return Quantized(model, notes=list(result.notes), record=result.record_fields())


@handler("library")
def _library(model: nn.Module, fmt: Format, opts: QuantizeOptions) -> Quantized:
    from .backends import load_backend
    from .modules.swap import select_modules

    backend = load_backend(fmt.name)
    chosen = set(select_modules(model, opts.include, opts.exclude))
    calib = list(opts.calib) if opts.calib is not None else None
    extra = {}
    if fmt.spec.needs_source:  # an engine of its own (llama.cpp): it starts from the model's file
        extra = {"source": opts.source, "n_ctx": opts.n_ctx}
    model = backend.quantize(model, fmt.spec, lambda n, m: n in chosen, calib, **extra)
    record = dict(backend.describe(model)) if hasattr(backend, "describe") else {}
    record.update({"backend": fmt.spec.backend, "backend_version": backend.version()})
    return Quantized(model, storage=list(backend.storage_tensors(model)), record=record)


@handler("recovered")
def _recovered(model: nn.Module, fmt: Format, opts: QuantizeOptions) -> Quantized:
    from .methods.recover import recover_model

    spec = fmt.spec
    base = resolve(spec.base)

    def quantize_base(m):
        done = HANDLERS[base.kind](m, base, opts)
        return done.model, list(done.notes)

    def requantize_calibrated(m):
        return list(HANDLERS["calibrated"](m, base, opts).notes)

    root = opts.work_dir
    if root is None:
        from .model.load import cache_root

        root = str(cache_root() / "recover")
    out = recover_model(model, spec, opts.calib_list(fmt), root, quantize_base,
                        requantize_calibrated if base.kind == "calibrated" else None,
                        selection=(opts.include, opts.exclude), progress=opts.progress)
    storage = None
    if base.kind == "library":  # the library's storage walk, over the adapted (or merged) model
        from .backends import load_backend

        storage = list(load_backend(base.name).storage_tensors(out.model))
    return Quantized(out.model, storage=storage, notes=out.notes, record={"recover": out.record})


def own_parts(fmt: "str | Format") -> list[Format]:
    """The own formats a format stores layers in: itself, or a mixed plan's ladder / two formats."""
    fmt = as_format(fmt)
    if fmt.kind == "recovered":
        raise QuantscopeError(f"'{fmt.name}' is a LoRA-recovered format: save its base ({fmt.spec.base}) or merge and "
                              "save with your own tools; quantscope does not write adapters into checkpoints")
    if fmt.kind == "mixed":
        s = fmt.spec
        return [resolve(n) for n in (s.ladder if s.kind == "auto" else (s.base, s.wide))]
    return [fmt]


def resolve_all(names: Iterable[str]) -> list[Format]:
    """Resolve names once each, dropping repeats (by canonical name), keeping the given order."""
    out: dict[str, Format] = {}
    for n in names:
        f = resolve(n)
        out.setdefault(f.name, f)
    return list(out.values())
