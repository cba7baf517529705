"""Mixed-precision allocation: one format per layer, minimising predicted loss within a byte budget.

Each layer offers a few formats, each with its stored bytes and a predicted KL divergence (the KLD
that quantizing that layer alone caused, from the sensitivity scan). The predicted loss of a whole
assignment is the sum over layers -- an additive model whose error the caller reports by measuring
the result. Choosing one option per layer to minimise the sum subject to total bytes <= budget is
the multiple-choice knapsack problem.

Solver: exact dynamic programming over a discretised byte grid.

1. Every layer's smallest option is taken as its base; the DP spends the remaining budget
   ``budget - sum(base)`` on upgrades.
2. Each upgrade's extra bytes are rounded UP to whole grid units of ``q`` bytes, with ``q`` chosen
   so the grid has at most ``grid_cells`` cells. Because rounding is upwards, any assignment the DP
   accepts really fits: the budget is never exceeded (also asserted on the result).
3. When the span fits the grid (``q == 1``) the answer is the exact optimum. Otherwise it is at
   least as good as the exact optimum for the budget ``budget - n_items x (q - 1)``.
4. A greedy pass then spends the rounding slack that is left: it repeatedly applies the single
   option change with the largest loss reduction per extra byte that still fits.

Layers whose weights are tied (embedding and ``lm_head``) are one item: pass one :class:`LayerCost`
with the other names in ``tied``; its bytes are counted once and the format applies to all names.

Written here rather than with an ILP/MCKP library because it is ~60 lines of numpy, adds no
dependency, and its budget guarantee is easy to see.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from quantscope.errors import QuantscopeError


@dataclass(frozen=True)
class LayerCost:
    name: str  # module name, e.g. "model.layers.3.mlp.down_proj"
    params: int  # weights in this layer (counted once for tied layers)
    options: Mapping[str, tuple[int, float]]  # format -> (stored bytes, predicted KLD)
    tied: tuple[str, ...] = ()  # other module names sharing this weight (e.g. "lm_head")


@dataclass(frozen=True)
class Allocation:
    choices: dict[str, str]  # every module name (tied ones included) -> its format
    total_bytes: int  # stored bytes of the allocated layers, always <= budget_bytes
    budget_bytes: int
    params: int
    predicted_kld: float  # sum of the chosen options' predicted KLD
    grid_bytes: int  # DP grid quantum q (1 means the DP was exact)
    counts: dict[str, int] = field(default_factory=dict)  # format -> number of items using it

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.total_bytes / self.params

    def to_dict(self) -> dict:
        return {
            "choices": dict(self.choices),
            "total_bytes": self.total_bytes,
            "budget_bytes": self.budget_bytes,
            "params": self.params,
            "bits_per_weight": self.bits_per_weight,
            "predicted_kld": self.predicted_kld,
            "grid_bytes": self.grid_bytes,
            "counts": dict(self.counts),
        }


def _mb(n: int) -> str:
    return f"{n:,} bytes ({n / 1e6:.2f} MB)"


def _items(layers: Sequence[LayerCost], candidates: Sequence[str]) -> list[list[tuple[str, int, float]]]:
    """Per layer: its candidate options (format, bytes, kld), ascending bytes, dominated ones dropped."""
    if not layers:
        raise QuantscopeError("allocate needs at least one layer")
    if not candidates:
        raise QuantscopeError("allocate needs at least one candidate format")
    seen: set[str] = set()
    items = []
    for layer in layers:
        for name in (layer.name, *layer.tied):
            if name in seen:
                raise QuantscopeError(f"layer {name!r} appears twice (tied weights must be one LayerCost)")
            seen.add(name)
        if layer.params <= 0:
            raise QuantscopeError(f"layer {layer.name!r}: params must be positive, not {layer.params}")
        opts = []
        for fmt in dict.fromkeys(candidates):
            if fmt not in layer.options:
                continue
            nbytes, kld = layer.options[fmt]
            if int(nbytes) != nbytes or nbytes < 0 or not math.isfinite(kld):
                raise QuantscopeError(f"layer {layer.name!r}, format {fmt!r}: bad cost ({nbytes!r}, {kld!r})")
            opts.append((fmt, int(nbytes), float(kld)))
        if not opts:
            raise QuantscopeError(
                f"layer {layer.name!r} has none of the candidate formats {list(candidates)} "
                f"(it has {sorted(layer.options)})"
            )
        opts.sort(key=lambda o: (o[1], o[2]))
        kept = []  # Pareto front: each kept option is bigger and strictly better than the previous
        for o in opts:
            if not kept or o[2] < kept[-1][2]:
                kept.append(o)
        items.append(kept)
    return items


def allocate(
    layers: Sequence[LayerCost],
    candidates: Sequence[str],
    budget_bytes: int | None = None,
    target_bpw: float | None = None,
    *,
    grid_cells: int = 4096,
) -> Allocation:
    """Pick one candidate format per layer minimising the summed predicted KLD with bytes <= budget.

    Give exactly one of `budget_bytes` or `target_bpw` (bits per weight over all of `layers`:
    budget = floor(target_bpw x params / 8)). Raises QuantscopeError naming the smallest achievable
    size when even the smallest candidates do not fit.
    """
    items = _items(layers, candidates)
    params = sum(layer.params for layer in layers)
    if (budget_bytes is None) == (target_bpw is None):
        raise QuantscopeError("give exactly one of a byte budget or a target bits per weight")
    if target_bpw is not None:
        if not target_bpw > 0:
            raise QuantscopeError(f"target bits per weight must be positive, not {target_bpw}")
        budget_bytes = math.floor(target_bpw * params / 8)
    assert budget_bytes is not None
    if grid_cells < 1:
        raise QuantscopeError(f"grid_cells must be >= 1, not {grid_cells}")

    base = [opts[0][1] for opts in items]
    min_total = sum(base)
    if budget_bytes < min_total:
        raise QuantscopeError(
            f"budget {_mb(budget_bytes)} is below the smallest achievable size {_mb(min_total)} "
            f"= {8 * min_total / params:.3f} bits per weight, every layer at its smallest candidate"
        )

    extra_budget = budget_bytes - min_total
    extras = [[o[1] - b for o in opts] for opts, b in zip(items, base)]
    span = min(extra_budget, sum(e[-1] for e in extras))
    q = max(1, math.ceil(span / grid_cells))
    units = [[-(-e // q) for e in ex] for ex in extras]  # ceil: rounding up keeps the budget safe
    cap = min(extra_budget // q, sum(u[-1] for u in units))

    # dp[c]: least loss using exactly c units so far; choice[i][c]: option of item i on that path.
    dp = np.full(cap + 1, np.inf)
    dp[0] = 0.0
    choice = np.zeros((len(items), cap + 1), dtype=np.int16)
    for i, opts in enumerate(items):
        new = np.full(cap + 1, np.inf)
        for k, (u, (_, _, kld)) in enumerate(zip(units[i], opts)):
            if u > cap:
                break  # options are ascending in size
            cand = dp[: cap + 1 - u] + kld
            better = cand < new[u:]
            new[u:][better] = cand[better]
            choice[i, u:][better] = k
        dp = new
    c = int(np.argmin(dp))  # the first minimum: least units among equal losses
    picks = [0] * len(items)
    for i in range(len(items) - 1, -1, -1):
        picks[i] = int(choice[i, c])
        c -= units[i][picks[i]]
    assert c == 0

    total = sum(items[i][k][1] for i, k in enumerate(picks))
    picks = _spend_slack(items, picks, budget_bytes - total)
    total = sum(items[i][k][1] for i, k in enumerate(picks))
    if total > budget_bytes:  # cannot happen (rounded-up grid); a guard, not a fallback
        raise AssertionError(f"allocation {total} exceeds budget {budget_bytes}")

    choices: dict[str, str] = {}
    counts: dict[str, int] = {}
    for layer, opts, k in zip(layers, items, picks):
        fmt = opts[k][0]
        for name in (layer.name, *layer.tied):
            choices[name] = fmt
        counts[fmt] = counts.get(fmt, 0) + 1
    return Allocation(
        choices=choices,
        total_bytes=total,
        budget_bytes=budget_bytes,
        params=params,
        predicted_kld=float(sum(items[i][k][2] for i, k in enumerate(picks))),
        grid_bytes=q,
        counts=counts,
    )


def _spend_slack(items: list[list[tuple[str, int, float]]], picks: list[int], slack: int) -> list[int]:
    """Greedy: apply the best loss-reduction-per-byte change that fits, until none does."""
    picks = list(picks)
    while True:
        best = None
        for i, opts in enumerate(items):
            _, cur_bytes, cur_kld = opts[picks[i]]
            for k in range(picks[i] + 1, len(opts)):
                extra = opts[k][1] - cur_bytes
                gain = cur_kld - opts[k][2]
                if extra > slack:
                    break
                rate = gain / max(extra, 1)
                if gain > 0 and (best is None or rate > best[0]):
                    best = (rate, i, k, extra)
        if best is None:
            return picks
        _, i, k, extra = best
        picks[i] = k
        slack -= extra
