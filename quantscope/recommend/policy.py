"""Recommend a format: a pure policy over result records, following the quantization recipe.

The recipe, in order: ``int8`` -> 4-bit round-to-nearest (``int4-g128``, ``nf4``) ->
4-bit calibrated (``gptq-int4-g128-act``, ``awq-int4-g128``, ``awq+gptq-int4-g128``) -> mixed precision (the caller's
allocations, smallest budget first) -> otherwise the widest format that fits memory, saying that
nothing smaller met the target.

How a format passes. A record passes when its weights fit ``memory_bytes`` and the *upper* end of
its 95% interval meets the quality target (never the point estimate):

- ``max_ppl_increase_pct``: ``100 x hi / baseline_perplexity`` where ``(lo, hi) =
  perplexity_delta_ci`` (format minus baseline, in perplexity units) and the baseline perplexity is
  ``baseline_perplexity`` if the record has it, else ``perplexity - perplexity_delta``;
- ``max_kld``: ``kld_ci[1]`` if present, else ``kld_mean + 1.96 x kld_stderr``;
- ``max_acc_drop_pct``: for ``target.task`` (or every task in ``tasks``), the drop's upper end
  ``-100 x delta_ci[0]`` in percentage points (``delta`` = format minus baseline accuracy, 0..1).

Laziness. ``measure(format) -> record`` is expensive (quantize + evaluate), so it is called at most
once per format and only while the answer can still change:

- with ``size_of`` (bytes without measuring, e.g. from :mod:`quantscope.plan.planner`), formats
  that cannot fit memory are never measured, and with ``prefer="smallest"`` each step is tried
  smallest first and a candidate that is not strictly smaller than the best passing format so far
  is skipped (it cannot win);
- the recipe's premise is that later steps are lossier than the first (8-bit): when every format
  of the first step that was measured fails the quality target, later steps are not measured
  (``Ladder.stop_when_first_step_fails``);
- ``prefer="fastest"`` must measure every candidate that fits, since speed is only known after.

Every candidate leaves a :class:`TrailStep` with its numbers and why it passed, failed or was
skipped. A memory budget no candidate fits raises :class:`QuantscopeError` naming the closest one.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Sequence

from quantscope.errors import QuantscopeError
from quantscope.evaluate.stats import Z95
from quantscope.results.record import Record
PREFERENCES = ("smallest", "fastest")


@dataclass(frozen=True)
class Target:
    """What the user can afford: exactly one quality limit, optionally a memory limit."""

    max_ppl_increase_pct: float | None = None  # perplexity may rise at most this % over the baseline
    max_kld: float | None = None  # mean KL divergence from the baseline (nats per token)
    max_acc_drop_pct: float | None = None  # task accuracy may drop at most this many percentage points
    task: str | None = None  # which task max_acc_drop_pct reads (None: every task in the record)
    memory_bytes: int | None = None  # the weights must fit in this many bytes
    prefer: str = "smallest"  # among passing formats: "smallest" weights or "fastest" decode

    def __post_init__(self) -> None:
        limits = {k: v for k, v in self.quality_limits().items() if v is not None}
        if len(limits) != 1:
            raise QuantscopeError(
                "give exactly one quality target: --max-ppl-increase, --max-kld or --max-acc-drop"
                + (f" (got {', '.join(limits)})" if limits else "")
            )
        (key, value), = limits.items()
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise QuantscopeError(f"{key} must be a non-negative number, not {value!r}")
        if self.memory_bytes is not None and not (isinstance(self.memory_bytes, int) and self.memory_bytes > 0):
            raise QuantscopeError(f"memory must be a positive number of bytes, not {self.memory_bytes!r}")
        if self.prefer not in PREFERENCES:
            raise QuantscopeError(f"prefer must be one of {', '.join(PREFERENCES)}, not {self.prefer!r}")

    def quality_limits(self) -> dict[str, float | None]:
        return {
            "max_ppl_increase_pct": self.max_ppl_increase_pct,
            "max_kld": self.max_kld,
            "max_acc_drop_pct": self.max_acc_drop_pct,
        }

    def describe(self) -> str:
        if self.max_ppl_increase_pct is not None:
            text = f"perplexity +{self.max_ppl_increase_pct:g}% at most"
        elif self.max_kld is not None:
            text = f"KLD {self.max_kld:g} at most"
        else:
            text = f"accuracy drop {self.max_acc_drop_pct:g} points at most" + (f" on {self.task}" if self.task else "")
        return text + (f", weights <= {_gb(self.memory_bytes)}" if self.memory_bytes else "")


@dataclass(frozen=True)
class Step:
    name: str  # e.g. "4-bit round-to-nearest"
    formats: tuple[str, ...]  # tried in this order (mixed budgets: smallest first)


@dataclass(frozen=True)
class Ladder:
    steps: tuple[Step, ...]
    fallback: tuple[str, ...] = ("bf16",)  # unquantized formats for "the widest that fits memory"
    stop_when_first_step_fails: bool = True  # the recipe's premise: later steps are lossier

    def formats(self) -> list[str]:
        return list(dict.fromkeys([f for s in self.steps for f in s.formats] + list(self.fallback)))


def recipe_ladder(calibrated: bool = True, mixed: Sequence[str] = (), fallback: Sequence[str] = ("bf16",)) -> Ladder:
    """The recipe's ladder. `calibrated`: include GPTQ/AWQ (needs calibration text). `mixed`: names of
    mixed-precision allocations to try, smallest budget first (they come from the allocator)."""
    steps = [Step("8-bit", ("int8",)), Step("4-bit round-to-nearest", ("int4-g128", "nf4"))]
    if calibrated:
        # measured order (benchmarks/results/calibrated.log, embedded model): act-order GPTQ and AWQ
        # cut int4-g128's KLD by ~45-48% (plain GPTQ by 19%), AWQ+GPTQ by 57% but quantizes slowest;
        # equal sizes, so with prefer=smallest the first that passes ends the step
        steps.append(Step("4-bit calibrated", ("gptq-int4-g128-act", "awq-int4-g128", "awq+gptq-int4-g128")))
    if mixed:
        steps.append(Step("mixed precision", tuple(mixed)))
    return Ladder(tuple(steps), tuple(fallback))


DEFAULT_LADDER = recipe_ladder()


@dataclass(frozen=True)
class TrailStep:
    format: str
    step: str  # ladder step name, or "fallback"
    verdict: str  # "pass", "fail" or "skipped"
    why: str
    numbers: dict = field(default_factory=dict)  # what was measured (empty when skipped)


@dataclass(frozen=True)
class Decision:
    chosen: str
    meets_target: bool  # False only for a fallback that fits memory but misses the quality target
    reason: str
    trail: tuple[TrailStep, ...]
    target: Target
    record: dict = field(default_factory=dict)  # the chosen format's record

    def to_dict(self) -> dict:
        return {
            "chosen": self.chosen,
            "meets_target": self.meets_target,
            "reason": self.reason,
            "target": asdict(self.target),
            "trail": [asdict(t) for t in self.trail],
        }


# ---------------------------------------------------------------------------------------------
# Checking one record


def _gb(n: int | None) -> str:
    return "?" if n is None else f"{n / 1e9:.3g} GB" if n >= 1e8 else f"{n / 1e6:.3g} MB"


def _field(record: Record, key: str, fmt: str) -> Any:
    value = record.get(key)
    if value is None:
        raise QuantscopeError(f"the record of {fmt} has no {key}: cannot check the target")
    return value


def _numbers(record: Record) -> dict:
    keys = ("weight_bytes", "perplexity", "perplexity_delta", "perplexity_delta_ci", "kld_mean", "kld_stderr",
            "decode_tokens_per_s")  # fmt: skip
    return {k: record[k] for k in keys if record.get(k) is not None}


def check_quality(record: Record, target: Target) -> tuple[bool, float, str]:
    """(passed, upper end of the checked interval, one-line reason) for the target's quality limit."""
    fmt = str(record.get("format", "?"))
    if target.max_ppl_increase_pct is not None:
        lo, hi = _field(record, "perplexity_delta_ci", fmt)
        base = record.get("baseline_perplexity")
        if base is None:
            base = _field(record, "perplexity", fmt) - _field(record, "perplexity_delta", fmt)
        if not base > 0:
            raise QuantscopeError(f"the record of {fmt} implies a baseline perplexity of {base}: cannot check")
        upper = 100.0 * hi / base
        limit, unit, what = target.max_ppl_increase_pct, "%", f"perplexity increase upper 95% bound {upper:+.2f}%"
    elif target.max_kld is not None:
        if record.get("kld_ci") is not None:
            upper = float(record["kld_ci"][1])
        else:
            upper = _field(record, "kld_mean", fmt) + Z95 * _field(record, "kld_stderr", fmt)
        limit, unit, what = target.max_kld, "", f"KLD upper 95% bound {upper:.4g}"
    else:
        tasks = _field(record, "tasks", fmt)
        names = [target.task] if target.task else sorted(tasks)
        if not names:
            raise QuantscopeError(f"the record of {fmt} has no task results: cannot check an accuracy drop")
        drops = {}
        for name in names:
            if name not in tasks or tasks[name].get("delta_ci") is None:
                raise QuantscopeError(f"the record of {fmt} has no delta_ci for task {name!r}")
            drops[name] = -100.0 * tasks[name]["delta_ci"][0]
        worst = max(drops, key=drops.__getitem__)
        upper = drops[worst]
        limit, unit = target.max_acc_drop_pct, " points"
        what = f"accuracy drop upper 95% bound {upper:.2f} points ({worst})"
    passed = upper <= limit
    return passed, upper, f"{what} {'<=' if passed else '>'} {limit:g}{unit}"


# ---------------------------------------------------------------------------------------------
# The policy


class _Run:
    """Book-keeping for one recommend() call: measured records, sizes, and the trail."""

    def __init__(self, target: Target, measure: Callable[[str], Record], size_of: Callable[[str], int] | None):
        self.target, self.measure, self.size_of = target, measure, size_of
        self.records: dict[str, Record] = {}
        self.trail: list[TrailStep] = []

    def size(self, fmt: str) -> int | None:
        if fmt in self.records and self.records[fmt].get("weight_bytes") is not None:
            return int(self.records[fmt]["weight_bytes"])
        return int(self.size_of(fmt)) if self.size_of is not None else None

    def fits(self, size: int | None) -> bool | None:
        if self.target.memory_bytes is None:
            return True
        return None if size is None else size <= self.target.memory_bytes

    def get(self, fmt: str) -> Record:
        if fmt not in self.records:
            self.records[fmt] = self.measure(fmt)
        return self.records[fmt]

    def judge(self, fmt: str, step: str) -> str:
        """Measure `fmt` and append its verdict: "pass", "quality" (missed the target) or "other"
        (crashed, or its weights do not fit memory: neither says anything about quality)."""
        record = self.get(fmt)
        numbers = _numbers(record)
        if record.get("error"):
            self.trail.append(TrailStep(fmt, step, "fail", f"could not be measured: {record['error']}", numbers))
            return "other"
        size = self.size(fmt)
        if self.fits(size) is False:
            why = f"weights {_gb(size)} > memory {_gb(self.target.memory_bytes)}"
            self.trail.append(TrailStep(fmt, step, "fail", why, numbers))
            return "other"
        passed, upper, why = check_quality(record, self.target)
        numbers["checked_upper"] = upper
        self.trail.append(TrailStep(fmt, step, "pass" if passed else "fail", why, numbers))
        return "pass" if passed else "quality"

    def skip(self, fmt: str, step: str, why: str) -> None:
        self.trail.append(TrailStep(fmt, step, "skipped", why))


def recommend(
    target: Target,
    measure: Callable[[str], Record],
    ladder: Ladder = DEFAULT_LADDER,
    size_of: Callable[[str], int] | None = None,
) -> Decision:
    """Walk the ladder lazily and return the chosen format with its decision trail (see module doc)."""
    run = _Run(target, measure, size_of)
    everything = ladder.formats()
    if target.memory_bytes is not None and size_of is not None:
        sizes = {f: run.size(f) for f in everything}
        if not any(run.fits(s) for s in sizes.values()):
            _raise_nothing_fits(target, sizes)

    passing: list[str] = []
    stop_reason: str | None = None
    for index, step in enumerate(ladder.steps):
        verdicts = []
        order = list(step.formats)
        if target.prefer == "smallest" and size_of is not None:
            order.sort(key=run.size)  # smallest first: if it passes, the rest of the step cannot win
        for fmt in order:
            if stop_reason:
                run.skip(fmt, step.name, stop_reason)
                continue
            size = run.size(fmt)
            if run.fits(size) is False:
                run.skip(fmt, step.name, f"weights {_gb(size)} cannot fit memory {_gb(target.memory_bytes)}")
                continue
            best = _best(run, passing)
            best_size = run.size(best) if best is not None else None
            if target.prefer == "smallest" and size is not None and best_size is not None and size >= best_size:
                run.skip(fmt, step.name, f"not smaller than {best} ({_gb(size)} >= {_gb(best_size)}), which passed")
                continue
            verdicts.append(run.judge(fmt, step.name))
            if verdicts[-1] == "pass":
                passing.append(fmt)
        if index == 0 and ladder.stop_when_first_step_fails and "quality" in verdicts and "pass" not in verdicts:
            stop_reason = f"{step.name} missed the target; later steps are lossier (the recipe's premise): not measured"

    best = _best(run, passing)
    if best is not None:
        why = "smallest" if target.prefer == "smallest" else "fastest"
        others = [f for f in passing if f != best]
        reason = f"{best} is the {why} format that meets the target ({target.describe()})"
        if others:
            reason += f"; also passed: {', '.join(others)}"
        return Decision(best, True, reason, tuple(run.trail), target, dict(run.records[best]))
    return _fallback(run, ladder, everything)


def _best(run: _Run, passing: list[str]) -> str | None:
    if not passing:
        return None
    if run.target.prefer == "smallest":
        sizes = {f: run.size(f) for f in passing}  # unknown sizes rank last; ties keep recipe order
        return min(passing, key=lambda f: (sizes[f] is None, sizes[f] or 0))
    return max(passing, key=lambda f: run.records[f].get("decode_tokens_per_s") or 0.0)


def _fallback(run: _Run, ladder: Ladder, everything: list[str]) -> Decision:
    """Nothing met the target: the widest format that fits memory, measured so its numbers are shown."""
    target = run.target
    sizes: dict[str, int | None] = {f: run.size(f) for f in everything}
    if run.size_of is None:  # sizes only from measuring: measure the fallback formats, widest first
        for fmt in ladder.fallback:
            if sizes[fmt] is None:
                run.get(fmt)
                sizes[fmt] = run.size(fmt)
            if run.fits(sizes[fmt]):
                break
    known = {f: s for f, s in sizes.items() if s is not None}
    fitting = {f: s for f, s in known.items() if run.fits(s)}
    if not fitting:
        _raise_nothing_fits(target, known)
    chosen = max(fitting, key=lambda f: (fitting[f], -everything.index(f)))
    judged = {t.format: t.verdict for t in run.trail if t.verdict != "skipped"}
    meets = judged[chosen] == "pass" if chosen in judged else run.judge(chosen, "fallback") == "pass"
    fits = f" that fits {_gb(target.memory_bytes)}" if target.memory_bytes else ""
    if meets:
        reason = f"nothing smaller met the target ({target.describe()}); {chosen} is the widest format{fits}"
    else:
        reason = (
            f"nothing{fits} met the target ({target.describe()}); {chosen} is the widest format{fits}, "
            "and it misses the target too"
        )
    return Decision(chosen, meets, reason, tuple(run.trail), target, dict(run.records[chosen]))


def _raise_nothing_fits(target: Target, sizes: Mapping[str, int | None]) -> None:
    known = {f: s for f, s in sizes.items() if s is not None}
    if not known:
        raise QuantscopeError(f"no format fits memory {_gb(target.memory_bytes)}: none could be measured")
    closest = min(known, key=known.__getitem__)
    raise QuantscopeError(
        f"no format fits memory {_gb(target.memory_bytes)} ({target.memory_bytes:,} bytes): the closest is "
        f"{closest} at {_gb(known[closest])} ({known[closest]:,} bytes)"
    )
