"""Weight bytes of a mixed-precision format planned from config.json alone (nothing loaded)."""

from __future__ import annotations

import math

from ..formats.registry import storage_bytes
from ..formats.spec import parse_format
from ..methods.mixed import MixedSpec
from ..modules.names import block_index
from . import planner


def mixed_weight_bytes(config: dict, spec: MixedSpec, baseline_dtype: str | None = None) -> int:
    """Stored weight bytes of a model (its config.json) in a mixed format, decoder linears selected.

    Exact for mixed-edges. For mixed-auto it is the budget's upper bound (the allocation's bytes are
    at most ``floor(bpw x params / 8)``, or the byte budget), since the plan depends on measured
    sensitivities."""
    if spec.kind == "auto" and spec.budget_bytes is not None:
        return spec.budget_bytes
    g = planner.geometry(config)
    base = planner.weight_breakdown(g, "fp32", baseline_dtype=baseline_dtype)
    other = base.other_bytes
    if spec.kind == "auto":
        return other + math.floor(spec.target_bpw * base.quantized_params / 8)
    edges = {0, g.layers - 1}
    b, w = parse_format(spec.base), parse_format(spec.wide)
    total = other
    for t in planner.model_tensors(g):
        if t.role == "linear":
            total += storage_bytes(w if block_index(t.name) in edges else b, *t.shape)
    return total
