"""One decoder block's calibrated quantization, per method: GPTQ's true-sequential stages (on the block
run as parts, or re-run up to each stage), AWQ's scale search and folding, AWQ's clipping + rounding.

Each step fills `pre` (module name -> QuantizedTensor, installed later by the driver) and the per-layer
report `layers_rec`; the block's linears hold the quantized weights as float stand-ins meanwhile, so
later stages and the block's output pass see what the quantized model computes.
"""

from __future__ import annotations

import time

import torch

from . import awq
from .calib_capture import Stop, feed, run_all
from .calib_parts import DOWN, GATE_UP, O_PROJ, QKV, BlockParts
from .gptq import GPTQ, gptq_quantize, split_rows


def _solve_stage(block, stage, spec, acc, t0, prefix, layers_rec, pre, masters=None):
    """GPTQ-solve the linears of `stage` (stacked) from the filled accumulator; install the
    quantized weights as float stand-ins for the rest of the block's passes. `masters` holds the
    float32 weights when the block runs in a lower precision (the solve always starts from them)."""
    mods = [block.get_submodule(n) for n in stage]
    H, n_tokens = acc.hessian(), acc.n
    weights = [masters[n] if masters else m.weight.data for n, m in zip(stage, mods)]
    res = gptq_quantize(torch.cat(weights).float(), H, spec)
    sizes = [m.out_features for m in mods]
    for n, m, qt, w in zip(stage, mods, split_rows(res.qtensor, sizes), res.weight.split(sizes)):
        # equal to qt.dequantize() (in float32): later stages see quantized weights
        m.weight.data = w.to(m.weight.dtype).contiguous()
        pre[n] = qt
    secs = time.perf_counter() - t0
    for n in stage:
        layers_rec.setdefault(prefix + n, {}).update(
            method="gptq", seconds=secs, solved_with=[prefix + s for s in stage], damp=res.damp,
            fallback=res.fallback, dead_columns=res.dead_columns, hessian_tokens=n_tokens)


def gptq_parts(block, names, spec, xs, rests, prefix, layers_rec, pre, masters=None):
    """True-sequential GPTQ on a Llama-style block run as parts; leaves the block's outputs in xs."""
    p = BlockParts(block)
    sel = set(names)

    def stage_of(group):
        return [n for n in group if n in sel]

    def accumulate(stage, inputs):
        t0 = time.perf_counter()
        acc = GPTQ(block.get_submodule(stage[0]).in_features)
        for x in inputs:
            acc.add_batch(x)
        _solve_stage(block, stage, spec, acc, t0, prefix, layers_rec, pre, masters)

    if stage_of(QKV):
        accumulate(stage_of(QKV), (p.norm1(x) for x in xs))
    ctx = [p.context(x, r) for x, r in zip(xs, rests)]
    if stage_of(O_PROJ):
        accumulate(stage_of(O_PROJ), ctx)
    for j in range(len(xs)):  # xs now holds h = x + attention
        xs[j] = p.residual(xs[j], ctx[j])
        ctx[j] = None
    if stage_of(GATE_UP):
        accumulate(stage_of(GATE_UP), (p.norm2(h) for h in xs))
    if stage_of(DOWN):
        # down_proj's inputs are kept (calibration tokens x MLP width) so that the block's output
        # is h + down(a) after the solve, not a second pass through gate/up: a third less compute
        acts = [p.down_input(h) for h in xs]
        accumulate(stage_of(DOWN), acts)
        for j in range(len(xs)):
            xs[j] = p.residual_mlp(xs[j], acts[j])
            acts[j] = None
    else:
        for j in range(len(xs)):
            xs[j] = p.finish(xs[j])


def gptq_block(block, stages, spec, xs, rests, prefix, layers_rec, pre, masters=None):
    """True-sequential GPTQ on any block: per stage, re-run the block up to the stage's input."""
    for stage in stages:
        t0 = time.perf_counter()
        acc = GPTQ(block.get_submodule(stage[0]).in_features)
        feed(block, xs, rests, block.get_submodule(stage[0]), acc.add_batch)
        _solve_stage(block, stage, spec, acc, t0, prefix, layers_rec, pre, masters)


def _tokens(xs) -> int:
    return sum(x.shape[0] * x.shape[1] for x in xs)


def awq_scale(block, stages, spec, xs, rests, prefix, layers_rec, cfg: awq.AWQConfig):
    """Collect activation statistics on the float block, search and fold scales. Returns the
    per-stage statistics (rescaled to the folded model)."""
    keep = max(cfg.search_tokens, cfg.clip_tokens)
    stride = max(1, _tokens(xs) // keep)
    if stride > 1 and stride % 2 == 0:  # odd, so the sample does not keep hitting the same positions
        stride += 1  # of power-of-two-long sequences (e.g. every first token, with its outliers)
    stats = {}
    handles = []
    last = stages[-1][0]
    for stage in stages:
        mod = block.get_submodule(stage[0])
        st = stats[stage[0]] = awq.ActStats(mod.in_features, keep, stride)

        def hook(_mod, args, st=st, is_last=stage[0] == last):
            st.add_batch(args[0])
            if is_last:
                raise Stop
        handles.append(mod.register_forward_pre_hook(hook))
    try:
        run_all(block, xs, rests)
    finally:
        for h in handles:
            h.remove()
    stage_of = {n: stage[0] for stage in stages for n in stage}
    for group in awq.scale_groups(block):
        sel = [n for n in group.linears if n in stage_of]
        if not sel:
            continue
        t1 = time.perf_counter()
        st = stats[stage_of[sel[0]]]
        x = _subsample(st.sample(), cfg.search_tokens)
        res = awq.search_scales([block.get_submodule(n).weight for n in sel], x, st.mean_abs(), spec, cfg.grid)
        awq.fold_scales(block, group, res.scales)
        st.rescale(res.scales)
        for n in sel:
            layers_rec.setdefault(prefix + n, {}).update(
                awq_alpha=res.alpha, awq_loss=res.loss, awq_loss_rtn=res.loss_rtn,
                awq_scaled_with=[prefix + s for s in sel], awq_folded_into=prefix + group.prev,
                awq_search_seconds=time.perf_counter() - t1)
    return stats, stage_of


def _subsample(x: torch.Tensor, n: int) -> torch.Tensor:
    if x.shape[0] <= n:
        return x
    step = -(-x.shape[0] // n)
    return x[::step][:n]


def awq_block(block, stages, spec, xs, rests, prefix, layers_rec, pre, cfg: awq.AWQConfig):
    stats, stage_of = awq_scale(block, stages, spec, xs, rests, prefix, layers_rec, cfg)
    for n in stage_of:
        t0 = time.perf_counter()
        m = block.get_submodule(n)
        clip = n.rsplit(".", 1)[-1] not in cfg.no_clip
        mv = None
        if clip:
            x = _subsample(stats[stage_of[n]].sample(), cfg.clip_tokens)
            mv = awq.search_clip(m.weight.data, x, spec, cfg.clip_grid, cfg.max_shrink)
        qt = awq.quantize_clipped(m.weight.data, mv, spec)
        m.weight.data = qt.dequantize()  # float stand-in for the block's output pass
        pre[n] = qt
        layers_rec.setdefault(prefix + n, {}).update(method="awq", clipped=clip,
                                                     seconds=time.perf_counter() - t0)
