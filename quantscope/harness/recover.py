"""`recover`: a format, the same format with LoRA adapters trained on the user's text, and the adapters
merged and requantized, measured side by side with the baseline (one comparison, one run directory).

The recovered rows are formats (``int4-g64+lora``, ``int4-g64+lora-merged``): the comparison prepares
and measures them with the code that measures every other format, pairs them with the baseline, and
:mod:`quantscope.harness.recovery` pairs each with the format before recovery (the share of the gap
won back). Training text = the comparison's calibration text, so the evaluation windows never overlap
it: the same file is cut into a training head and evaluation windows after it, another file is
checked for shared passages (refused above 2% of the evaluation's 8-token sequences).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import QuantscopeError
from ..logs import check_threads
from ..methods.recover_config import OUTCOMES, RecoverConfig, recovered_name
from ..quantization import resolve
from .config import CompareConfig
from .run import compare, default_run_dir


@dataclass(frozen=True)
class RecoverRunConfig:
    format: str  # the base format (int4-g64, nf4, gptq-int4-g64, bnb-nf4 ...)
    train: str = "python-docs"  # the training text ('python-docs', .txt or .jsonl); its head is used
    model: str = "default"
    text: str = "python-docs"  # the evaluation text
    ctx: int = 512
    windows: int = 8
    recover: RecoverConfig = field(default_factory=RecoverConfig)
    outcomes: tuple[str, ...] = ("adapter", "merged")
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    tasks: tuple[tuple, ...] = ()
    task_limit: int | None = None
    measure_speed: bool = True
    isolate: bool = True
    threads: int | None = None
    device: str = "auto"
    dtype: str = "auto"
    trust_remote_code: bool = False
    progress: bool = False

    def __post_init__(self):
        check_threads(self.threads)
        if "+lora" in self.format.lower():
            raise QuantscopeError(f"'{self.format}': give the base format (e.g. int4-g64); recover adds the +lora rows")
        if not self.outcomes:
            raise QuantscopeError("--outcomes is empty: give adapter, merged and/or merged-rtn")
        bad = [o for o in self.outcomes if o not in OUTCOMES]
        if bad:
            raise QuantscopeError(f"unknown outcome '{bad[0]}' (use {', '.join(OUTCOMES)})")

    def format_names(self) -> tuple[str, ...]:
        """The base and one recovered name per outcome (resolved: an impossible one fails here)."""
        base = resolve(self.format)
        names = [base.name]
        for outcome in self.outcomes:
            f = resolve(recovered_name(base.name, outcome, self.recover))
            if f.name not in names:
                names.append(f.name)
        return tuple(names)

    def compare_config(self) -> CompareConfig:
        c = self.recover
        # the head of the training text: every training row, plus the held-out rows at its end
        rows = c.steps * c.batch + 2
        return CompareConfig(model=self.model, formats=self.format_names(), text=self.text, ctx=self.ctx,
                             windows=self.windows, include=self.include, exclude=self.exclude, calib=self.train,
                             calib_samples=rows, calib_seqlen=c.seqlen, reserve_calib=True,
                             measure_speed=self.measure_speed, isolate=self.isolate, threads=self.threads,
                             device=self.device, dtype=self.dtype, trust_remote_code=self.trust_remote_code,
                             tasks=self.tasks, task_limit=self.task_limit, progress=self.progress)


def check_targets(config: RecoverRunConfig, inputs=None) -> None:
    """Rank against the target layers' shapes, on the model's skeleton (no weights read): a rank that
    does not fit, or targets that name no layer, fail before minutes of loading and training."""
    from ..model.checks import skeleton
    from ..model.load import load_config, resolve as resolve_model
    from ..modules.swap import select_modules

    mcfg = load_config(resolve_model(config.model)[1], config.trust_remote_code)
    model = skeleton(mcfg, config.trust_remote_code)
    if model is None:
        return
    mods = dict(model.named_modules())
    picked = [n for n in select_modules(model, config.include, config.exclude)
              if n.rpartition(".")[2] in config.recover.targets and hasattr(mods[n], "in_features")]
    if not picked:
        raise QuantscopeError(f"{config.format}: nothing to adapt: no quantized layer is named "
                              f"{', '.join(config.recover.targets)} (--targets)")
    r = config.recover.rank
    for n in picked:
        small = min(mods[n].in_features, mods[n].out_features)
        if r > small:
            raise QuantscopeError(f"--rank {r} is larger than layer {n} ({mods[n].out_features}x"
                                  f"{mods[n].in_features}): a rank-r update needs r <= {small}")


def run_recover(config: RecoverRunConfig, run_dir: str | None = None, on_record=None):
    """(records, meta, run_dir). A recovered row that failed (NaN loss, ...) is one error naming it,
    after the rows that did finish are stored."""
    from .preparation import load_inputs

    cc = config.compare_config()
    check_targets(config)
    inputs = load_inputs(cc.model, cc.text, cc.trust_remote_code)
    src, ids = inputs.tokens_of(config.train)
    if len(ids) < config.recover.seqlen:
        raise QuantscopeError(f"training text {src.name} has {len(ids)} tokens, fewer than one training sequence of "
                              f"--seqlen {config.recover.seqlen}")
    run_dir = run_dir or default_run_dir(cc)
    records, meta = compare(cc, on_record=on_record, run_dir=run_dir, inputs=inputs)
    failed = [r for r in records if r.get("error")]
    if failed:
        raise QuantscopeError(f"{failed[0]['format']}: {failed[0]['error']} (finished rows are stored in {run_dir})")
    return records, meta, run_dir
