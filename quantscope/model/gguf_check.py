"""The checks a GGUF file passes before it is renamed into place.

1. gguf-py's `GGUFReader` (an independent parser of the file) reads every tensor back: the names,
   types and shapes written, every quantized tensor's codes and fp16 scales (and Q4_1 minimums)
   bit for bit as quantscope holds them, every F32 tensor identical.
2. transformers' GGUF loader (``from_pretrained(folder, gguf_file=...)``: its own metadata parser,
   gguf-py's dequantizers, the reverse q/k permutation) rebuilds the model, and its logits on a few
   tokens must match the in-memory quantized model's: mean KL divergence at most `KLD_TOL` nats per
   token. The two differ only by float32 summation order (and Q4_1's fp16 minimum), so a wrong
   permutation, a wrong hyperparameter or a transposed tensor shows as a KLD orders of magnitude larger.

:func:`llamacpp_activation_rounding` is the one way llama.cpp's kernels compute such a file
differently: tests and benchmarks use it to compare llama.cpp's KLD with quantscope's.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import QuantscopeError
from . import gguf_blocks as gb

KLD_TOL = 1e-3  # nats per token; exact files measure ~1e-7, a wrong permutation ~1


def read_back(path: Path, plan) -> int:
    """Every planned tensor, read back by gguf-py, is what was written. Returns the tensor count."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    got = {t.name: t for t in reader.tensors}
    if set(got) != {t.name for t in plan}:
        extra, missing = set(got) - {t.name for t in plan}, {t.name for t in plan} - set(got)
        raise QuantscopeError(f"the GGUF file does not hold the tensors written (missing {sorted(missing)[:3]}, "
                              f"unexpected {sorted(extra)[:3]}): not written")
    for t in plan:
        r = got[t.name]
        shape = tuple(int(x) for x in reversed(r.shape.tolist()))  # ggml lists the fastest dimension first
        if t.blocks is not None:
            want_shape = t.blocks.codes.shape
            ok = r.tensor_type.name == t.blocks.qtype and shape == want_shape
            ok = ok and gb.same(gb.from_bytes(np.asarray(r.data), t.blocks.qtype, want_shape), t.blocks)
        else:
            ok = r.tensor_type == gguf.GGMLQuantizationType.F32 and np.array_equal(
                np.asarray(r.data).reshape(t.array.shape), t.array)
        if not ok:
            raise QuantscopeError(f"gguf-py read {t.name} back differently from what was written: not written")
    return len(plan)


def reload_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    """Logits [T, vocab] of `ids` under the model transformers' GGUF loader builds from `path`."""
    with torch.no_grad():
        return reload_model(path)(input_ids=ids.unsqueeze(0), use_cache=False).logits[0].float()


def reload_model(path: Path):
    """The model transformers' GGUF loader builds from `path` (float32, eval mode)."""
    from transformers import AutoModelForCausalLM

    from .quiet import quiet_loading as _quiet

    import functools

    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    bar = getattr(gguf_utils, "tqdm", None)  # its per-tensor bar has no switch: bound disabled for this call
    if bar is not None:
        gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        with _quiet():
            back = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise QuantscopeError(f"transformers could not load the GGUF file ({type(e).__name__}: {first}): "
                              "not written") from None
    finally:
        if bar is not None:
            gguf_utils.tqdm = bar
    return back.eval()


def compare_logits(want: torch.Tensor, got: torch.Tensor) -> tuple[float, float]:
    """(mean KL(want || got) per token in nats, max |Δ logit|)."""
    if want.shape != got.shape:
        raise QuantscopeError(f"the reloaded GGUF model gives logits of shape {tuple(got.shape)}, not "
                              f"{tuple(want.shape)}: not written")
    lp, lq = torch.log_softmax(want.double(), -1), torch.log_softmax(got.double(), -1)
    kld = float((lp.exp() * (lp - lq)).sum(-1).mean())
    return max(kld, 0.0), float((want - got).abs().max())


def require_match(kld: float, max_diff: float) -> None:
    if not kld <= KLD_TOL:
        raise QuantscopeError(f"the GGUF file, reloaded by transformers, does not reproduce the quantized model "
                              f"(KLD {kld:.3g} nats/token > {KLD_TOL:g}, max |Δ logit| {max_diff:.3g}): not written")


@contextmanager
def llamacpp_activation_rounding(model: nn.Module):
    """Within the block, every quantized linear (and tied quantized head) of `model` rounds its input as llama.cpp's CPU kernels do
    for Q8_0 / Q4_0 / Q4_1 weights, which multiply by the activations quantized to Q8_0 (blocks of 32,
    scale amax/127 stored in fp16, codes round(x / scale): ggml's ``quantize_row_q8_0``). quantscope's
    model then predicts llama.cpp's logits of the same file, which the float model does not where the
    weights' rounding is as small as the activations' (Q8_0)."""
    from ..modules.qmodules import QuantLinear, TiedQuantHead

    def pre(module, args):
        x = args[0]
        xb = x.reshape(*x.shape[:-1], -1, gb.BLOCK)
        d = xb.abs().amax(-1, keepdim=True) / 127
        q = torch.round(xb / torch.where(d > 0, d, torch.ones_like(d)))
        return ((q * d.half().to(x.dtype)).reshape(x.shape), *args[1:])

    handles = [m.register_forward_pre_hook(pre) for m in model.modules() if isinstance(m, (QuantLinear, TiedQuantHead))]
    try:
        yield model
    finally:
        for h in handles:
            h.remove()
