"""Choosing which modules to quantize, and swapping them for quantized modules.

A *plan* maps module names to formats: `{"model.layers.0.self_attn.q_proj": FormatSpec(...), ...}`.
Uniform formats, mixed precision and calibrated methods all end in a plan applied by :func:`apply_plan`;
calibrated methods pass the QuantizedTensors they computed instead of letting RTN compute them.

Default selection: every `nn.Linear` inside the decoder blocks (names containing `layers.<i>.`);
embeddings and `lm_head` stay at baseline precision. `include` patterns add modules, `exclude`
patterns remove them. A pattern with `*`, `?` or `[` is a glob on the full module name; otherwise it
matches as a substring (`embed`, `lm_head`, `layers.0.`, `mlp.down_proj`). A tied `lm_head` and its
embedding table are one tensor: selecting either quantizes that tensor once and both modules use it.
"""

from __future__ import annotations

import fnmatch
from typing import Iterable

from torch import nn

from ..errors import QuantscopeError
from ..formats.qtensor import QuantizedTensor, quantize_tensor
from ..formats.spec import FormatSpec
from .names import in_block
from .qmodules import QuantEmbedding, QuantLinear, TiedQuantHead



def _matches(name: str, pattern: str) -> bool:
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return pattern in name


def tied_pairs(model: nn.Module) -> dict[str, str]:
    """{lm_head name: embedding name} for output heads that share their weight with an embedding."""
    emb = {m.weight.data_ptr(): n for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
    out = {}
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear) and m.weight.data_ptr() in emb:
            out[n] = emb[m.weight.data_ptr()]
    return out


def select_modules(model: nn.Module, include: Iterable[str] = (), exclude: Iterable[str] = ()) -> list[str]:
    """Names of the modules to quantize (Linear and Embedding only), in model order."""
    include, exclude = list(include), list(exclude)
    chosen = []
    for name, m in model.named_modules():
        if not isinstance(m, (nn.Linear, nn.Embedding)):
            continue
        default = isinstance(m, nn.Linear) and in_block(name)
        picked = default or any(_matches(name, p) for p in include)
        if picked and not any(_matches(name, p) for p in exclude):
            chosen.append(name)
    for pat in include:
        if not any(_matches(n, pat) for n, _ in model.named_modules()):
            raise QuantscopeError(f"--include pattern '{pat}' matches no module of this model")
    if not chosen and not include and not exclude:
        raise QuantscopeError(f"{type(model).__name__} has no Linear layers inside decoder blocks to quantize")
    if not chosen:
        raise QuantscopeError("the --include/--exclude patterns leave no layer of this model to quantize"
                              + (f" (--exclude {' '.join(exclude)})" if exclude else ""))
    # a tied head and its embedding are one tensor: selecting either selects both
    for head, emb in tied_pairs(model).items():
        if (head in chosen) != (emb in chosen):
            chosen = [n for n in chosen if n not in (head, emb)] + [emb, head]
    return chosen


def uniform_plan(model: nn.Module, spec: FormatSpec, include: Iterable[str] = (),
                 exclude: Iterable[str] = ()) -> dict[str, FormatSpec]:
    return {n: spec for n in select_modules(model, include, exclude)}


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def apply_plan(model: nn.Module, plan: dict[str, FormatSpec],
               precomputed: dict[str, QuantizedTensor] | None = None) -> nn.Module:
    """Replace every module in `plan` by its quantized form, in place. Returns the model.

    `precomputed` holds QuantizedTensors a calibrated method already produced (by module name);
    the other modules are quantized with round-to-nearest.
    """
    precomputed = precomputed or {}
    ties = tied_pairs(model)
    modules = dict(model.named_modules())
    done_emb: dict[str, QuantEmbedding] = {}
    for name in sorted(plan, key=lambda n: n in ties):  # embeddings before their tied heads
        spec = plan[name]
        m = modules[name]
        if name in ties and ties[name] in plan:
            emb_name = ties[name]
            if emb_name not in done_emb:
                raise QuantscopeError(f"internal: tied embedding {emb_name} not quantized before {name}")
            set_module(model, name, TiedQuantHead(done_emb[emb_name]))
            continue
        qt = precomputed.get(name)
        if qt is None:
            qt = quantize_tensor(m.weight.data, spec)
        if isinstance(m, nn.Embedding):
            new = QuantEmbedding(qt, m.padding_idx)
            done_emb[name] = new
        else:
            new = QuantLinear(qt, m.bias.data if m.bias is not None else None)
        set_module(model, name, new)
        del m
    return model
