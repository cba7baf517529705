"""Deployment scenarios: a quality budget and a ladder for each row of the table of typical losses
(8-bit <1%, 4-bit 1-3%, mixed <1.5%, full precision 0%) that quantscope measures instead of assuming."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from quantscope.errors import QuantscopeError

from .policy import DEFAULT_LADDER, Ladder, Step, Target


@dataclass(frozen=True)
class Scenario:
    name: str
    target: Target
    ladder: Ladder
    needs_memory: bool  # the scenario is defined by a memory limit: --memory is required
    rationale: str  # the approach's typical loss, and how the budget follows from it


# The table of typical losses gives a "typical accuracy loss" per approach: 8-bit <1%, 4-bit 1-3%, mixed
# <1.5%, full precision 0%. Each scenario's quality budget is the upper end of its recommended
# approach's range, applied to perplexity (always measured) or, with a task, to its accuracy.
SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            "cloud-gpu",
            Target(max_ppl_increase_pct=1.0, prefer="fastest"),
            DEFAULT_LADDER,
            False,
            "Cloud inference with GPU -> 8-bit: 'minimal accuracy loss with good speed and memory savings'. "
            "Budget: 8-bit's '<1%' loss; prefer the fastest format that meets it.",
        ),
        Scenario(
            "edge",
            Target(max_ppl_increase_pct=3.0, prefer="smallest"),
            DEFAULT_LADDER,
            False,
            "Edge devices or mobile -> 4-bit: 'maximize compression and reduce memory footprint'. "
            "Budget: 4-bit's '1-3%' loss (upper end); prefer the smallest format that meets it.",
        ),
        Scenario(
            "large-model-limited-hw",
            Target(max_ppl_increase_pct=1.5, prefer="smallest"),
            DEFAULT_LADDER,
            True,
            "Large models on limited hardware -> mixed precision: 'balance accuracy and resource "
            "constraints'. Budget: mixed precision's '<1.5%' loss within the given --memory; smallest first.",
        ),
        Scenario(
            "research",
            Target(max_ppl_increase_pct=1.0, prefer="smallest"),
            Ladder((Step("8-bit", ("int8",)),)),
            False,
            "Research and fine-tuning -> full precision or 8-bit: 'preserve accuracy for training "
            "stability'. Only int8 is tried, against 8-bit's '<1%'; otherwise full precision.",
        ),
    )
}


def scenario_target(
    name: str, *, memory_bytes: int | None = None, task: str | None = None, **overrides: Any
) -> tuple[Target, Ladder]:
    """A scenario's Target and Ladder, with overrides: `memory_bytes`, `task` (the budget then applies
    to that task's accuracy), `prefer`, or a quality limit (which replaces the scenario's)."""
    if name not in SCENARIOS:
        raise QuantscopeError(f"unknown scenario {name!r}: use one of {', '.join(SCENARIOS)}")
    scenario = SCENARIOS[name]
    target = scenario.target
    budget = target.max_ppl_increase_pct
    quality = {k: overrides.pop(k) for k in list(overrides) if k in target.quality_limits()}
    if overrides.keys() - {"prefer"}:
        raise QuantscopeError(f"cannot override {sorted(overrides.keys() - {'prefer'})} of a scenario")
    if quality or task:
        limits = {k: None for k in target.quality_limits()}
        limits.update(quality or {"max_acc_drop_pct": budget})
        target = replace(target, **limits, task=task)
    if memory_bytes is not None:
        target = replace(target, memory_bytes=memory_bytes)
    if scenario.needs_memory and target.memory_bytes is None:
        raise QuantscopeError(f"scenario {name!r} needs --memory (the hardware limit it is about)")
    return replace(target, **overrides), scenario.ladder
