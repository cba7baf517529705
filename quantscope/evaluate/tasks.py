"""Multiple-choice and cloze tasks: loaders for local files and log-likelihood scoring.

Why not call lm-evaluation-harness? It is a heavy optional dependency (datasets, pandas, pyarrow,
scikit-learn ...) that downloads its data from the Hub; quantscope must score the published files
offline with torch alone. `lmeval_adapter.py` runs lm-eval itself where it is installed. This module
reproduces lm-eval's (v0.4) prompts and scoring so the numbers are comparable with published ones:

- prompts: ARC and PIQA ``"Question: {q}\\nAnswer:"`` + ``" " + choice``; HellaSwag
  ``preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())`` + ``" " + preprocess(ending)``;
  MMLU ``"The following are multiple choice questions (with answers) about {subject}.\\n\\n"`` then
  k dev examples (the first k, lm-eval's ``first_n`` sampler) each ``question + " " + letter + "\\n\\n"``,
  then ``"{q}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:"`` + ``" A"`` .. ``" D"``; LAMBADA (lambada_openai)
  context ``" ".join(text.split(" ")[:-1])``, target ``" " + last word``.
- tokenisation, lm-eval's causal method: trailing spaces of the context move to the continuation;
  ``whole = encode(context + continuation)``, ``ctx = encode(context)``, continuation tokens are
  ``whole[len(ctx):]``. ``encode`` is ``tokenizer.encode(text)`` with the tokenizer's own default for
  special tokens (lm-eval 0.4.13's default): no BOS unless the tokenizer adds one itself.
- scores: ``acc`` = argmax of summed continuation log-likelihoods; ``acc_norm`` = argmax of the
  log-likelihood divided by the choice's length in characters (without the leading delimiter);
  LAMBADA ``acc`` = every target token is the greedy argmax, perplexity = ``exp(mean target NLL)``
  over items (lm-eval's ``perplexity`` aggregation: per item, not per token).
- inputs longer than the model's ``max_position_embeddings`` are truncated from the left.
"""

from __future__ import annotations

import csv
import difflib
import inspect
import json
import math
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from quantscope.errors import QuantscopeError
from quantscope.evaluate import stats

CATEGORY_NAMES = ("knowledge", "commonsense", "reasoning", "language-modelling")

# Task name -> category. "jsonl" (the user's own set) defaults to knowledge; load_task can override.
CATEGORIES: dict[str, str] = {
    "arc-easy": "reasoning",
    "arc-challenge": "reasoning",
    "hellaswag": "commonsense",
    "piqa": "commonsense",
    "mmlu": "knowledge",
    "lambada": "language-modelling",
    "jsonl": "knowledge",
}

MULTIPLE_CHOICE = "multiple_choice"
CLOZE = "cloze"


@dataclass(frozen=True)
class Item:
    """One question: the model scores ``delimiter + choice`` as a continuation of ``context``."""

    id: str  # stable identity (file line or record id), to check that paired scores are paired
    context: str
    choices: tuple[str, ...]  # answer texts; their lengths in characters drive acc_norm
    gold: int  # index into choices
    delimiter: str = " "  # lm-eval's target_delimiter

    @property
    def continuations(self) -> tuple[str, ...]:
        return tuple(self.delimiter + c for c in self.choices)


@dataclass
class Task:
    name: str  # "arc-easy", "mmlu", ...
    category: str  # one of CATEGORY_NAMES
    items: list[Item]
    kind: str = MULTIPLE_CHOICE  # or CLOZE (lambada: one continuation, greedy-match accuracy)
    source: str = ""  # the file or directory read
    shots: int = 0

    def __post_init__(self) -> None:
        if self.category not in CATEGORY_NAMES:
            raise QuantscopeError(
                f"unknown task category {self.category!r}; expected one of {', '.join(CATEGORY_NAMES)}"
            )
        if self.kind not in (MULTIPLE_CHOICE, CLOZE):
            raise ValueError(f"unknown task kind {self.kind!r}")


@dataclass
class TaskScores:
    """Per-item results of one model on one task (the arrays a paired comparison needs)."""

    task: str
    kind: str
    item_ids: list[str]
    loglik: list[np.ndarray]  # per item, summed log-likelihood of each continuation
    correct: np.ndarray  # int8 [n]: acc per item
    correct_norm: np.ndarray | None  # int8 [n]: acc_norm per item (None for cloze tasks)
    target_nll: np.ndarray | None = None  # float64 [n]: cloze only, NLL of the target continuation
    target_tokens: np.ndarray | None = None  # int64 [n]: cloze only, tokens in the target

    def to_dict(self) -> dict[str, Any]:
        """JSON-able per-item arrays, so paired statistics can be recomputed from stored results."""
        d: dict[str, Any] = {
            "task": self.task,
            "kind": self.kind,
            "item_ids": list(self.item_ids),
            "loglik": [[float(v) for v in ll] for ll in self.loglik],
            "correct": self.correct.astype(int).tolist(),
            "correct_norm": None if self.correct_norm is None else self.correct_norm.astype(int).tolist(),
        }
        if self.target_nll is not None:
            d["target_nll"] = self.target_nll.tolist()
            d["target_tokens"] = self.target_tokens.astype(int).tolist()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TaskScores:
        return cls(
            task=d["task"],
            kind=d["kind"],
            item_ids=list(d["item_ids"]),
            loglik=[np.asarray(ll, dtype=np.float64) for ll in d["loglik"]],
            correct=np.asarray(d["correct"], dtype=np.int8),
            correct_norm=None if d.get("correct_norm") is None else np.asarray(d["correct_norm"], dtype=np.int8),
            target_nll=None if d.get("target_nll") is None else np.asarray(d["target_nll"], dtype=np.float64),
            target_tokens=None if d.get("target_tokens") is None else np.asarray(d["target_tokens"], dtype=np.int64),
        )


# ----------------------------------------------------------------------------------------------
# Loading


def _jsonl_records(path: Path) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each non-blank line; bad JSON names file and line."""
    _require_file(path)
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise QuantscopeError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise QuantscopeError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise QuantscopeError(f"{path}: no such file")


def _field(obj: dict, key: str, path: Path, lineno: int, kind: type | tuple[type, ...] | None = None) -> Any:
    if key not in obj:
        raise QuantscopeError(f"{path}:{lineno}: missing field {key!r}")
    value = obj[key]
    if kind is not None and not isinstance(value, kind):
        raise QuantscopeError(f"{path}:{lineno}: field {key!r} has type {type(value).__name__}")
    return value


def _check_choices(choices: list, path: Path, lineno: int, what: str = "choices") -> tuple[str, ...]:
    if len(choices) < 2:
        raise QuantscopeError(f"{path}:{lineno}: {what} has {len(choices)} entries, need at least 2")
    for c in choices:
        if not isinstance(c, str) or not c:
            raise QuantscopeError(f"{path}:{lineno}: {what} holds an empty or non-text entry {c!r}")
    return tuple(choices)


def _check_gold(gold: Any, n: int, path: Path, lineno: int) -> int:
    try:
        g = int(gold)
    except (TypeError, ValueError):
        raise QuantscopeError(f"{path}:{lineno}: label {gold!r} is not an integer") from None
    if isinstance(gold, bool) or not 0 <= g < n:
        raise QuantscopeError(f"{path}:{lineno}: label {gold!r} out of range for {n} choices")
    return g


def _nonempty(items: list[Item], path: Path) -> list[Item]:
    if not items:
        raise QuantscopeError(f"{path}: no items (empty file)")
    return items


def _load_arc(path: Path) -> list[Item]:
    """AI2 ARC jsonl: {"id", "question": {"stem", "choices": [{"text", "label"}]}, "answerKey"}.

    Also reads the Hugging Face ``allenai/ai2_arc`` layout (question string, choices {text, label}).
    """
    items = []
    for lineno, obj in _jsonl_records(path):
        q = _field(obj, "question", path, lineno, (dict, str))
        if isinstance(q, dict):
            stem = _field(q, "stem", path, lineno, str)
            raw = _field(q, "choices", path, lineno, list)
            if not all(isinstance(c, dict) for c in raw):
                raise QuantscopeError(f"{path}:{lineno}: each choice must be an object with 'text' and 'label'")
            texts = [_field(c, "text", path, lineno) for c in raw]
            labels = [_field(c, "label", path, lineno) for c in raw]
        else:
            stem = q
            ch = _field(obj, "choices", path, lineno, dict)
            texts = list(_field(ch, "text", path, lineno, list))
            labels = list(_field(ch, "label", path, lineno, list))
        key = _field(obj, "answerKey", path, lineno)
        if key not in labels:
            raise QuantscopeError(f"{path}:{lineno}: answerKey {key!r} is not one of the labels {labels}")
        items.append(
            Item(
                id=str(obj.get("id", f"line{lineno}")),
                context=f"Question: {stem}\nAnswer:",
                choices=_check_choices(texts, path, lineno),
                gold=labels.index(key),
            )
        )
    return _nonempty(items, path)


def _hellaswag_preprocess(text: str) -> str:
    """lm-eval's hellaswag ``preprocess``: strip WikiHow bracket artifacts and double spaces."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def _load_hellaswag(path: Path) -> list[Item]:
    """HellaSwag jsonl (rowanz format): activity_label, ctx_a, ctx_b, endings, label."""
    items = []
    for lineno, obj in _jsonl_records(path):
        label = _field(obj, "activity_label", path, lineno, str)
        ctx_a = _field(obj, "ctx_a", path, lineno, str)
        ctx_b = _field(obj, "ctx_b", path, lineno, str)
        endings = _field(obj, "endings", path, lineno, list)
        endings = [_hellaswag_preprocess(e) if isinstance(e, str) else e for e in endings]
        choices = _check_choices(endings, path, lineno, "endings")
        gold = _check_gold(_field(obj, "label", path, lineno), len(choices), path, lineno)
        items.append(
            Item(
                id=str(obj.get("ind", f"line{lineno}")),
                context=_hellaswag_preprocess(label + ": " + ctx_a + " " + ctx_b.capitalize()),
                choices=choices,
                gold=gold,
            )
        )
    return _nonempty(items, path)


def _piqa_labels_path(path: Path) -> Path:
    # valid.jsonl -> valid-labels.lst (the official layout)
    return path.with_name(path.name.removesuffix(".jsonl") + "-labels.lst")


def _load_piqa(path: Path) -> list[Item]:
    """PIQA: ``valid.jsonl`` (goal, sol1, sol2) and ``valid-labels.lst`` (0/1 per line) beside it."""
    if path.is_dir():
        path = path / "valid.jsonl"
    labels_path = _piqa_labels_path(path)
    records = list(_jsonl_records(path))
    _require_file(labels_path)
    with open(labels_path, encoding="utf-8") as f:
        labels = [(i, s.strip()) for i, s in enumerate(f, start=1) if s.strip()]
    if len(labels) != len(records):
        raise QuantscopeError(f"{labels_path}: {len(labels)} labels for {len(records)} questions in {path.name}")
    items = []
    for (lineno, obj), (label_line, label) in zip(records, labels):
        goal = _field(obj, "goal", path, lineno, str)
        sols = [_field(obj, "sol1", path, lineno), _field(obj, "sol2", path, lineno)]
        choices = _check_choices(sols, path, lineno, "solutions")
        items.append(
            Item(
                id=f"line{lineno}",
                context=f"Question: {goal}\nAnswer:",
                choices=choices,
                gold=_check_gold(label, 2, labels_path, label_line),
            )
        )
    return _nonempty(items, path)


_MMLU_LETTERS = ("A", "B", "C", "D")


def _mmlu_rows(path: Path) -> list[tuple[int, str, list[str], int]]:
    """Rows of a hendrycks MMLU CSV (no header): question, A, B, C, D, answer letter."""
    _require_file(path)
    rows = []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        while True:
            lineno = reader.line_num + 1  # first physical line of the next record
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                raise QuantscopeError(f"{path}:{lineno}: bad CSV ({e})") from None
            if not row:
                continue
            if len(row) != 6:
                raise QuantscopeError(
                    f"{path}:{lineno}: expected 6 columns (question, A, B, C, D, answer), got {len(row)}"
                )
            answer = row[5].strip()
            if answer not in _MMLU_LETTERS:
                raise QuantscopeError(f"{path}:{lineno}: answer {row[5]!r} is not one of A, B, C, D")
            _check_choices(row[1:5], path, lineno)
            rows.append((lineno, row[0], row[1:5], _MMLU_LETTERS.index(answer)))
    if not rows:
        raise QuantscopeError(f"{path}: no items (empty file)")
    return rows


def _mmlu_question(question: str, choices: list[str]) -> str:
    lines = [question.strip()] + [f"{letter}. {c}" for letter, c in zip(_MMLU_LETTERS, choices)]
    return "\n".join(lines) + "\nAnswer:"


def _mmlu_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise QuantscopeError(f"{path}: no such file or directory")
    test_dir = path / "test" if (path / "test").is_dir() else path
    files = sorted(test_dir.glob("*_test.csv"))
    if not files:
        raise QuantscopeError(f"{path}: no *_test.csv files (expected an MMLU data directory)")
    return files


def _load_mmlu(path: Path, shots: int) -> list[Item]:
    """MMLU: a directory of ``<subject>_test.csv`` (or its parent holding test/ and dev/).

    k-shot prompts use the first k rows of ``../dev/<subject>_dev.csv``.
    """
    items = []
    for test_file in _mmlu_files(path):
        subject = test_file.name.removesuffix("_test.csv").removesuffix(".csv")
        prefix = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
        if shots > 0:
            dev_file = test_file.parent.parent / "dev" / f"{subject}_dev.csv"
            if not dev_file.is_file():
                raise QuantscopeError(f"{dev_file}: no such file (needed for {shots}-shot MMLU)")
            dev = _mmlu_rows(dev_file)
            if len(dev) < shots:
                raise QuantscopeError(f"{dev_file}: has {len(dev)} examples, fewer than --shots {shots}")
            prefix += "".join(_mmlu_question(q, ch) + " " + _MMLU_LETTERS[a] + "\n\n" for _, q, ch, a in dev[:shots])
        for lineno, q, ch, a in _mmlu_rows(test_file):
            context = prefix + _mmlu_question(q, ch)
            items.append(Item(id=f"{subject}:{lineno}", context=context, choices=_MMLU_LETTERS, gold=a))
    return items


def _load_lambada(path: Path) -> list[Item]:
    """LAMBADA (OpenAI) jsonl ``{"text"}``: the target is the last space-separated word."""
    items = []
    for lineno, obj in _jsonl_records(path):
        text = _field(obj, "text", path, lineno, str)
        words = text.split(" ")
        if len(words) < 2 or not words[-1]:
            raise QuantscopeError(f"{path}:{lineno}: text needs a context and a final word")
        items.append(Item(id=f"line{lineno}", context=" ".join(words[:-1]), choices=(words[-1],), gold=0))
    return _nonempty(items, path)


def _load_jsonl(path: Path) -> list[Item]:
    """The user's own set: ``{"question", "choices": [...], "answer": index or choice text}``.

    Prompted like ARC: ``"Question: {question}\\nAnswer:"`` + ``" " + choice``.
    """
    items = []
    for lineno, obj in _jsonl_records(path):
        question = _field(obj, "question", path, lineno, str)
        choices = _check_choices(_field(obj, "choices", path, lineno, list), path, lineno)
        answer = _field(obj, "answer", path, lineno, (int, str))
        if isinstance(answer, str):  # the text of the right choice
            if answer not in choices:
                raise QuantscopeError(f"{path}:{lineno}: answer {answer!r} is not one of the choices")
            gold = choices.index(answer)
        else:  # an index into choices
            gold = _check_gold(answer, len(choices), path, lineno)
        item_id = str(obj.get("id", f"line{lineno}"))
        items.append(Item(id=item_id, context=f"Question: {question}\nAnswer:", choices=choices, gold=gold))
    return _nonempty(items, path)


def load_task(
    name: str,
    path: str | Path,
    limit: int | None = None,
    sample_seed: int | None = None,
    shots: int = 0,
    category: str | None = None,
) -> Task:
    """Read a task from local files in its published format.

    ``limit`` keeps the first N items, or N items drawn with ``random.Random(sample_seed)`` when
    ``sample_seed`` is given (kept in file order). ``shots`` applies to MMLU only.
    ``category`` overrides ``CATEGORIES[name]`` (useful for a user's own jsonl set).
    """
    if name not in CATEGORIES:
        close = difflib.get_close_matches(name, list(CATEGORIES), n=1)
        hint = f" - did you mean {close[0]!r}?" if close else ""
        raise QuantscopeError(f"unknown task {name!r}{hint} (known: {', '.join(CATEGORIES)})")
    if shots < 0:
        raise QuantscopeError(f"--shots must be >= 0, got {shots}")
    if shots and name != "mmlu":
        raise QuantscopeError(f"few-shot prompts are supported for mmlu only, not {name!r}")
    if limit is not None and limit <= 0:
        raise QuantscopeError(f"--limit must be positive, got {limit}")
    path = Path(path)
    if not path.exists():
        raise QuantscopeError(f"{path}: no such file or directory")
    if name in ("arc-easy", "arc-challenge"):
        items = _load_arc(path)
    elif name == "hellaswag":
        items = _load_hellaswag(path)
    elif name == "piqa":
        items = _load_piqa(path)
    elif name == "mmlu":
        items = _load_mmlu(path, shots)
    elif name == "lambada":
        items = _load_lambada(path)
    else:
        items = _load_jsonl(path)
    items = _select(items, limit, sample_seed)
    return Task(
        name=name,
        category=category or CATEGORIES[name],
        items=items,
        kind=CLOZE if name == "lambada" else MULTIPLE_CHOICE,
        source=str(path),
        shots=shots,
    )


def _select(items: list[Item], limit: int | None, sample_seed: int | None) -> list[Item]:
    if limit is None or limit >= len(items):
        return items
    if sample_seed is None:
        return items[:limit]
    keep = sorted(random.Random(sample_seed).sample(range(len(items)), limit))
    return [items[i] for i in keep]


# ----------------------------------------------------------------------------------------------
# Scoring


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text))


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's causal ``_encode_pair``: encode the whole string and split at len(encode(context)).

    An empty context is replaced by the BOS (else EOS) token, as lm-eval's ``prefix_token_id``.
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    if not context:
        prefix = getattr(tokenizer, "bos_token_id", None)
        if prefix is None:
            prefix = getattr(tokenizer, "eos_token_id", None)
        if prefix is None:
            raise QuantscopeError("empty context and the tokenizer has neither a BOS nor an EOS token")
        return [prefix], _encode(tokenizer, continuation)
    whole = _encode(tokenizer, context + continuation)
    ctx = _encode(tokenizer, context)
    return ctx, whole[len(ctx) :]


@dataclass
class _Row:
    """One distinct model input; several requests (choices) may read their scores from it."""

    tokens: list[int]
    requests: list[tuple[int, list[int]]] = field(default_factory=list)  # (request index, continuation tokens)


def _model_device(model: torch.nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _max_length(model: torch.nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "n_ctx"):
        v = getattr(config, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def _accepted_kwargs(model: torch.nn.Module) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


def loglikelihoods(
    model: torch.nn.Module,
    pairs: list[tuple[list[int], list[int]]],
    batch_size: int = 8,
    max_length: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[tuple[float, bool]]:
    """Summed log-likelihood of each continuation given its context, and whether it is greedy.

    ``pairs`` are token lists ``(context, continuation)``. Requests with identical model inputs
    (e.g. one-letter MMLU answers after the same prompt) share one forward row, as lm-eval's cache
    does. Rows are sorted longest first and right-padded in batches of ``batch_size``; when the
    model accepts ``logits_to_keep`` only the positions that score a continuation are materialised.
    ``progress(done_rows, total_rows)`` is called after each batch.
    """
    if batch_size < 1:
        raise QuantscopeError(f"batch size must be >= 1, got {batch_size}")
    rows: dict[tuple[int, ...], _Row] = {}
    for i, (ctx, cont) in enumerate(pairs):
        if not cont:
            raise QuantscopeError(f"a continuation encodes to zero tokens (request {i})")
        if max_length is not None and len(cont) > max_length:
            raise QuantscopeError(
                f"a continuation of {len(cont)} tokens exceeds the model's {max_length}-token context"
            )
        full = list(ctx) + list(cont)
        if max_length is not None and len(full) > max_length + 1:
            full = full[-(max_length + 1) :]
        inp = tuple(full[:-1])
        rows.setdefault(inp, _Row(list(inp))).requests.append((i, list(cont)))
    ordered = sorted(rows.values(), key=lambda r: -len(r.tokens))

    device = _model_device(model)
    accepted = _accepted_kwargs(model)
    results: list[tuple[float, bool] | None] = [None] * len(pairs)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(ordered), batch_size):
                batch = ordered[start : start + batch_size]
                _score_batch(model, batch, device, accepted, results)
                if progress is not None:
                    progress(min(start + batch_size, len(ordered)), len(ordered))
    finally:
        model.train(was_training)
    return results  # type: ignore[return-value]


def _score_batch(model, batch: list[_Row], device, accepted: set[str], results: list) -> None:
    pad_len = max(len(r.tokens) for r in batch)
    ids = torch.zeros((len(batch), pad_len), dtype=torch.long)
    mask = torch.zeros((len(batch), pad_len), dtype=torch.long)
    for b, row in enumerate(batch):
        ids[b, : len(row.tokens)] = torch.tensor(row.tokens, dtype=torch.long)
        mask[b, : len(row.tokens)] = 1
    # The earliest position any continuation needs, counted from the right edge of the padded batch.
    keep = max(pad_len - (len(r.tokens) - max(len(c) for _, c in r.requests)) for r in batch)
    kwargs: dict[str, Any] = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
    if "use_cache" in accepted:
        kwargs["use_cache"] = False
    if "logits_to_keep" in accepted:
        kwargs["logits_to_keep"] = keep
    logits = model(**kwargs).logits
    offset = pad_len - logits.shape[1]  # position of logits[:, 0] in the padded sequence
    for b, row in enumerate(batch):
        n = len(row.tokens)
        for req, cont in row.requests:
            c = len(cont)
            lp = torch.log_softmax(logits[b, n - c - offset : n - offset].float(), dim=-1)
            target = torch.tensor(cont, dtype=torch.long, device=lp.device)
            ll = float(lp.gather(-1, target[:, None]).sum())
            greedy = bool((lp.argmax(dim=-1) == target).all())
            results[req] = (ll, greedy)


def score_task(
    model: torch.nn.Module,
    tokenizer: Any,
    task: Task,
    batch_size: int = 8,
    progress: Callable[[int, int], None] | None = None,
) -> TaskScores:
    """Score every item of ``task`` with ``model`` (any causal LM returning ``.logits``).

    ``tokenizer`` needs only ``encode(text) -> list[int]`` (and ``bos_token_id``/``eos_token_id``
    for an empty context). Returns per-item correctness for paired comparisons.
    """
    pairs: list[tuple[list[int], list[int]]] = []
    for item in task.items:
        for cont in item.continuations:
            pairs.append(encode_pair(tokenizer, item.context, cont))
    scored = loglikelihoods(model, pairs, batch_size=batch_size, max_length=_max_length(model), progress=progress)

    loglik, correct, correct_norm, nll, ntok = [], [], [], [], []
    k = 0
    for item in task.items:
        m = len(item.choices)
        lls = np.array([scored[k + j][0] for j in range(m)], dtype=np.float64)
        greedy = [scored[k + j][1] for j in range(m)]
        lens = [len(pairs[k + j][1]) for j in range(m)]
        k += m
        loglik.append(lls)
        if task.kind == CLOZE:
            correct.append(int(greedy[0]))
            nll.append(-lls[0])
            ntok.append(lens[0])
        else:
            char_len = np.array([float(len(c)) for c in item.choices])
            correct.append(int(np.argmax(lls) == item.gold))
            correct_norm.append(int(np.argmax(lls / char_len) == item.gold))
    cloze = task.kind == CLOZE
    return TaskScores(
        task=task.name,
        kind=task.kind,
        item_ids=[it.id for it in task.items],
        loglik=loglik,
        correct=np.asarray(correct, dtype=np.int8),
        correct_norm=None if cloze else np.asarray(correct_norm, dtype=np.int8),
        target_nll=np.asarray(nll, dtype=np.float64) if cloze else None,
        target_tokens=np.asarray(ntok, dtype=np.int64) if cloze else None,
    )


# ----------------------------------------------------------------------------------------------
# Summaries


def _check_paired(scores: TaskScores, baseline: TaskScores) -> None:
    if scores.task != baseline.task or scores.item_ids != baseline.item_ids:
        raise QuantscopeError(
            f"cannot pair {scores.task} ({len(scores.item_ids)} items) with baseline "
            f"{baseline.task} ({len(baseline.item_ids)} items): not the same questions"
        )


def _acc_ci(correct: np.ndarray) -> tuple[float, list[float]]:
    k, n = int(correct.sum()), int(correct.size)
    lo, hi = stats.wilson_interval(k, n)
    return k / n, [lo, hi]


def summarize(
    scores: TaskScores, baseline_scores: TaskScores | None = None, n_boot: int = 2000, seed: int = 0
) -> dict[str, Any]:
    """``{n, acc, acc_ci, acc_norm, acc_norm_ci, delta, delta_ci, mcnemar_p, significant}``.

    Intervals are 95% Wilson intervals. ``delta`` = acc - baseline acc on the same items, with a
    paired bootstrap interval and the exact McNemar p-value; ``significant`` is True when
    ``delta_ci`` excludes zero. Without a baseline the four comparison fields are None. For cloze
    tasks (lambada) ``acc_norm`` and ``acc_norm_ci`` are None; see ``cloze_perplexity``.
    """
    acc, acc_ci = _acc_ci(scores.correct)
    acc_norm, acc_norm_ci = (None, None) if scores.correct_norm is None else _acc_ci(scores.correct_norm)
    out: dict[str, Any] = {
        "n": int(scores.correct.size),
        "acc": acc,
        "acc_ci": acc_ci,
        "acc_norm": acc_norm,
        "acc_norm_ci": acc_norm_ci,
        "delta": None,
        "delta_ci": None,
        "mcnemar_p": None,
        "significant": None,
    }
    if baseline_scores is not None:
        _check_paired(scores, baseline_scores)
        a, b = baseline_scores.correct.astype(bool), scores.correct.astype(bool)
        delta, lo, hi = stats.paired_bootstrap_ci(a, b, n_boot=n_boot, seed=seed)
        out["delta"] = delta
        out["delta_ci"] = [lo, hi]
        out["mcnemar_p"] = stats.mcnemar_exact_p(int((a & ~b).sum()), int((~a & b).sum()))
        out["significant"] = stats.significant(lo, hi)
    return out


def category_deltas(pairs: dict[str, tuple[TaskScores, TaskScores]], categories: dict[str, str],
                    n_boot: int = 2000, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Where a format loses: per category, the accuracy change over all its tasks' questions pooled
    (each question once, so larger tasks weigh more), paired with the baseline's answers.

    `pairs` maps task name -> (scores, baseline scores); `categories` task name -> category.
    Returns ``{category: {tasks, n, delta, delta_ci, mcnemar_p, significant}}``."""
    grouped: dict[str, list[str]] = {}
    for name in pairs:
        grouped.setdefault(categories[name], []).append(name)
    out = {}
    for cat, names in sorted(grouped.items()):
        for name in names:
            _check_paired(*pairs[name])
        b = np.concatenate([pairs[n][1].correct.astype(bool) for n in names])
        a = np.concatenate([pairs[n][0].correct.astype(bool) for n in names])
        delta, lo, hi = stats.paired_bootstrap_ci(b, a, n_boot=n_boot, seed=seed)
        out[cat] = {"tasks": sorted(names), "n": int(a.size), "delta": delta, "delta_ci": [lo, hi],
                    "mcnemar_p": stats.mcnemar_exact_p(int((b & ~a).sum()), int((~b & a).sum())),
                    "significant": stats.significant(lo, hi)}
    return out


def cloze_perplexity(
    scores: TaskScores, baseline_scores: TaskScores | None = None, n_boot: int = 2000, seed: int = 0
) -> dict[str, Any]:
    """Target-word perplexity of a cloze task (lm-eval's ``exp(mean per-item NLL)``).

    Returns ``{perplexity, perplexity_stderr, perplexity_delta, perplexity_delta_ci}``; the stderr
    is the delta method on the mean per-item NLL, the delta interval a paired bootstrap over items.
    """
    if scores.target_nll is None:
        raise QuantscopeError(f"task {scores.task} is not a cloze task: it has no target perplexity")
    mean, se = stats.mean_stderr(scores.target_nll)
    ppl = math.exp(mean)
    out: dict[str, Any] = {
        "perplexity": ppl,
        "perplexity_stderr": ppl * se,
        "perplexity_delta": None,
        "perplexity_delta_ci": None,
    }
    if baseline_scores is not None:
        _check_paired(scores, baseline_scores)
        delta, lo, hi = stats.paired_bootstrap_ci(
            baseline_scores.target_nll, scores.target_nll, stat="exp_mean", n_boot=n_boot, seed=seed
        )
        out["perplexity_delta"] = delta
        out["perplexity_delta_ci"] = [lo, hi]
    return out
