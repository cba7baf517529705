"""Settings of accuracy recovery (LoRA on a quantized model) and the format names that spell them.

A recovered format is a base format, ``+lora``, the outcome, and the settings that differ from
:class:`RecoverConfig`'s defaults, so a comparison can measure it like any format and a run directory
keys it by name::

    int4-g64+lora                        adapter kept beside the quantized base (QLoRA serving)
    int4-g64+lora-merged                 adapter merged into the dequantized weights, requantized
    gptq-int4-g64+lora-merged            ... requantized with GPTQ (the base's own method)
    gptq-int4-g64+lora-merged-rtn        ... requantized by round-to-nearest on the same grid
    int3-g64+lora-kd-loftq               distillation objective, LoftQ initialisation
    nf4+lora-r8-a16-s200-lr5e-4-len128-b8-seed1-tq_proj.v_proj

Options: ``-kd`` (distillation from the baseline instead of next-token loss), ``-loftq[N]`` (LoftQ
with N alternations, default 2), ``-rR`` rank, ``-aA`` alpha, ``-sN`` steps, ``-lrX`` learning rate,
``-lenL`` sequence length, ``-bB`` batch, ``-seedS``, ``-logN`` log and checkpoint every N steps,
``-tNAME.NAME`` target module names.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, fields, replace

from ..errors import QuantscopeError

OBJECTIVES = ("lm", "distill")
INITS = ("plain", "loftq")
OUTCOMES = ("adapter", "merged", "merged-rtn")
# every linear of a Llama-style block: LoRA on all of them is what QLoRA found to matter (Dettmers et al.)
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class RecoverConfig:
    """How the adapters are trained. The defaults finish on the embedded 135M model in a few minutes on
    2 CPU cores (benchmarks/recover.py measures the seconds per step) and already win back a clear part
    of the 3-4 bit gap."""

    rank: int = 16  # LoRA rank r: 16 recovers most of what 64 does at a quarter of the adapter bytes
    alpha: float = 16.0  # the update is scaled by alpha / rank (1 here: the learning rate means what it says)
    targets: tuple[str, ...] = DEFAULT_TARGETS  # leaf names of the quantized linears that get adapters
    steps: int = 32  # optimizer steps (16k tokens at the defaults: minutes on 2 cores for a 135M model)
    lr: float = 1e-3  # AdamW peak learning rate (short runs on few parameters take a high one)
    seqlen: int = 256  # tokens per training sequence
    batch: int = 2  # sequences per step (512 tokens: one step of the 135M model is seconds on 2 cores)
    seed: int = 0  # adapter initialisation and the order of training sequences
    objective: str = "lm"  # lm: next-token loss on the text; distill: KL(baseline || adapted)
    init: str = "plain"  # plain: B = 0 (the quantized model unchanged at step 0); loftq: Li et al. 2023
    loftq_iters: int = 2  # alternations of quantize / SVD of the residual (LoftQ's T)
    log_every: int = 8  # training loss and held-out KLD logged (and a checkpoint written) every N steps
    warmup: int = 4  # steps of linear learning-rate warm-up, then cosine decay to zero
    max_grad_norm: float = 1.0  # gradient clipping: one bad batch cannot throw the adapters away

    def __post_init__(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise QuantscopeError(what)

        need(self.rank >= 1, f"--rank must be at least 1, got {self.rank}")
        need(self.alpha > 0, f"--alpha must be positive, got {self.alpha}")
        need(self.steps >= 1, f"--steps must be at least 1, got {self.steps}")
        need(0 < self.lr < 1, f"--lr must be in (0, 1), got {self.lr}")
        need(self.seqlen >= 2, f"--seqlen must be at least 2, got {self.seqlen}")
        need(self.batch >= 1, f"--batch must be at least 1, got {self.batch}")
        need(self.seed >= 0, f"--seed must be 0 or more, got {self.seed}")
        need(self.objective in OBJECTIVES, f"--objective must be one of {', '.join(OBJECTIVES)}, got '{self.objective}'")
        need(self.init in INITS, f"--init must be one of {', '.join(INITS)}, got '{self.init}'")
        need(1 <= self.loftq_iters <= 20, f"LoftQ iterations must be in 1..20, got {self.loftq_iters}")
        need(self.log_every >= 1, f"--log-every must be at least 1, got {self.log_every}")
        need(self.warmup >= 0 and self.max_grad_norm > 0, "warm-up must be >= 0 and gradient clipping > 0")
        need(bool(self.targets) and all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", t) for t in self.targets),
             f"--targets must be module leaf names such as q_proj,v_proj, got {','.join(self.targets) or 'none'}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"] = list(self.targets)
        d["version"] = 1
        return d

    def training_key(self) -> str:
        """What makes two trainings the same (logging cadence aside: it does not change the adapters)."""
        d = {k: v for k, v in self.to_dict().items() if k != "log_every"}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class RecoverSpec:
    """A parsed recovered format: the base format's name, the outcome, the training settings."""

    name: str  # canonical
    base: str  # the base format's name as given (resolved by quantscope.quantization)
    outcome: str  # adapter | merged | merged-rtn
    config: RecoverConfig
    needs_calibration = True  # the harness hands it the training tokens (disjoint from the evaluation)

    def to_dict(self) -> dict:
        return {"name": self.name, "base": self.base, "outcome": self.outcome, "recover": self.config.to_dict()}


_SHORT = (("rank", "r", int), ("alpha", "a", float), ("steps", "s", int), ("lr", "lr", float),
          ("seqlen", "len", int), ("batch", "b", int), ("seed", "seed", int), ("log_every", "log", int))


def recovered_name(base: str, outcome: str, config: RecoverConfig) -> str:
    """The canonical name: options that differ from the defaults, in a fixed order."""
    d = RecoverConfig()
    name = f"{base}+lora" + ("" if outcome == "adapter" else f"-{outcome}")
    if config.objective == "distill":
        name += "-kd"
    if config.init == "loftq":
        name += "-loftq" + ("" if config.loftq_iters == d.loftq_iters else str(config.loftq_iters))
    for key, short, typ in _SHORT:
        v = getattr(config, key)
        if v != getattr(d, key):
            name += f"-{short}{_num(v) if typ is float else v}"
    if config.targets != d.targets:
        name += "-t" + ".".join(config.targets)
    return name


def _num(v: float) -> str:
    """A float without an exponent (a name is split on '-': 1e-05 would not read back)."""
    return f"{v:.10f}".rstrip("0").rstrip(".")


def parse_recovered(name: str) -> RecoverSpec:
    """`BASE+lora[-merged[-rtn]][-kd][-loftq[N]][-rR]...` -> RecoverSpec (the base is not checked here)."""
    base, sep, rest = name.strip().lower().partition("+lora")
    if not sep or not base:
        raise QuantscopeError(f"'{name}': a recovered format is BASE+lora[-options], e.g. int4-g64+lora-kd")
    kw: dict = {}
    outcome = "adapter"
    opts = [o for o in rest.split("-") if o] if rest.startswith("-") or not rest else None
    if opts is None:
        raise QuantscopeError(f"'{name}': options after +lora start with '-' (e.g. {base}+lora-merged)")
    i = 0
    if opts[:1] == ["merged"]:
        outcome, i = ("merged-rtn", 2) if opts[1:2] == ["rtn"] else ("merged", 1)
    for opt in opts[i:]:
        kw.update(_option(opt, name))
    config = RecoverConfig(**kw)
    return RecoverSpec(recovered_name(base, outcome, config), base, outcome, config)


def _option(opt: str, name: str) -> dict:
    if opt == "kd":
        return {"objective": "distill"}
    m = re.fullmatch(r"loftq(\d*)", opt)
    if m:
        return {"init": "loftq", **({"loftq_iters": int(m[1])} if m[1] else {})}
    if opt.startswith("t") and not opt.startswith("t0") and len(opt) > 1 and not opt[1].isdigit():
        return {"targets": tuple(t for t in opt[1:].split(".") if t)}
    for key, short, typ in sorted(_SHORT, key=lambda s: -len(s[1])):  # 'seed' before 's', 'lr'/'len' before none
        if opt.startswith(short):
            try:
                return {key: typ(opt[len(short):])}
            except ValueError:
                break
    raise QuantscopeError(f"unknown option '-{opt}' in recovered format '{name}' (options: merged, merged-rtn, "
                          "kd, loftq[N], rR, aA, sSTEPS, lrX, lenL, bB, seedS, logN, tNAME.NAME)")


def with_outcome(spec: RecoverSpec, outcome: str) -> RecoverSpec:
    """The same training, another outcome (the rows of one `recover` share one trained adapter)."""
    if outcome not in OUTCOMES:
        raise QuantscopeError(f"unknown outcome '{outcome}' (use {', '.join(OUTCOMES)})")
    return replace(spec, name=recovered_name(spec.base, outcome, spec.config), outcome=outcome)


def config_fields() -> tuple[str, ...]:
    return tuple(f.name for f in fields(RecoverConfig))
