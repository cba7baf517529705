"""LoRA adapters on a quantized model: injection (peft), LoftQ initialisation, merging and requantizing.

The quantized layers stay frozen and keep their dequantized forward; peft wraps each one so that
``y = base(x) + (alpha / r) * B(A(x))`` with only A and B trainable. quantscope's own
:class:`~quantscope.modules.qmodules.QuantLinear` is registered with peft as a custom module (peft's
dispatch knows nothing of it); bitsandbytes' ``Linear4bit`` is peft's native QLoRA path.

A quantized layer is read and written through two operations, :func:`dequantized` and
:func:`requantized`, so LoftQ and merging work on every format that has a LoRA path here.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..errors import QuantscopeError
from ..formats.qtensor import quantize_tensor
from ..modules.qmodules import QuantLinear
from ..modules.swap import set_module
from .recover_config import RecoverConfig

PEFT_HINT = "LoRA recovery needs peft: pip install 'quantscope[recover]' (or pip install peft)"


def import_peft():
    try:
        import peft
    except ImportError:
        raise QuantscopeError(PEFT_HINT) from None
    return peft


def _is_bnb_4bit(m: nn.Module) -> bool:
    return type(m).__name__ in ("Linear4bit", "LinearNF4", "LinearFP4") and type(m).__module__.startswith("bitsandbytes")


def adaptable(m: nn.Module) -> bool:
    """A quantized linear that LoRA can sit on here: quantscope's own, or bitsandbytes 4-bit."""
    return isinstance(m, QuantLinear) or _is_bnb_4bit(m)


def dequantized(m: nn.Module) -> torch.Tensor:
    """The weight a quantized linear computes with, [out, in] in float32."""
    if isinstance(m, QuantLinear):
        return m.dequantized_weight().float()
    if _is_bnb_4bit(m):
        import bitsandbytes.functional as F

        return F.dequantize_4bit(m.weight.data, m.weight.quant_state).float()
    raise QuantscopeError(f"internal: {type(m).__name__} is not a quantized linear with a LoRA path")


def requantized(m: nn.Module, w: torch.Tensor) -> nn.Module:
    """A new quantized linear like `m` (same format, same bias) holding `w` rounded to nearest."""
    bias = m.bias.data if getattr(m, "bias", None) is not None else None
    if isinstance(m, QuantLinear):
        return QuantLinear(quantize_tensor(w.to(torch.float32), m.spec.rtn()), bias).to(_device(m))
    from ..backends.bnb import requantize_4bit

    lin = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device=w.device, dtype=m.compute_dtype or w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
        if bias is not None:
            lin.bias.copy_(bias)
    return requantize_4bit(lin, m)


def _device(m: nn.Module) -> torch.device:
    return next(iter(m.buffers())).device


def target_layers(model: nn.Module, config: RecoverConfig, format_name: str = "this format") -> list[str]:
    """Names of the quantized linears that get adapters; refuses a model with none and a rank that
    does not fit a layer (a rank-r update of an [out, in] matrix needs r <= min(out, in))."""
    names = [n for n, m in model.named_modules() if adaptable(m) and n.rpartition(".")[2] in config.targets]
    if not names:
        have = sorted({n.rpartition(".")[2] for n, m in model.named_modules() if adaptable(m)})
        what = (f"its quantized linears are {', '.join(have)}" if have else
                "it has no quantized linear that LoRA can sit on (quantscope's own formats and bnb 4-bit have one)")
        raise QuantscopeError(f"{format_name}: nothing to adapt with targets {','.join(config.targets)}: {what}")
    mods = dict(model.named_modules())
    for n in names:
        m = mods[n]
        small = min(m.in_features, m.out_features)
        if config.rank > small:
            raise QuantscopeError(f"--rank {config.rank} is larger than layer {n} ({m.out_features}x{m.in_features}): "
                                  f"a rank-r update needs r <= {small}")
    return names


def _lora_linear_class(peft):
    from peft.tuners.lora import Linear

    class QuantLoraLinear(Linear):
        """peft's LoRA Linear over a QuantLinear (peft cannot read its in/out features itself)."""

        def _get_in_out_features(self, module):
            return module.in_features, module.out_features

    return QuantLoraLinear


def inject(model: nn.Module, config: RecoverConfig, names: list[str]) -> None:
    """Wrap the layers `names` with LoRA adapters in place (peft's inject_adapter_in_model: the model
    keeps its own type); only the adapters are trainable. A is drawn from `config.seed`, B = 0."""
    peft = import_peft()
    cfg = peft.LoraConfig(r=config.rank, lora_alpha=config.alpha, target_modules=list(names), lora_dropout=0.0,
                          bias="none", init_lora_weights=True)
    cfg._register_custom_module({QuantLinear: _lora_linear_class(peft)})
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):  # the adapters' draw leaves the caller's RNG as it was
        torch.manual_seed(config.seed)
        peft.inject_adapter_in_model(cfg, model)
    model.requires_grad_(False)
    for layer in lora_layers(model).values():  # beside their base (peft looks for a weight QuantLinear lacks)
        dev = _weight_device(layer.base_layer)
        layer.lora_A.to(dev)
        layer.lora_B.to(dev)
    for p in adapter_parameters(model):
        p.requires_grad_(True)


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """{name: peft LoRA wrapper} of every adapted layer, in model order."""
    return {n: m for n, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")
            and "default" in m.lora_A}


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for layer in lora_layers(model).values() for p in (layer.lora_A["default"].weight,
                                                                  layer.lora_B["default"].weight)]


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors by name (`<layer>.lora_A`, `<layer>.lora_B`), for a safetensors checkpoint."""
    out = {}
    for n, layer in lora_layers(model).items():
        out[f"{n}.lora_A"] = layer.lora_A["default"].weight.detach().contiguous()
        out[f"{n}.lora_B"] = layer.lora_B["default"].weight.detach().contiguous()
    return out


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    layers = lora_layers(model)
    want = {f"{n}.lora_{x}" for n in layers for x in "AB"}
    if set(state) != want:
        raise QuantscopeError(f"checkpoint adapters do not match this model ({len(set(state) ^ want)} names differ)")
    with torch.no_grad():
        for n, layer in layers.items():
            for x in "AB":
                w = getattr(layer, f"lora_{x}")["default"].weight
                w.copy_(state[f"{n}.lora_{x}"].to(w.device, w.dtype))


def delta(layer: nn.Module) -> torch.Tensor:
    """The adapter's update of the weight, scaling * B @ A, [out, in] in float32."""
    a = layer.lora_A["default"].weight.float()
    b = layer.lora_B["default"].weight.float()
    return layer.scaling["default"] * (b @ a)


def loftq(w: torch.Tensor, quantize, rank: int, scaling: float, iters: int):
    """LoftQ (Li et al. 2023, "LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large Language Models",
    arXiv:2310.08659, Algorithm 1): alternate Q_t = quantize(W - scaling * B A) and (A, B) = the
    top-`rank` SVD of W - dequant(Q_t), so that dequant(Q) + scaling * B A starts near W instead of
    B = 0 leaving the whole quantization error in place.

    `quantize(w) -> (q, dequantized w)` is the format's own round-to-nearest. Returns (q, A [r, in],
    B [out, r], ||W - dequant(Q)||_F / ||W||_F, ||W - dequant(Q) - scaling B A||_F / ||W||_F)."""
    w = w.float()
    a = torch.zeros(rank, w.shape[1], device=w.device)
    b = torch.zeros(w.shape[0], rank, device=w.device)
    for _ in range(iters):
        q, deq = quantize(w - scaling * (b @ a))
        u, s, vh = torch.linalg.svd(w - deq, full_matrices=False)
        root = (s[:rank] / scaling).sqrt()
        b, a = u[:, :rank] * root, root[:, None] * vh[:rank]
    norm = w.norm().clamp_min(1e-12)
    return q, a, b, float((w - deq).norm() / norm), float((w - deq - scaling * (b @ a)).norm() / norm)


def loftq_init(model: nn.Module, float_weights: dict[str, torch.Tensor], config: RecoverConfig) -> dict:
    """Replace every adapted layer's quantized base and its adapters by LoftQ's (in place).
    `float_weights` are the unquantized weights by layer name. Returns the relative residual norms."""
    before, after = [], []
    for name, layer in lora_layers(model).items():
        base = layer.base_layer
        w = float_weights[name].to(_device(base) if isinstance(base, QuantLinear) else base.weight.device)

        def q(x, base=base):
            new = requantized(base, x)
            return new, dequantized(new)

        new, a, b, r0, r1 = loftq(w, q, config.rank, config.scaling, config.loftq_iters)
        layer.base_layer = new
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(a)
            layer.lora_B["default"].weight.copy_(b)
        before.append(r0)
        after.append(r1)
    return {"loftq_iters": config.loftq_iters, "residual_before": sum(before) / len(before),
            "residual_after": sum(after) / len(after)}


def base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapted layers' quantized storage (own formats), for a checkpoint of LoftQ's base."""
    out = {}
    for n, layer in lora_layers(model).items():
        if isinstance(layer.base_layer, QuantLinear):
            out.update({f"{n}.{k}": t.contiguous() for k, t in layer.base_layer.storage().items()})
    return out


def load_base_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for n, layer in lora_layers(model).items():
            base = layer.base_layer
            if not isinstance(base, QuantLinear):
                raise QuantscopeError("internal: a LoftQ base checkpoint is for quantscope's own formats")
            for k, t in base.storage().items():
                t.copy_(state[f"{n}.{k}"])


def merge(model: nn.Module) -> dict[str, nn.Module]:
    """Merge every adapter into its layer's dequantized weight: each wrapper becomes a plain nn.Linear
    holding dequant(Q) + scaling * B A (float32 on the CPU, the model's dtype elsewhere), ready to be
    quantized again. Returns {name: the quantized layer it replaced} (its format, for requantizing)."""
    old = {}
    for name, layer in lora_layers(model).items():
        base = layer.base_layer
        w = dequantized(base) + delta(layer).to(_weight_device(base))
        dtype = torch.float32 if w.device.type == "cpu" else _model_dtype(model)
        lin = nn.Linear(w.shape[1], w.shape[0], bias=getattr(base, "bias", None) is not None, device=w.device,
                        dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
            if lin.bias is not None:
                lin.bias.copy_(base.bias.data)
        lin.requires_grad_(False)
        set_module(model, name, lin)
        old[name] = base
    return old


def requantize_rtn(model: nn.Module, old: dict[str, nn.Module]) -> None:
    """Round every merged layer to nearest in the format it had (own formats and bnb 4-bit)."""
    mods = dict(model.named_modules())
    for name, base in old.items():
        set_module(model, name, requantized(base, mods[name].weight.data.float()))


def _weight_device(m: nn.Module) -> torch.device:
    return _device(m) if isinstance(m, QuantLinear) else m.weight.device


def _model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


@contextlib.contextmanager
def quiet_peft():
    """peft's import prints optional backends' load failures; keep them off the user's terminal."""
    import logging
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        level = logging.getLogger("peft").level
        logging.getLogger("peft").setLevel(logging.ERROR)
        try:
            yield
        finally:
            logging.getLogger("peft").setLevel(level)


def adapter_bytes(model: nn.Module) -> int:
    return int(sum(p.numel() * p.element_size() for p in adapter_parameters(model)))

