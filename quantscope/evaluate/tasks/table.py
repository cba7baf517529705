"""The task table: each task name with its reader, category and kind, and `load_task` over it.

Adding a task is one entry in `TASKS` (like lm-eval's task registry); nothing else names the tasks.
"""

from __future__ import annotations

import difflib
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from quantscope.errors import QuantscopeError
from quantscope.evaluate.tasks import loaders
from quantscope.evaluate.tasks.items import CATEGORY_NAMES, CLOZE, MULTIPLE_CHOICE, Item, Task


@dataclass(frozen=True)
class TaskEntry:
    category: str  # one of CATEGORY_NAMES; load_task's `category` overrides it
    read: Callable[..., list[Item]]  # read(path) -> items, or read(path, shots) when few_shot
    kind: str = MULTIPLE_CHOICE  # CLOZE: one continuation, scored by greedy match and perplexity
    few_shot: bool = False  # takes --shots (prompts prefixed with the task's own dev examples)

    def __post_init__(self) -> None:
        if self.category not in CATEGORY_NAMES:
            raise ValueError(f"unknown task category {self.category!r}")


TASKS: dict[str, TaskEntry] = {
    "arc-easy": TaskEntry("reasoning", loaders.load_arc),
    "arc-challenge": TaskEntry("reasoning", loaders.load_arc),
    "hellaswag": TaskEntry("commonsense", loaders.load_hellaswag),
    "piqa": TaskEntry("commonsense", loaders.load_piqa),
    "mmlu": TaskEntry("knowledge", loaders.load_mmlu, few_shot=True),
    "lambada": TaskEntry("language-modelling", loaders.load_lambada, kind=CLOZE),
    "jsonl": TaskEntry("knowledge", loaders.load_jsonl),  # the user's own set; its category can be overridden
}

# Task name -> category.
CATEGORIES: dict[str, str] = {name: entry.category for name, entry in TASKS.items()}


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
    entry = TASKS.get(name)
    if entry is None:
        close = difflib.get_close_matches(name, list(TASKS), n=1)
        hint = f" - did you mean {close[0]!r}?" if close else ""
        raise QuantscopeError(f"unknown task {name!r}{hint} (known: {', '.join(TASKS)})")
    if shots < 0:
        raise QuantscopeError(f"--shots must be >= 0, got {shots}")
    if shots and not entry.few_shot:
        few = ", ".join(n for n, e in TASKS.items() if e.few_shot)
        raise QuantscopeError(f"few-shot prompts are supported for {few} only, not {name!r}")
    if limit is not None and limit <= 0:
        raise QuantscopeError(f"--limit must be positive, got {limit}")
    path = Path(path)
    if not path.exists():
        raise QuantscopeError(f"{path}: no such file or directory")
    items = entry.read(path, shots) if entry.few_shot else entry.read(path)
    return Task(
        name=name,
        category=category or entry.category,
        items=_select(items, limit, sample_seed),
        kind=entry.kind,
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
