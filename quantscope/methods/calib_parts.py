"""A Llama/Qwen2/Mistral-style decoder block run as its parts (norm, attention up to o_proj, residual,
norm, MLP up to down_proj), so that GPTQ's sequential stages reuse work instead of re-running the
whole block per stage; and the check that a given block may be run that way."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import QuantscopeError
from .calib_capture import input_of, run_block

# The linears of a Llama-style block, grouped by the input they read (GPTQ's sequential stages).
QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
O_PROJ, GATE_UP, DOWN = ("self_attn.o_proj",), ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)


class BlockParts:
    """A Llama/Qwen2/Mistral-style block run as its parts, so that GPTQ's sequential stages reuse
    work instead of re-running the whole block per stage (attention is computed once, not four
    times): ``h = x + o(ctx(norm1(x)))``, ``out = h + mlp(norm2(h))``. Only used after
    :func:`parts_match` has checked, on real inputs, that the parts compute the block's output."""

    def __init__(self, block: nn.Module):
        self.block = block
        self.norm1, self.attn = block.input_layernorm, block.self_attn
        self.norm2, self.mlp = block.post_attention_layernorm, block.mlp
        self.o, self.down = block.self_attn.o_proj, block.mlp.down_proj

    def context(self, x: torch.Tensor, rest) -> torch.Tensor:
        """The attention's context vectors (o_proj's input)."""
        args, kwargs = rest
        return input_of(lambda: self.attn(self.norm1(x), *args, **kwargs), self.o)

    def residual(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        return x + self.o(ctx)

    def down_input(self, h: torch.Tensor) -> torch.Tensor:
        return input_of(lambda: self.mlp(self.norm2(h)), self.down)

    def finish(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.mlp(self.norm2(h))

    def residual_mlp(self, h: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """The block's output from h and down_proj's input `a` (equal to ``finish(h)``)."""
        return h + self.down(a)


def parts_match(block: nn.Module, names: list[str], x: torch.Tensor, rest) -> bool:
    """True if `block` has the Llama layout, only its seven linears are selected, and running it
    as parts gives its own output (to 1e-5) on `x`."""
    have = {n for n, _ in block.named_modules()}
    linears = set(QKV + O_PROJ + GATE_UP + DOWN)
    if not linears <= have or not {"input_layernorm", "post_attention_layernorm", "mlp"} <= have:
        return False
    if not set(names) <= linears:
        return False
    args, kwargs = rest
    if args:  # extra positional arguments: leave it to the generic path
        return False
    try:
        p = BlockParts(block)
        h = p.residual(x, p.context(x, rest))
        mine, via_down = p.finish(h), p.residual_mlp(h, p.down_input(h))
    except (QuantscopeError, TypeError, AttributeError):
        return False
    ref = run_block(block, x, rest)
    tol = 1e-5 if x.dtype == torch.float32 else 2e-2  # the same ops either way; slack for half precision
    return all(bool(torch.allclose(m, ref, rtol=tol, atol=tol)) for m in (mine, via_down))
