"""What a task is made of: questions (`Item`), a loaded `Task`, and one model's per-item `TaskScores`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from quantscope.errors import QuantscopeError

CATEGORY_NAMES = ("knowledge", "commonsense", "reasoning", "language-modelling")

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
