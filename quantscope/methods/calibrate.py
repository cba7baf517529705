"""Sequential, block-by-block calibrated quantization of a decoder model (GPTQ, AWQ, AWQ+GPTQ).

The driver around the pure algorithms of :mod:`.gptq` and :mod:`.awq`, shaped like the reference
implementations' layer loops (IST-DASLab/gptq ``llama_sequential``, AutoAWQ's ``quantize``):

1. the calibration sequences are run through the model until the first decoder block, whose inputs
   (hidden states, and the keyword arguments the model passes it: position embeddings, attention
   mask, position ids) are caught by a forward pre-hook;
2. for each decoder block in order, the selected linears are grouped into *stages* of linears that
   read the same input tensor (q/k/v, o, gate/up, down for a Llama block), found by watching one
   forward pass; then
   - GPTQ ("true sequential"): stage by stage, the stage's input Hessian is accumulated with the
     earlier stages already quantized, and the stage solved (its linears stacked: rows are
     independent given a shared Hessian). On a Llama/Qwen2/Mistral-style block, once checked on
     real inputs to reproduce the block's output, the block is run as its parts (norm, attention
     up to o_proj, residual, norm, MLP up to down_proj) so attention is computed once per block
     instead of once per stage (2.6x faster on the embedded model); any other block is re-run up
     to each stage, with a pre-hook ending the pass there;
   - AWQ: one float forward collects per-stage activation statistics; scales are searched and
     folded group by group (:func:`awq.scale_groups`), then each linear is clipped and rounded;
   - AWQ+GPTQ: AWQ's scale search and folding, then GPTQ's stages instead of clipping + RTN;
3. the block's linears are replaced by ``QuantLinear`` via ``apply_plan(precomputed=...)``, and the
   block is re-run to turn its inputs into the next block's inputs (computed by the quantized block).

Precision: the forward passes run in float32, or with ``-bf16fwd`` in bfloat16 (the reference runs its
calibration in fp16 on a GPU; on a CPU with AMX/AVX512-BF16 bfloat16 matmuls are several times faster).
In bfloat16 the block is cast for its passes only: every solve starts from the float32 weights,
Hessians are accumulated from the bfloat16 activations in float32/float64, and the block gets its
exact float32 parameters back before its linears are replaced.

Memory: the calibration activations (one hidden-state tensor per batch, overwritten in place by each
block's outputs) plus one block's statistics. Selected modules outside the decoder blocks
(embeddings, ``lm_head``) are rounded to nearest, and the report says so.

Deterministic: the same model, data and options give byte-identical packed weights (all CPU ops
used here are deterministic at a fixed thread count; the tests check it).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from ..errors import QuantscopeError
from ..formats.qtensor import QuantizedTensor
from ..formats.spec import FormatSpec
from ..modules.swap import apply_plan, select_modules
from . import awq
from .gptq import GPTQ, gptq_quantize, split_rows

_LAYERS_RE = re.compile(r"(^|\.)layers$")


@dataclass(frozen=True)
class CalibConfig:
    batch_size: int = 8  # sequences per forward pass: larger uses the cores better, holds more at once
    awq: awq.AWQConfig = field(default_factory=awq.AWQConfig)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError("CalibConfig.batch_size must be >= 1")


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the wanted input has been seen."""


class _Caught(Exception):
    def __init__(self, args: tuple, kwargs: dict):
        super().__init__()
        self.args_, self.kwargs = args, kwargs


# --- calibration data --------------------------------------------------------------------------

def _check_calib(calib) -> list[torch.Tensor]:
    if not isinstance(calib, (list, tuple)) or len(calib) == 0:
        raise QuantscopeError("calibration data is empty: need at least one token sequence")
    seqs = []
    for i, ids in enumerate(calib):
        if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32):
            raise QuantscopeError(f"calibration sample {i} is not a tensor of token ids")
        ids = ids.reshape(-1).long()
        if ids.numel() == 0:
            raise QuantscopeError(f"calibration sample {i} has no tokens")
        seqs.append(ids)
    return seqs


def _batches(seqs: list[torch.Tensor], size: int) -> list[torch.Tensor]:
    """Consecutive runs of equal-length sequences, at most `size` per batch, stacked [b, len]."""
    out, run = [], []
    for s in seqs:
        if run and (len(run) == size or run[0].numel() != s.numel()):
            out.append(torch.stack(run))
            run = []
        run.append(s)
    out.append(torch.stack(run))
    return out


# --- model structure ---------------------------------------------------------------------------

def _decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and _LAYERS_RE.search(name) and len(m) > 0:
            return name, m
    raise QuantscopeError("calibrated formats need a decoder model with a `layers` list of blocks "
                          f"(Llama/Qwen/Mistral style); {type(model).__name__} has none")


def _block_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _capture_inputs(model: nn.Module, first: nn.Module, batches: list[torch.Tensor]):
    """Inputs of the first decoder block per batch: hidden states, and (args, kwargs) for the rest.
    Keyword arguments depend only on the batch shape (no padding mask is passed), so batches of one
    shape share one dict."""
    def hook(_mod, args, kwargs):
        raise _Caught(args, kwargs)

    xs, rest, shared = [], [], {}
    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for ids in batches:
            try:
                model(input_ids=ids, use_cache=False)
            except _Caught as c:
                args, kwargs = c.args_, dict(c.kwargs)
                x = args[0] if args else kwargs.pop("hidden_states")
                for k in ("cache", "past_key_values", "past_key_value"):
                    if k in kwargs:
                        kwargs[k] = None
                xs.append(x.detach())
                rest.append(shared.setdefault(tuple(ids.shape), (tuple(args[1:]), kwargs)))
            else:
                raise QuantscopeError("internal: the first decoder block was never called")
    finally:
        handle.remove()
    return xs, rest


def _run(block: nn.Module, x: torch.Tensor, rest) -> torch.Tensor:
    args, kwargs = rest
    return _block_output(block(x, *args, **kwargs))


def _stages(block: nn.Module, names: list[str], x: torch.Tensor, rest) -> tuple[list[list[str]], list[str]]:
    """Group `names` (block-local linears) by the input tensor they read, in call order.
    Returns (stages, names never called)."""
    seen: list[tuple[str, torch.Tensor]] = []
    handles = []
    for n in names:
        def hook(_mod, args, n=n):
            if not any(m == n for m, _ in seen):
                seen.append((n, args[0]))
        handles.append(block.get_submodule(n).register_forward_pre_hook(hook))
    try:
        _run(block, x, rest)
    finally:
        for h in handles:
            h.remove()
    stages: list[tuple[torch.Tensor, list[str]]] = []
    for n, inp in seen:
        for t, members in stages:
            if t is inp:
                members.append(n)
                break
        else:
            stages.append((inp, [n]))
    called = {n for n, _ in seen}
    return [m for _, m in stages], [n for n in names if n not in called]


def _feed(block: nn.Module, xs, rests, module: nn.Module, fn: Callable[[torch.Tensor], None],
          stop: bool = True) -> None:
    """Run the block on every batch, passing `module`'s input to `fn`; stop there if `stop`."""
    def hook(_mod, args):
        fn(args[0])
        if stop:
            raise _Stop

    handle = module.register_forward_pre_hook(hook)
    try:
        for x, rest in zip(xs, rests):
            try:
                _run(block, x, rest)
            except _Stop:
                pass
    finally:
        handle.remove()


# --- a Llama-style block as parts ----------------------------------------------------------------

_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_O, _GU, _DOWN = ("self_attn.o_proj",), ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)


def _input_of(run: Callable[[], object], module: nn.Module) -> torch.Tensor:
    """`module`'s input during `run()`, which is stopped as soon as `module` is reached."""
    def hook(_mod, args):
        raise _Caught(args, {})

    handle = module.register_forward_pre_hook(hook)
    try:
        run()
    except _Caught as c:
        return c.args_[0]
    finally:
        handle.remove()
    raise QuantscopeError(f"internal: {type(module).__name__} was not reached")


class _Parts:
    """A Llama/Qwen2/Mistral-style block run as its parts, so that GPTQ's sequential stages reuse
    work instead of re-running the whole block per stage (attention is computed once, not four
    times): ``h = x + o(ctx(norm1(x)))``, ``out = h + mlp(norm2(h))``. Only used after
    :func:`_parts_match` has checked, on real inputs, that the parts compute the block's output."""

    def __init__(self, block: nn.Module):
        self.block = block
        self.norm1, self.attn = block.input_layernorm, block.self_attn
        self.norm2, self.mlp = block.post_attention_layernorm, block.mlp
        self.o, self.down = block.self_attn.o_proj, block.mlp.down_proj

    def context(self, x: torch.Tensor, rest) -> torch.Tensor:
        """The attention's context vectors (o_proj's input)."""
        args, kwargs = rest
        return _input_of(lambda: self.attn(self.norm1(x), *args, **kwargs), self.o)

    def residual(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        return x + self.o(ctx)

    def down_input(self, h: torch.Tensor) -> torch.Tensor:
        return _input_of(lambda: self.mlp(self.norm2(h)), self.down)

    def finish(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.mlp(self.norm2(h))

    def residual_mlp(self, h: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """The block's output from h and down_proj's input `a` (equal to ``finish(h)``)."""
        return h + self.down(a)


def _parts_match(block: nn.Module, names: list[str], x: torch.Tensor, rest) -> bool:
    """True if `block` has the Llama layout, only its seven linears are selected, and running it
    as parts gives its own output (to 1e-5) on `x`."""
    have = {n for n, _ in block.named_modules()}
    linears = set(_QKV + _O + _GU + _DOWN)
    if not linears <= have or not {"input_layernorm", "post_attention_layernorm", "mlp"} <= have:
        return False
    if not set(names) <= linears:
        return False
    args, kwargs = rest
    if args:  # extra positional arguments: leave it to the generic path
        return False
    try:
        p = _Parts(block)
        h = p.residual(x, p.context(x, rest))
        mine, via_down = p.finish(h), p.residual_mlp(h, p.down_input(h))
    except (QuantscopeError, TypeError, AttributeError):
        return False
    ref = _run(block, x, rest)
    tol = 1e-5 if x.dtype == torch.float32 else 2e-2  # the same ops either way; slack for half precision
    return all(bool(torch.allclose(m, ref, rtol=tol, atol=tol)) for m in (mine, via_down))


# --- per-block methods -------------------------------------------------------------------------

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


def _gptq_parts(block, names, spec, xs, rests, prefix, layers_rec, pre, masters=None):
    """True-sequential GPTQ on a Llama-style block run as parts; leaves the block's outputs in xs."""
    p = _Parts(block)
    sel = set(names)

    def stage_of(group):
        return [n for n in group if n in sel]

    def accumulate(stage, inputs):
        t0 = time.perf_counter()
        acc = GPTQ(block.get_submodule(stage[0]).in_features)
        for x in inputs:
            acc.add_batch(x)
        _solve_stage(block, stage, spec, acc, t0, prefix, layers_rec, pre, masters)

    if stage_of(_QKV):
        accumulate(stage_of(_QKV), (p.norm1(x) for x in xs))
    ctx = [p.context(x, r) for x, r in zip(xs, rests)]
    if stage_of(_O):
        accumulate(stage_of(_O), ctx)
    for j in range(len(xs)):  # xs now holds h = x + attention
        xs[j] = p.residual(xs[j], ctx[j])
        ctx[j] = None
    if stage_of(_GU):
        accumulate(stage_of(_GU), (p.norm2(h) for h in xs))
    if stage_of(_DOWN):
        # down_proj's inputs are kept (calibration tokens x MLP width) so that the block's output
        # is h + down(a) after the solve, not a second pass through gate/up: a third less compute
        acts = [p.down_input(h) for h in xs]
        accumulate(stage_of(_DOWN), acts)
        for j in range(len(xs)):
            xs[j] = p.residual_mlp(xs[j], acts[j])
            acts[j] = None
    else:
        for j in range(len(xs)):
            xs[j] = p.finish(xs[j])


def _gptq_block(block, stages, spec, xs, rests, prefix, layers_rec, pre, masters=None):
    """True-sequential GPTQ on any block: per stage, re-run the block up to the stage's input."""
    for stage in stages:
        t0 = time.perf_counter()
        acc = GPTQ(block.get_submodule(stage[0]).in_features)
        _feed(block, xs, rests, block.get_submodule(stage[0]), acc.add_batch)
        _solve_stage(block, stage, spec, acc, t0, prefix, layers_rec, pre, masters)


def _tokens(xs) -> int:
    return sum(x.shape[0] * x.shape[1] for x in xs)


def _awq_scale(block, stages, spec, xs, rests, prefix, layers_rec, cfg: awq.AWQConfig):
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
                raise _Stop
        handles.append(mod.register_forward_pre_hook(hook))
    try:
        for x, rest in zip(xs, rests):
            try:
                _run(block, x, rest)
            except _Stop:
                pass
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


def _cast_floats(obj, dtype, memo: dict):
    """`obj` (nested tuples/lists/dicts of tensors) with its floating tensors cast to `dtype`;
    objects seen before (batches of one shape share their keyword arguments) are cast once."""
    if id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, torch.Tensor):
        out = obj.to(dtype) if obj.is_floating_point() else obj
    elif isinstance(obj, (tuple, list)):
        out = type(obj)(_cast_floats(o, dtype, memo) for o in obj)
    elif isinstance(obj, dict):
        out = {k: _cast_floats(v, dtype, memo) for k, v in obj.items()}
    else:
        out = obj
    memo[id(obj)] = out
    return out


def _subsample(x: torch.Tensor, n: int) -> torch.Tensor:
    if x.shape[0] <= n:
        return x
    step = -(-x.shape[0] // n)
    return x[::step][:n]


def _awq_block(block, stages, spec, xs, rests, prefix, layers_rec, pre, cfg: awq.AWQConfig):
    stats, stage_of = _awq_scale(block, stages, spec, xs, rests, prefix, layers_rec, cfg)
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


# --- the driver --------------------------------------------------------------------------------

def quantize_calibrated(model: nn.Module, spec: FormatSpec, calib: list[torch.Tensor],
                        include: Iterable[str] = (), exclude: Iterable[str] = (),
                        progress: Callable[[int, int, str], None] | None = None,
                        config: CalibConfig | None = None) -> tuple[nn.Module, dict]:
    """Quantize the selected linears of `model` in place with `spec`'s calibrated method
    (``gptq``, ``awq`` or ``awq+gptq``), block by block on the token sequences `calib`.

    `progress(done_blocks, total_blocks, label)` is called after each block. Returns the model and
    a report: per-layer seconds, dampening, fallbacks, AWQ exponents, and totals."""
    if spec.method not in ("gptq", "awq", "awq+gptq") or spec.family != "int":
        raise QuantscopeError(f"'{spec.name}' is not a calibrated integer format (gptq-/awq-/awq+gptq-)")
    cfg = config or CalibConfig()
    seqs = _check_calib(calib)
    t_start = time.perf_counter()
    was_training = model.training
    model.eval()
    report: dict = {"format": spec.name, "method": spec.method, "calib_sequences": len(seqs),
                    "calib_tokens": int(sum(s.numel() for s in seqs)), "batch_size": cfg.batch_size,
                    "layers": {}, "blocks": [], "fallbacks": [], "rtn_modules": [], "notes": []}
    with torch.no_grad():
        names = select_modules(model, include, exclude)
        prefix, layers = _decoder_layers(model)
        if spec.method in ("awq", "awq+gptq"):
            awq.scale_groups(layers[0])  # unsupported block types fail here, before any change
        per_block: list[list[str]] = [[] for _ in layers]
        outside = []
        for n in names:
            m = re.match(re.escape(prefix) + r"\.(\d+)\.(.+)$", n)
            if m and isinstance(model.get_submodule(n), nn.Linear):
                per_block[int(m[1])].append(m[2])
            else:
                outside.append(n)
        if outside:  # first, so the blocks are calibrated on what the quantized model computes
            apply_plan(model, {n: spec.rtn() for n in outside})
            report["rtn_modules"] = outside
            report["notes"].append(f"{len(outside)} selected module(s) outside the decoder blocks "
                                   f"rounded to nearest ({spec.rtn().name}), not calibrated")
        xs, rests = _capture_inputs(model, layers[0], _batches(seqs, cfg.batch_size))
        fwd_dtype = getattr(torch, spec.calib_dtype)
        if fwd_dtype != torch.float32:
            memo: dict = {}
            xs = [x.to(fwd_dtype) for x in xs]
            rests = [_cast_floats(r, fwd_dtype, memo) for r in rests]
            report["calib_dtype"] = spec.calib_dtype
            report["notes"].append(f"calibration forward passes in {spec.calib_dtype} (weights solved from "
                                   "their float32 values, Hessians accumulated in float32/float64)")
        stage_cache: dict = {}
        for i, block in enumerate(layers):
            t0 = time.perf_counter()
            local = per_block[i]
            bprefix = f"{prefix}.{i}."
            pre: dict[str, QuantizedTensor] = {}
            saved, masters = None, None
            if fwd_dtype != torch.float32:  # float32 originals of everything the cast below rounds
                saved = {k: v for k, v in block.state_dict().items()}
                masters = {n: saved[f"{n}.weight"] for n in local}
                block.to(fwd_dtype)
            if local:
                key = (type(block), tuple(local))
                if key not in stage_cache:
                    stage_cache[key] = _stages(block, local, xs[0], rests[0])
                stages, uncalled = stage_cache[key]
                if spec.method in ("gptq", "awq+gptq") and ("parts", key) not in stage_cache:
                    stage_cache["parts", key] = _parts_match(block, local, xs[0], rests[0])
                outputs_done, path = False, "block"
                if spec.method == "awq":
                    _awq_block(block, stages, spec, xs, rests, bprefix, report["layers"], pre, cfg.awq)
                else:
                    if spec.method == "awq+gptq":
                        _awq_scale(block, stages, spec, xs, rests, bprefix, report["layers"], cfg.awq)
                    if stage_cache["parts", key]:
                        _gptq_parts(block, local, spec, xs, rests, bprefix, report["layers"], pre, masters)
                        outputs_done, path = True, "parts"
                    else:
                        _gptq_block(block, stages, spec, xs, rests, bprefix, report["layers"], pre, masters)
                for n in uncalled:
                    report["notes"].append(f"{bprefix}{n} never ran on the calibration data: rounded to nearest")
            else:
                outputs_done, path = False, "none"
            if not outputs_done:  # this block's outputs are the next block's inputs
                for j in range(len(xs)):
                    xs[j] = _run(block, xs[j], rests[j])
            if saved is not None:  # back to float32, with the exact original values
                block.to(torch.float32)
                block.load_state_dict(saved)
            if local:
                apply_plan(block, {n: spec if n in pre else spec.rtn() for n in local}, precomputed=pre)
            secs = time.perf_counter() - t0
            report["blocks"].append({"block": i, "seconds": secs, "layers": len(local), "path": path})
            if progress is not None:
                progress(i + 1, len(layers), f"block {i + 1}/{len(layers)} {secs:.1f}s")
    report["fallbacks"] = [{"layer": n, "warning": r["fallback"]}
                           for n, r in report["layers"].items() if r.get("fallback")]
    report["notes"].extend(f"{f['layer']}: {f['warning']}" for f in report["fallbacks"])
    report["total_seconds"] = time.perf_counter() - t_start
    model.train(was_training)
    return model, report
