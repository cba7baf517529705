"""Mixed precision: a different format per layer, named like any other format so it flows through compare.

Two kinds, parsed by :func:`parse_mixed` into a :class:`MixedSpec`:

``mixed-edges:<base>/<wide>`` (e.g. ``mixed-edges:int4-g128/int8``)
    The folklore rule: the selected linears of the first and the last decoder block in ``<wide>``,
    every other selected module in ``<base>``.

``mixed-auto:<bpw>:<f1>/<f2>/...`` (e.g. ``mixed-auto:4.5:int3-g128/int4-g128/int8``)
``mixed-auto:<size>:<f1>/<f2>/...`` (e.g. ``mixed-auto:150MB:int3-g128/int4-g128/int8``)
    Measured allocation. The KL divergence each selected layer causes alone in each ladder format is
    measured on calibration windows (:mod:`quantscope.methods.sensitivity`); the allocator
    (:func:`quantscope.methods.allocate.allocate`) picks one format per layer minimising the sum of
    those KLDs (the *predicted* KLD) with the layers' stored bytes at most ``bpw`` bits per weight
    over the selected layers -- or, given a size (``150MB`` = 150 x 10^6 bytes, ``140MiB``), with the
    whole model's weight bytes (what compare reports as ``weight_bytes``: the quantized layers plus
    everything left unquantized, measured on the loaded model) at most that size. The result is then
    measured like any format, so the record shows the predicted KLD next to the measured one.

The layers are the module selection of every format (decoder linears; ``--include embed_tokens``
adds the embedding, and a tied ``lm_head`` with it, as one item counted and quantized once), so a
mixed format's bits per weight compare directly with a uniform format's in the same run.
Every ladder format is a round-to-nearest quantscope format; the plan is applied with
:func:`quantscope.modules.swap.apply_plan`, so storage and bytes are those of the uniform formats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from ..errors import QuantscopeError
from ..formats.registry import storage_bytes
from ..formats.spec import FormatSpec, UnknownFormatError, parse_format
from ..modules.names import block_index, decoder_blocks
from .allocate import Allocation, LayerCost, allocate

__all__ = ["MixedSpec", "MixedResult", "parse_mixed", "edges_plan", "auto_plan", "quantize_mixed",
           "sensitivity_windows", "plan_bytes", "bpw_of_plan", "decoder_blocks"]

PREFIX = "mixed-"
KINDS = ("edges", "auto")
# Calibration used by mixed-auto's sensitivity scan: the first 2 windows of 256 tokens of the
# calibration tokens. A scan costs (layers x ladder formats + 1) forward passes per window, so it is
# kept small; the allocator needs the layers' relative sensitivities, not precise absolute values.
SENSITIVITY_WINDOWS = 2
SENSITIVITY_CTX = 256
_REFERENCE_SHAPE = (1536, 576)  # orders a ladder by size (the shape `quantscope formats` uses)


@dataclass(frozen=True)
class MixedSpec:
    """A parsed mixed-precision format. `name` is canonical: parse_mixed(spec.name) == spec."""

    name: str
    kind: str  # "edges" | "auto"
    base: str | None = None  # edges: format of the inner layers
    wide: str | None = None  # edges: format of the first and last decoder blocks
    target_bpw: float | None = None  # auto: bits per weight over the selected layers
    budget_bytes: int | None = None  # auto, instead of target_bpw: whole-model weight bytes
    ladder: tuple[str, ...] = ()  # auto: candidate formats, smallest first

    @property
    def needs_calibration(self) -> bool:
        """mixed-auto measures sensitivities on calibration tokens, which compare keeps apart from
        the evaluation windows."""
        return self.kind == "auto"

    def to_dict(self) -> dict:
        return {"name": self.name, "family": "mixed", "kind": self.kind, "base": self.base, "wide": self.wide,
                "target_bpw": self.target_bpw, "budget_bytes": self.budget_bytes, "ladder": list(self.ladder),
                "version": 1}


def _rtn_format(name: str, whole: str) -> FormatSpec:
    try:
        spec = parse_format(name)
    except UnknownFormatError as e:
        raise UnknownFormatError(f"in '{whole}': {e}") from None
    if spec.calibrated:
        raise UnknownFormatError(f"in '{whole}': '{spec.name}' is calibrated; mixed formats take "
                                 "round-to-nearest formats (e.g. int4-g128, nf4, int8)")
    return spec


def _bpw_text(x: float) -> str:
    short = f"{x:g}"
    return short if float(short) == x else repr(x)


def parse_mixed(name: str) -> MixedSpec:
    """Parse ``mixed-edges:<base>/<wide>`` or ``mixed-auto:<bpw>:<f1>/<f2>/...``."""
    raw, key = name, name.strip().lower()
    kind, _, rest = key[len(PREFIX):].partition(":")
    usage = "use mixed-edges:<base>/<wide> or mixed-auto:<bits per weight>:<fmt>/<fmt>/..."
    if not key.startswith(PREFIX) or kind not in KINDS or not rest:
        raise UnknownFormatError(f"unknown mixed format '{raw}': {usage}")
    if kind == "edges":
        parts = rest.split("/")
        if len(parts) != 2:
            raise UnknownFormatError(f"'{raw}': mixed-edges takes two formats, <base>/<wide>")
        base, wide = (_rtn_format(p, raw) for p in parts)
        return MixedSpec(f"mixed-edges:{base.name}/{wide.name}", "edges", base=base.name, wide=wide.name)
    bpw_text, _, ladder_text = rest.partition(":")
    bpw, size = _budget(bpw_text, raw)
    specs = {s.name: s for s in (_rtn_format(p, raw) for p in ladder_text.split("/") if p)}
    if len(specs) < 2:
        raise UnknownFormatError(f"'{raw}': mixed-auto needs a ladder of at least two formats, e.g. int4-g128/int8")
    ladder = tuple(sorted(specs, key=lambda n: (storage_bytes(specs[n], *_REFERENCE_SHAPE), n)))
    budget = _bpw_text(bpw) if size is None else size[0]
    return MixedSpec(f"mixed-auto:{budget}:{'/'.join(ladder)}", "auto", target_bpw=bpw,
                     budget_bytes=None if size is None else size[1], ladder=ladder)


def _budget(text: str, raw: str) -> tuple[float | None, tuple[str, int] | None]:
    """(bits per weight, None) for a number; (None, (canonical text, bytes)) for a size with a unit."""
    from ..units import parse_memory

    try:
        bpw = float(text)
    except ValueError:
        bpw = None
    if bpw is not None:
        if not (math.isfinite(bpw) and bpw > 0):
            raise UnknownFormatError(f"'{raw}': the target bits per weight must be a positive number, not '{text}'")
        return bpw, None
    number = text.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = _UNIT_CASE.get(text[len(number):])
    if not number or unit is None:
        raise UnknownFormatError(f"'{raw}': the budget must be bits per weight (4.5) or a size "
                                 f"(150MB, 140MiB), not '{text}'")
    try:
        nbytes = parse_memory(number + unit)
    except QuantscopeError as e:
        raise UnknownFormatError(f"'{raw}': {e}") from None
    return None, (f"{float(number):g}{unit}", nbytes)


# lower-cased (mixed names are) unit -> its usual spelling
_UNIT_CASE = {u.lower(): u for u in ("B", "KB", "MB", "GB", "TB", "KiB", "MiB", "GiB", "TiB")}


# ---------------------------------------------------------------- plans

def edges_plan(model: nn.Module, spec: MixedSpec, include: Iterable[str] = (),
               exclude: Iterable[str] = ()) -> dict[str, FormatSpec]:
    """{module: format}: the selected modules of the model's first and last decoder block in the wide
    format, every other selected module in the base format."""
    from ..modules.swap import select_modules

    if spec.kind != "edges":
        raise QuantscopeError(f"'{spec.name}' is not a mixed-edges format")
    blocks = decoder_blocks(model)
    edges = {blocks[0], blocks[-1]} if blocks else set()
    base, wide = parse_format(spec.base), parse_format(spec.wide)
    return {n: wide if block_index(n) in edges else base for n in select_modules(model, include, exclude)}


def sensitivity_windows(calib: torch.Tensor, n: int = SENSITIVITY_WINDOWS, ctx: int = SENSITIVITY_CTX) -> torch.Tensor:
    """The first `n` windows of `ctx` tokens of calibration token rows ([rows, seqlen], consecutive text)."""
    flat = calib.reshape(-1)
    ctx = min(ctx, calib.shape[-1])
    n = min(n, len(flat) // ctx)
    if n < 1 or ctx < 2:
        raise QuantscopeError(f"too few calibration tokens ({len(flat)}) for a sensitivity scan")
    return flat[: n * ctx].view(n, ctx).clone()


@dataclass
class MixedResult:
    plan: dict[str, str]  # module name -> format name (tied heads included)
    predicted_kld: float | None  # auto: sum of the chosen options' per-layer KLDs
    allocation: dict | None = None  # auto: Allocation.to_dict() without the choices
    notes: list[str] = field(default_factory=list)

    def record_fields(self) -> dict:
        """Fields a comparison record carries for a mixed format."""
        out = {"mixed_plan": dict(self.plan), "predicted_kld": self.predicted_kld}
        if self.allocation is not None:
            out["mixed_allocation"] = self.allocation
        return out


def auto_plan(model: nn.Module, spec: MixedSpec, windows: torch.Tensor, include: Iterable[str] = (),
              exclude: Iterable[str] = (), cache=None, progress: Callable[[int, int], None] | None = None
              ) -> tuple[dict[str, FormatSpec], Allocation]:
    """Measure every selected layer's sensitivity in every ladder format on `windows`, then allocate."""
    from .sensitivity import measure_sensitivity, sensitivity_units

    if spec.kind != "auto":
        raise QuantscopeError(f"'{spec.name}' is not a mixed-auto format")
    ladder = [parse_format(f) for f in spec.ladder]
    units = sensitivity_units(model, "layer", include, exclude)
    table = measure_sensitivity(model, windows, ladder, units, cache=cache, progress=progress)
    layers = []
    for i, u in enumerate(units):
        rows = {f.name: table[f.name][i] for f in ladder}
        first = rows[ladder[0].name]
        layers.append(LayerCost(name=u.modules[0], params=first["params"], tied=tuple(u.modules[1:]),
                                options={f: (r["bytes"], r["kld"]) for f, r in rows.items()}))
    if spec.budget_bytes is None:
        alloc = allocate(layers, [f.name for f in ladder], target_bpw=spec.target_bpw)
    else:
        alloc = allocate(layers, [f.name for f in ladder], budget_bytes=_layer_budget(model, spec, layers))
    return {n: parse_format(f) for n, f in alloc.choices.items()}, alloc


def _layer_budget(model: nn.Module, spec: MixedSpec, layers: list[LayerCost]) -> int:
    """The bytes the allocated layers may take so that the whole model fits `spec.budget_bytes`:
    the budget minus everything that stays as it is (measured on the model, shared tensors once)."""
    from ..measure.memory import weight_bytes

    kept = weight_bytes(model) - sum(
        model.get_submodule(layer.name).weight.nbytes for layer in layers)
    smallest = kept + sum(min(b for b, _ in layer.options.values()) for layer in layers)
    if spec.budget_bytes < smallest:
        raise QuantscopeError(
            f"{spec.name}: the whole model cannot be made smaller than {smallest:,} bytes with this "
            f"ladder ({kept:,} bytes stay unquantized, every layer at its smallest format); "
            f"the budget is {spec.budget_bytes:,}")
    return spec.budget_bytes - kept


def quantize_mixed(model: nn.Module, spec: MixedSpec, calib_windows: torch.Tensor | None = None,
                   include: Iterable[str] = (), exclude: Iterable[str] = (), cache=None,
                   progress: Callable[[int, int], None] | None = None) -> MixedResult:
    """Quantize `model` in place into a mixed format; mixed-auto needs `calib_windows` ([n, ctx] ids)."""
    from ..modules.swap import apply_plan

    if spec.kind == "edges":
        plan = edges_plan(model, spec, include, exclude)
        with torch.no_grad():
            apply_plan(model, plan)
        return MixedResult({n: f.name for n, f in plan.items()}, None,
                           notes=[f"mixed-edges: first and last decoder blocks in {spec.wide}, the rest in {spec.base}"])
    if calib_windows is None:
        raise QuantscopeError(f"'{spec.name}' measures layer sensitivities: it needs calibration tokens")
    plan, alloc = auto_plan(model, spec, calib_windows, include, exclude, cache=cache, progress=progress)
    with torch.no_grad():
        apply_plan(model, plan)
    info = alloc.to_dict()
    del info["choices"]
    n, ctx = calib_windows.shape
    notes = [f"mixed-auto: per-layer KLD of each of {', '.join(spec.ladder)} measured on {n} calibration "
             f"windows of {ctx} tokens (disjoint from the evaluation windows); allocation "
             f"{alloc.total_bytes:,} of {alloc.budget_bytes:,} bytes ({alloc.bits_per_weight:.3f} bits/weight), "
             f"{', '.join(f'{k} x{v}' for k, v in alloc.counts.items())}; predicted KLD = sum of the chosen "
             "layers' KLDs"]
    return MixedResult({n: f.name for n, f in plan.items()}, alloc.predicted_kld, info, notes)


def plan_bytes(model: nn.Module, plan: dict[str, FormatSpec]) -> int:
    """Stored bytes of the planned modules (a tied head counted once with its embedding)."""
    seen, total = set(), 0
    for name, fmt in plan.items():
        w = model.get_submodule(name).weight
        if w.data_ptr() not in seen:
            seen.add(w.data_ptr())
            total += storage_bytes(fmt, *w.shape)
    return total


def bpw_of_plan(model: nn.Module, plan: dict[str, FormatSpec]) -> float:
    """Bits per weight of a plan over its modules (tied weights once)."""
    seen, params = set(), 0
    for name in plan:
        w = model.get_submodule(name).weight
        if w.data_ptr() not in seen:
            seen.add(w.data_ptr())
            params += w.numel()
    return 8 * plan_bytes(model, plan) / params
