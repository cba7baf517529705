"""Readers of the published task files, each returning the task's questions as `Item`s.

Prompts are lm-eval's (v0.4), so scores are comparable with published ones: ARC and PIQA
``"Question: {q}\\nAnswer:"`` + ``" " + choice``; HellaSwag
``preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())`` + ``" " + preprocess(ending)``;
MMLU ``"The following are multiple choice questions (with answers) about {subject}.\\n\\n"`` then
k dev examples (the first k, lm-eval's ``first_n`` sampler) each ``question + " " + letter + "\\n\\n"``,
then ``"{q}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:"`` + ``" A"`` .. ``" D"``; LAMBADA (lambada_openai)
context ``" ".join(text.split(" ")[:-1])``, target ``" " + last word``.

A malformed file is a one-line `QuantscopeError` naming the file and line.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from quantscope.errors import QuantscopeError
from quantscope.evaluate.jsonl import read_jsonl, require_file
from quantscope.evaluate.tasks.items import Item


def _jsonl_records(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; a line that is not an object names file and line."""
    for lineno, obj in read_jsonl(path):
        if not isinstance(obj, dict):
            raise QuantscopeError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        yield lineno, obj


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


def load_arc(path: Path) -> list[Item]:
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


def load_hellaswag(path: Path) -> list[Item]:
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


def load_piqa(path: Path) -> list[Item]:
    """PIQA: ``valid.jsonl`` (goal, sol1, sol2) and ``valid-labels.lst`` (0/1 per line) beside it."""
    if path.is_dir():
        path = path / "valid.jsonl"
    labels_path = _piqa_labels_path(path)
    records = list(_jsonl_records(path))
    require_file(labels_path)
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
    require_file(path)
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


def load_mmlu(path: Path, shots: int) -> list[Item]:
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


def load_lambada(path: Path) -> list[Item]:
    """LAMBADA (OpenAI) jsonl ``{"text"}``: the target is the last space-separated word."""
    items = []
    for lineno, obj in _jsonl_records(path):
        text = _field(obj, "text", path, lineno, str)
        words = text.split(" ")
        if len(words) < 2 or not words[-1]:
            raise QuantscopeError(f"{path}:{lineno}: text needs a context and a final word")
        items.append(Item(id=f"line{lineno}", context=" ".join(words[:-1]), choices=(words[-1],), gold=0))
    return _nonempty(items, path)


def load_jsonl(path: Path) -> list[Item]:
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
