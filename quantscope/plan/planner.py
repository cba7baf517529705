"""Memory plan for a model that is never loaded: weights, KV cache and runtime overhead from config.json.

Only the Hugging Face ``config.json`` is read (Llama, Mistral, Qwen2, Qwen3 and other dense decoders
with the same layout): :mod:`.config` reads it, :mod:`.geometry` turns it into the model's shape. The
model's tensors are enumerated by their state-dict names and shapes (:func:`model_tensors`), and each
is priced *exactly* as stored (:mod:`.weights`). This module adds the KV cache and the runtime estimate.

KV cache: ``2 (K and V) x layers x kv_heads x head_dim x ctx x batch x bytes(kv_dtype)``, elements
only (the per-tensor scales of an fp8 cache are a few bytes per layer and are not counted). A
sliding-window model is planned for the full ``ctx`` (an upper bound; noted in the row).

Runtime overhead is an ESTIMATE, not a measurement, and is reported as such. Its parts, with the
assumptions in :class:`RuntimeAssumptions`:

- activations of one prefill forward over ``batch x ctx`` tokens. Decoder layers run one after
  another and free their intermediates, so the peak is one layer's: the residual stream and its
  normed copy (``2 x hidden``) plus the larger of the attention part (q, k, v and the attention
  output; with ``attention="eager"`` also the ``heads x ctx x ctx`` scores and probabilities) and
  the MLP part (gate, up and their product: ``3 x intermediate``), per token, in the activation
  dtype; plus float32 logits for the last position only (what generation computes);
- a dequantization workspace: quantscope's ``QuantLinear`` dequantizes its weight in ``forward``,
  so the largest quantized matrix exists once in the activation dtype (fused kernels such as
  llama.cpp's or Marlin's avoid it; set ``dequant_workspace=False`` to plan for those);
- a fixed framework allowance (CUDA context, cuBLAS workspaces, allocator slack), 1 GiB by default.

Written by hand rather than with ``accelerate``'s ``init_empty_weights`` + ``calculate_maximum_sizes``
because those count parameters at one dtype: they cannot price packed codes, per-group scales and
partial groups, which is the point here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

from quantscope.errors import QuantscopeError
from quantscope.plan.config import load_config
from quantscope.plan.devices import DEVICES, GiB, Device
from quantscope.plan.geometry import DTYPE_BYTES, SUPPORTED_MODEL_TYPES, Geometry, dtype_name, geometry
from quantscope.plan.weights import (TensorShape, WeightBreakdown, model_tensors, weight_breakdown,
                                     weight_bytes_for_model_config)

__all__ = [
    "Geometry", "PlanRow", "RuntimeAssumptions", "SUPPORTED_MODEL_TYPES", "TensorShape", "WeightBreakdown",
    "activation_bytes", "geometry", "kv_cache_bytes", "load_config", "model_tensors", "plan", "weight_breakdown",
    "weight_bytes_for_model_config",
]


def kv_cache_bytes(config: dict | Geometry, ctx: int, batch: int, kv_dtype: str = "bf16") -> int:
    """2 x layers x kv_heads x head_dim x ctx x batch x bytes per element."""
    g = geometry(config)
    _check_positive(ctx=ctx, batch=batch)
    return 2 * g.layers * g.kv_heads * g.head_dim * ctx * batch * DTYPE_BYTES[dtype_name(kv_dtype, "KV cache dtype")]


@dataclass(frozen=True)
class RuntimeAssumptions:
    """What the runtime-overhead estimate assumes; every field is a stated assumption, not a measurement."""

    # CUDA context + cuBLAS workspaces + caching-allocator slack. PyTorch's CUDA context alone is
    # commonly several hundred MiB; 1 GiB is a round allowance for all three. Override per runtime.
    framework_bytes: int = 1 * GiB
    # Dtype of activations in the forward pass (bf16/fp16 on GPUs).
    activation_dtype: str = "bf16"
    # "fused": flash / SDPA attention, no ctx x ctx matrix. "eager": scores and probabilities materialised.
    attention: str = "fused"
    # quantscope's QuantLinear dequantizes a weight per forward: the largest one exists once, unpacked.
    dequant_workspace: bool = True

    def __post_init__(self) -> None:
        if self.attention not in ("fused", "eager"):
            raise QuantscopeError(f"attention must be 'fused' or 'eager', not {self.attention!r}")
        if self.framework_bytes < 0:
            raise QuantscopeError(f"framework overhead must be >= 0, not {self.framework_bytes}")
        dtype_name(self.activation_dtype, "activation dtype")


def activation_bytes(
    config: dict | Geometry, ctx: int, batch: int, assumptions: RuntimeAssumptions = RuntimeAssumptions()
) -> int:
    """Estimated peak activation bytes of one prefill forward over batch x ctx tokens (see module doc)."""
    g = geometry(config)
    _check_positive(ctx=ctx, batch=batch)
    tokens = batch * ctx
    attn = tokens * (2 * g.heads * g.head_dim + 2 * g.kv_heads * g.head_dim)  # q, attn out, k, v
    if assumptions.attention == "eager":
        attn += 2 * batch * g.heads * ctx * ctx  # scores and softmax probabilities
    mlp = tokens * 3 * g.intermediate  # gate, up, act(gate) * up
    per_layer = tokens * 2 * g.hidden + max(attn, mlp)  # residual + normed input, plus the larger part
    logits = batch * g.vocab * 4  # float32, last position only
    return per_layer * DTYPE_BYTES[dtype_name(assumptions.activation_dtype, "activation dtype")] + logits


@dataclass(frozen=True)
class PlanRow:
    format: str
    weight_bytes: int  # exact, as stored
    quantized_bytes: int  # decoder linears only
    quantized_params: int
    bits_per_weight: float  # 8 x quantized_bytes / quantized_params
    kv_cache_bytes: int  # exact for the stated ctx, batch, kv dtype
    activation_bytes: int  # ESTIMATE (RuntimeAssumptions)
    dequant_bytes: int  # ESTIMATE: largest quantized weight unpacked in the activation dtype
    framework_bytes: int  # ASSUMED fixed allowance
    total_bytes: int
    fits: tuple[str, ...]  # device names whose usable memory holds total_bytes
    notes: tuple[str, ...]

    @property
    def overhead_bytes(self) -> int:
        """The estimated part: activations + dequantization workspace + framework allowance."""
        return self.activation_bytes + self.dequant_bytes + self.framework_bytes

    def to_dict(self) -> dict:
        d = asdict(self)
        d["fits"], d["notes"] = list(self.fits), list(self.notes)
        d["overhead_bytes"] = self.overhead_bytes
        return d


def plan(
    config: dict | Geometry,
    formats: Sequence[str],
    ctx: int,
    batch: int,
    kv_dtype: str = "bf16",
    embed_format: str | None = None,
    devices: Sequence[Device] = DEVICES,
    assumptions: RuntimeAssumptions = RuntimeAssumptions(),
) -> list[PlanRow]:
    """One :class:`PlanRow` per format: exact weights and KV cache, estimated overhead, devices that fit."""
    g = geometry(config)
    if not formats:
        raise QuantscopeError("plan needs at least one format")
    kv = kv_cache_bytes(g, ctx, batch, kv_dtype)
    act = activation_bytes(g, ctx, batch, assumptions)
    act_bytes = DTYPE_BYTES[dtype_name(assumptions.activation_dtype, "activation dtype")]
    notes: list[str] = []
    if not g.dtype_from_config:
        notes.append("config.json names no dtype: unquantized tensors counted as float32")
    if g.sliding_window and g.sliding_window < ctx:
        notes.append(f"sliding window {g.sliding_window} < ctx: KV cache planned for the full ctx (upper bound)")
    rows = []
    for fmt in formats:
        w = weight_breakdown(g, fmt, embed_format=embed_format)
        out_f, in_f = w.largest_quantized
        dequant = out_f * in_f * act_bytes if assumptions.dequant_workspace else 0
        total = w.total_bytes + kv + act + dequant + assumptions.framework_bytes
        rows.append(
            PlanRow(
                format=fmt,
                weight_bytes=w.total_bytes,
                quantized_bytes=w.quantized_bytes,
                quantized_params=w.quantized_params,
                bits_per_weight=8 * w.quantized_bytes / w.quantized_params,
                kv_cache_bytes=kv,
                activation_bytes=act,
                dequant_bytes=dequant,
                framework_bytes=assumptions.framework_bytes,
                total_bytes=total,
                fits=tuple(d.name for d in devices if total <= d.usable_bytes),
                notes=tuple(notes),
            )
        )
    return rows


def _check_positive(**values: int) -> None:
    for key, value in values.items():
        if not isinstance(value, int) or value <= 0:
            raise QuantscopeError(f"{key} must be a positive integer, not {value!r}")
