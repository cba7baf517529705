"""AWQ: activation-aware per-input-channel scaling and weight clipping, then plain rounding.

The method of Lin et al., "AWQ" (2023), in the form AutoAWQ runs it for Llama-style blocks:

1. per input channel, the mean ``|x|`` of the calibration activations (:class:`ActStats`);
2. for each group of linears that read the same input, a grid search over ``alpha`` in [0, 1]
   (20 points) of the scales ``s = mean|x|^alpha`` (normalised so ``sqrt(max s * min s) = 1``),
   minimising the mean squared error of the group's outputs when ``W * s`` is rounded to nearest
   and the input divided by ``s`` (:func:`search_scales`; ``alpha = 0`` is plain RTN, so the chosen
   scales never do worse than RTN on the search tokens);
3. the scales are folded into the model (:func:`fold_scales`): the preceding RMSNorm's weight (or,
   for ``down_proj``, ``up_proj``'s output rows; for ``o_proj``, ``v_proj``'s output rows when
   ``num_kv_heads == num_heads``) is divided by ``s`` and the linears' input columns multiplied by it,
   so the float model computes exactly the same function and no runtime op is added;
4. per linear, a clipping search (:func:`search_clip`): each group's range is shrunk to
   ``r x max|w|`` for ``r`` in 1.0, 0.95, ... 0.55, keeping per (row, group) the ``r`` that minimises
   that group's output error (``r = 1`` is RTN, so never worse on the search tokens); query/key
   projections are not clipped (AutoAWQ's choice: clipping them distorts attention scores);
5. the folded, clipped weights are rounded to nearest into the integer format's packed layout
   (:func:`quantize_clipped`, via :func:`quantscope.formats.integer.from_codes`): bytes are those
   of the RTN format.

The loss in step 2 is measured on the group's own linear outputs (q, k, v together; gate and up
together), not on the attention/MLP output AutoAWQ inspects: cheaper on a CPU and needs no
architecture-specific forward. Searches run on an evenly spaced subsample of the calibration tokens
(:class:`AWQConfig`) to bound their cost; statistics use every token.

Written here rather than taken from AutoAWQ (archived, GPU-oriented) or llm-compressor (a peer to
measure against, installable beside torch 2.13 here): quantscope needs per-layer control, layer
streaming on a CPU and storage identical to its RTN integer formats.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import QuantscopeError
from ..formats import integer
from ..formats.qtensor import QuantizedTensor
from ..formats.spec import FormatSpec


@dataclass(frozen=True)
class AWQConfig:
    grid: int = 20  # alpha points in [0, 1] for the scale search (AutoAWQ: 20)
    clip_grid: int = 20  # clipping ratios step by 1/clip_grid (AutoAWQ: 20)
    max_shrink: float = 0.5  # ratios go down to 1 - max_shrink (exclusive), as AutoAWQ
    search_tokens: int = 4096  # tokens for the scale-search loss (its Gram matrix: cost tokens x in^2)
    clip_tokens: int = 4096  # tokens for the clipping loss (via per-group Gram matrices, so cheap)
    no_clip: tuple[str, ...] = ("q_proj", "k_proj")  # clipping these distorts attention scores

    def __post_init__(self) -> None:
        if self.grid < 1 or self.clip_grid < 1 or not 0.0 <= self.max_shrink < 1.0:
            raise ValueError("AWQConfig: grid >= 1, clip_grid >= 1, 0 <= max_shrink < 1")
        if self.search_tokens < 1 or self.clip_tokens < 1:
            raise ValueError("AWQConfig: token counts must be >= 1")


class ActStats:
    """Per-input-channel mean |x| over all rows seen, plus an evenly spaced sample of rows.

    `stride` keeps every stride-th row (counted across batches), at most `keep` of them."""

    def __init__(self, columns: int, keep: int, stride: int = 1):
        self.columns, self.keep, self.stride = columns, keep, max(1, stride)
        self.abs_sum = torch.zeros(columns, dtype=torch.float64)
        self.n = 0
        self._rows: list[torch.Tensor] = []
        self._kept = 0

    def add_batch(self, inp: torch.Tensor) -> None:
        x = inp.detach().reshape(-1, self.columns).float()
        if self.abs_sum.device != x.device:  # the sums live where the layer's inputs are
            self.abs_sum = self.abs_sum.to(x.device)
        self.abs_sum += x.abs().sum(0).double()  # float32 within a batch, float64 across batches
        start = (-self.n) % self.stride
        self.n += x.shape[0]
        if self._kept < self.keep:
            rows = x[start::self.stride][: self.keep - self._kept].clone()
            self._rows.append(rows)
            self._kept += rows.shape[0]

    def mean_abs(self) -> torch.Tensor:
        return (self.abs_sum / max(self.n, 1)).float()

    def sample(self) -> torch.Tensor:
        return torch.cat(self._rows) if self._rows else torch.zeros(0, self.columns, device=self.abs_sum.device)

    def rescale(self, s: torch.Tensor) -> None:
        """The input was divided by `s` (scales folded upstream): update the statistics."""
        self.abs_sum /= s.double()
        self._rows = [r / s for r in self._rows]


def _expand(p: torch.Tensor, group: int | None, in_f: int) -> torch.Tensor:
    """[out, n_groups] group parameters -> [out, in] per column."""
    g = integer.group_width(in_f, group)
    return p.float().repeat_interleave(g, dim=1)[:, :in_f]


def _groups(w: torch.Tensor, group: int | None) -> torch.Tensor:
    """[out, in] -> [out, n_groups, G]; a partial last group is padded with copies of its last
    column, which changes neither its min, its max nor its clipping range."""
    out_f, in_f = w.shape
    g = integer.group_width(in_f, group)
    pad = integer.n_groups(in_f, group) * g - in_f
    if pad:
        w = torch.cat([w, w[:, -1:].expand(out_f, pad)], dim=1)
    return w.reshape(out_f, -1, g)


def _fake_rtn_rows(flat: torch.Tensor, spec: FormatSpec) -> torch.Tensor:
    """RTN of each row of `flat` [n, G] as one group (integer.minmax_params + quantize_codes, so the
    values are exactly those the stored format dequantizes to)."""
    scales, zeros = integer.minmax_params(flat, spec.bits, spec.symmetric, None)
    codes = integer.quantize_codes(flat, scales, zeros, spec.bits, None)
    return (codes.float() - zeros.float()) * scales.float()


def _rtn_codes(w: torch.Tensor, spec: FormatSpec):
    scales, zeros = integer.minmax_params(w, spec.bits, spec.symmetric, spec.group_size)
    codes = integer.quantize_codes(w, scales, zeros, spec.bits, spec.group_size)
    return codes, scales, zeros


def fake_rtn(w: torch.Tensor, spec: FormatSpec) -> torch.Tensor:
    """Round-to-nearest in `spec`'s integer layout, returned dequantized (float32, no packing)."""
    out_f, in_f = w.shape
    wg = _groups(w.float(), spec.group_size)
    deq = _fake_rtn_rows(wg.reshape(-1, wg.shape[-1]), spec)
    return deq.reshape(out_f, -1)[:, :in_f]


@dataclass
class ScaleSearch:
    scales: torch.Tensor  # [in] float32, > 0
    alpha: float
    loss: float  # output MSE with the chosen scales
    loss_rtn: float  # output MSE of plain RTN (alpha = 0)


def search_scales(weights: list[torch.Tensor], x: torch.Tensor, act_mean: torch.Tensor,
                  spec: FormatSpec, grid: int = 20) -> ScaleSearch:
    """Grid-search ``s = act_mean^alpha`` minimising ``mean((x W'^T - x W^T)^2)`` over the stacked
    weights, where ``W' = RTN(W * s) / s``. `x` [tokens, in] are the linears' (float) inputs.

    The loss is evaluated as ``sum((E S) * E) / out`` with ``E = W' - W`` and ``S = x^T x / tokens``
    (the same number as the mean over tokens, at out x in^2 instead of tokens x in x out per alpha)."""
    W = torch.cat([w.detach().float() for w in weights])
    x = x.float()
    gram = x.t() @ x / max(x.shape[0], 1)
    base = act_mean.float().clamp_min(1e-4)
    best = None
    loss_rtn = float("nan")
    for alpha in torch.linspace(0.0, 1.0, grid).tolist() if grid > 1 else [0.0]:
        s = base.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        E = fake_rtn(W * s, spec) / s - W
        loss = ((E @ gram) * E).sum().item() / W.shape[0]
        if alpha == 0.0:
            loss_rtn = loss
        if best is None or loss < best[2]:
            best = (s, alpha, loss)
    return ScaleSearch(best[0], best[1], best[2], loss_rtn)


def search_clip(w: torch.Tensor, x: torch.Tensor, spec: FormatSpec, grid: int = 20,
                max_shrink: float = 0.5, rows_per_chunk: int = 256) -> torch.Tensor:
    """Per (row, group) clipping value ``r x max|w_group|`` minimising the group's output error on
    inputs `x` [tokens, in] after RTN. Returns ``max_val`` [out, n_groups] float32.

    A group's error ``mean_t (e . x_t)^2`` is evaluated as ``e S_g e`` with ``S_g`` the group's
    [G, G] Gram matrix of `x` (same number, G instead of tokens per weight); all ratios of a chunk
    of rows are tried in one batch of tensor ops. Ties keep the larger ratio (1.0 = no clipping)."""
    w = w.detach().float()
    out_f, in_f = w.shape
    G = integer.group_width(in_f, spec.group_size)
    ng = integer.n_groups(in_f, spec.group_size)
    pad = ng * G - in_f
    # padded input columns are zero: the padding copies of the last weight column contribute nothing
    xg = nn.functional.pad(x.float(), (0, pad)).view(-1, ng, G).transpose(0, 1)  # [ng, T, G]
    gram = xg.transpose(1, 2) @ xg / max(x.shape[0], 1)  # [ng, G, G]
    ratios = torch.tensor([1.0 - i / grid for i in range(max(1, int(max_shrink * grid)))], device=w.device)
    R = ratios.numel()
    best_val = torch.empty(out_f, ng, device=w.device)
    for r0 in range(0, out_f, rows_per_chunk):
        wg = _groups(w[r0:r0 + rows_per_chunk], spec.group_size)  # [rows, ng, G]
        rows = wg.shape[0]
        mv = ratios.view(R, 1, 1) * wg.abs().amax(-1)  # [R, rows, ng]
        lim = mv.unsqueeze(-1)
        deq = _fake_rtn_rows(torch.clamp(wg.unsqueeze(0), -lim, lim).reshape(-1, G), spec)
        e = (deq.view(R, rows, ng, G) - wg).permute(2, 0, 1, 3).reshape(ng, R * rows, G)
        err = ((e @ gram) * e).sum(-1).view(ng, R, rows)
        pick = err.argmin(1)  # [ng, rows]: first minimum, i.e. the largest ratio among ties
        best_val[r0:r0 + rows] = mv.permute(2, 0, 1).gather(1, pick.unsqueeze(1)).squeeze(1).t()
    return best_val


def quantize_clipped(w: torch.Tensor, max_val: torch.Tensor | None, spec: FormatSpec) -> QuantizedTensor:
    """Clip each group of `w` to ``[-max_val, max_val]`` (None: no clipping), round to nearest,
    and store in the integer format's packed layout."""
    w = w.detach().float()
    if max_val is not None:
        mv = _expand(max_val, spec.group_size, w.shape[1])
        w = torch.clamp(w, -mv, mv)
    codes, scales, zeros = _rtn_codes(w, spec)
    return QuantizedTensor(spec, (int(w.shape[0]), int(w.shape[1])),
                           integer.from_codes(codes, scales, zeros, spec))


@dataclass(frozen=True)
class ScaleGroup:
    """`prev`'s output channels feed the input columns of every linear in `linears` (block-local
    module names). Scales are folded by dividing `prev`'s output by s and multiplying the linears'
    input columns by s."""

    prev: str
    linears: tuple[str, ...]


_LLAMA_NEEDS = ("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                "self_attn.o_proj", "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj",
                "mlp.down_proj")


def scale_groups(block: nn.Module) -> list[ScaleGroup]:
    """The foldable groups of a Llama/Qwen2/Mistral-style decoder block, in forward order.

    ``v_proj -> o_proj`` is included only when v's output width equals o's input width
    (num_kv_heads == num_heads): with grouped-query attention one v channel feeds several o
    columns, so per-column scales cannot be folded."""
    names = {n for n, _ in block.named_modules()}
    missing = [n for n in _LLAMA_NEEDS if n not in names]
    if missing:
        raise QuantscopeError(
            f"awq: unsupported decoder block {type(block).__name__} (no {', '.join(missing)}); "
            "supported: Llama/Qwen2/Mistral-style blocks")
    v, o = block.get_submodule("self_attn.v_proj"), block.get_submodule("self_attn.o_proj")
    groups = [ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"))]
    if v.weight.shape == o.weight.shape:
        groups.append(ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",)))
    groups.append(ScaleGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")))
    groups.append(ScaleGroup("mlp.up_proj", ("mlp.down_proj",)))
    return groups


def fold_scales(block: nn.Module, group: ScaleGroup, s: torch.Tensor) -> None:
    """Fold per-channel scales `s` into `block` in place: `prev`'s output / s, linears' inputs * s.

    A norm is checked on a fixed probe to scale its output linearly in its weight (true of RMSNorm
    and LayerNorm; false of Gemma's ``(1 + w)`` norm); if it does not, the fold is undone and a
    QuantscopeError raised."""
    s = s.detach().float()
    prev = block.get_submodule(group.prev)
    bias = getattr(prev, "bias", None)
    if isinstance(prev, nn.Linear):
        prev.weight.data.div_(s.view(-1, 1).to(prev.weight.dtype))
        if bias is not None:
            bias.data.div_(s.to(bias.dtype))
    else:
        weight = getattr(prev, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.shape != s.shape:
            raise QuantscopeError(f"awq: cannot fold scales into {group.prev} ({type(prev).__name__})")
        probe = torch.randn(4, s.numel(), generator=torch.Generator().manual_seed(0)).to(weight.device, weight.dtype)
        before = prev(probe).float()
        saved = (weight.data.clone(), bias.data.clone() if bias is not None else None)
        weight.data.div_(s.to(weight.dtype))
        if bias is not None:
            bias.data.div_(s.to(bias.dtype))
        after = prev(probe).float() * s
        if not torch.allclose(after, before, rtol=1e-4, atol=1e-5):
            weight.data.copy_(saved[0])
            if bias is not None:
                bias.data.copy_(saved[1])
            raise QuantscopeError(f"awq: {group.prev} ({type(prev).__name__}) does not scale linearly "
                                  "with its weight; cannot fold AWQ scales into it")
    for name in group.linears:
        lin = block.get_submodule(name)
        lin.weight.data.mul_(s.view(1, -1).to(lin.weight.dtype))
