"""`recommend` on a real model: the pure policy of :mod:`quantscope.recommend`, fed by the harness.

Each ladder step is one format measured like any comparison row, into the run directory `compare`
uses for the same settings (rows are shared both ways). The model and text are loaded and tokenized
once for the whole ladder, and weight sizes come from the planner (config.json) where it can give
them, so a format too big for the memory budget is rejected without being measured.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from ..dtypes import short_name
from ..errors import QuantscopeError
from ..recommend import DEFAULT_LADDER, Decision, Ladder, Target, recipe_ladder, recommend, scenario_target
from .config import CompareConfig
from .preparation import load_inputs, placement
from .run import compare, default_run_dir
from .worker import ReferenceStore


@dataclass(frozen=True)
class RecommendConfig:
    """A quality target (and a memory budget) checked on `compare`'s measurements."""

    compare: CompareConfig = CompareConfig()  # model, text, windows, tasks ... (its formats are ignored)
    max_ppl_increase_pct: float | None = None
    max_kld: float | None = None
    max_acc_drop_pct: float | None = None  # needs a task in compare.tasks
    memory_bytes: int | None = None
    prefer: str | None = None  # smallest | fastest (default smallest, or the scenario's)
    scenario: str | None = None  # cloud-gpu | edge | large-model-limited-hw | research
    mixed_bpw: tuple[float, ...] = (3.5, 5.0, 6.0)  # mixed-precision budgets tried
    mixed_ladder: str = "int3-g128/int4-g128/int8"
    run_dir: str | None = None  # default: the one compare uses for these settings

    def __post_init__(self):
        if self.max_acc_drop_pct is not None and not self.compare.tasks:
            raise QuantscopeError("--max-acc-drop needs --task NAME=PATH (the task whose accuracy may drop)")


def target_and_ladder(config: RecommendConfig) -> tuple[Target, Ladder]:
    """(Target, Ladder): the recipe's ladder, or a scenario's, with the given overrides."""
    from ..quantization import resolve

    baseline = short_name(placement(config.compare)[1])
    quality = {k: v for k, v in (("max_ppl_increase_pct", config.max_ppl_increase_pct),
                                 ("max_kld", config.max_kld), ("max_acc_drop_pct", config.max_acc_drop_pct))
               if v is not None}
    task = config.compare.tasks[0][0] if len(config.compare.tasks) == 1 else None
    mixed = tuple(resolve(f"mixed-auto:{b:g}:{config.mixed_ladder}").name for b in sorted(config.mixed_bpw))
    ladder = recipe_ladder(calibrated=config.compare.calib is not None, mixed=mixed, fallback=(baseline, "bf16"))
    if not config.scenario:
        return Target(**quality, task=task, memory_bytes=config.memory_bytes,
                      prefer=config.prefer or "smallest"), ladder
    overrides = dict(quality, **({"prefer": config.prefer} if config.prefer else {}))
    target, scenario_ladder = scenario_target(config.scenario, memory_bytes=config.memory_bytes, task=task,
                                              **overrides)
    if scenario_ladder is not DEFAULT_LADDER:  # e.g. research: int8 only, otherwise full precision
        ladder = replace(scenario_ladder, fallback=ladder.fallback)
    return target, ladder


def planned_sizes(model: str, dtype: str, include=(), exclude=(), note: Callable[[str], None] | None = None):
    """size_of(format) -> weight bytes from the model's config.json (planner), or None if not plannable
    (then recommend measures a format to learn its size). The planner knows the default selection
    (every decoder linear) only, so a changed selection is measured too."""
    if include or exclude:
        return None
    from ..model.load import resolve as resolve_model
    from ..plan import planner
    from ..plan.mixed import mixed_weight_bytes
    from ..quantization import resolve

    try:
        config = planner.load_config(resolve_model(model)[1])
        planner.geometry(config)
    except QuantscopeError as e:
        if note:
            note(f"weight sizes will be measured, not planned ({e})")
        return None
    base = short_name(dtype)

    def size_of(name: str) -> int:
        fmt = resolve(name)
        if fmt.kind == "mixed":
            return mixed_weight_bytes(config, fmt.spec, baseline_dtype=base)
        return planner.weight_bytes_for_model_config(config, fmt.name, baseline_dtype=base)

    return size_of


def recommend_format(config: RecommendConfig, on_record: Callable[[dict], None] | None = None,
                     note: Callable[[str], None] | None = None) -> tuple[Decision, Target, str]:
    """Walk the ladder on measured records: (decision, target, run directory). The decision and its
    trail are also stored in the run directory's metadata (`quantscope report` shows them)."""
    from ..results.store import RunStore

    target, ladder = target_and_ladder(config)
    inputs = load_inputs(config.compare.model, config.compare.text, config.compare.trust_remote_code)
    device, dtype = placement(config.compare, inputs.model_config)
    base = replace(config.compare, formats=(short_name(dtype),), device=device, dtype=dtype,
                   measure_speed=target.prefer == "fastest",
                   reserve_calib=True)  # every step on the same windows, calibrated or not
    run_dir = config.run_dir or default_run_dir(base)

    refs = ReferenceStore()  # the baseline's reference pass runs once for the whole ladder

    def measure(fmt: str) -> dict:
        records, _ = compare(replace(base, formats=(fmt,)), on_record=on_record, run_dir=run_dir, inputs=inputs,
                             refs=refs)
        return next(r for r in records if r["format"] == fmt)

    sizes = planned_sizes(base.model, base.dtype, base.include, base.exclude, note=note)
    decision = recommend(target, measure, ladder, size_of=sizes)
    with RunStore.open(run_dir) as store:
        store.update_meta({"recommendation": summary(decision, target)})
    return decision, target, run_dir


def summary(decision: Decision, target: Target) -> dict:
    steps = [{"format": t.format, "ladder_step": t.step, "passed": {"pass": True, "fail": False}.get(t.verdict),
              "reason": t.why,
              **{k: v for k, v in t.numbers.items() if k in ("weight_bytes", "perplexity", "kld_mean", "checked_upper")}}
             for t in decision.trail]
    return {"chosen": decision.chosen, "meets_target": decision.meets_target, "reason": decision.reason,
            "target": target.describe(), "steps": steps}

