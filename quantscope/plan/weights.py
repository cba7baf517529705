"""Exact stored weight bytes of a model that is never loaded: its tensors enumerated by state-dict name
and shape from the config (:func:`model_tensors`), each priced as stored.

- decoder linear weights (q/k/v/o, gate/up/down) in the requested format, via
  ``storage_bytes(parse_format(name), out, in)`` (packed codes + 16-bit scales/zeros, partial last
  groups counted) -- the same definition the quantizers use, so planned and measured bytes agree;
- embeddings and ``lm_head`` at the baseline dtype (``dtype`` / ``torch_dtype`` of the config, float32
  when absent), or in ``embed_format`` when given; a tied ``lm_head`` is counted once;
- norms and biases at the baseline dtype (quantization leaves them alone).
"""

from __future__ import annotations

from dataclasses import dataclass

from quantscope.formats.registry import storage_bytes
from quantscope.formats.spec import parse_format
from quantscope.plan.geometry import DTYPE_BYTES, Geometry, dtype_name, geometry


@dataclass(frozen=True)
class TensorShape:
    name: str  # state-dict name, e.g. "model.layers.0.self_attn.q_proj.weight"
    shape: tuple[int, ...]
    role: str  # "linear" (decoder linear weight), "embedding", "lm_head", "norm" or "bias"

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def model_tensors(config: dict | Geometry) -> list[TensorShape]:
    """Every weight tensor of the model as stored, with Hugging Face state-dict names; tied head once."""
    g = geometry(config)
    q_out, kv_out = g.heads * g.head_dim, g.kv_heads * g.head_dim
    out = [TensorShape("model.embed_tokens.weight", (g.vocab, g.hidden), "embedding")]
    for i in range(g.layers):
        p = f"model.layers.{i}."
        linears = [
            ("self_attn.q_proj", q_out, g.hidden, g.qkv_bias),
            ("self_attn.k_proj", kv_out, g.hidden, g.qkv_bias),
            ("self_attn.v_proj", kv_out, g.hidden, g.qkv_bias),
            ("self_attn.o_proj", g.hidden, q_out, g.o_bias),
            ("mlp.gate_proj", g.intermediate, g.hidden, g.mlp_bias),
            ("mlp.up_proj", g.intermediate, g.hidden, g.mlp_bias),
            ("mlp.down_proj", g.hidden, g.intermediate, g.mlp_bias),
        ]
        for name, n_out, n_in, bias in linears:
            out.append(TensorShape(f"{p}{name}.weight", (n_out, n_in), "linear"))
            if bias:
                out.append(TensorShape(f"{p}{name}.bias", (n_out,), "bias"))
        if g.qk_norm:
            out.append(TensorShape(f"{p}self_attn.q_norm.weight", (g.head_dim,), "norm"))
            out.append(TensorShape(f"{p}self_attn.k_norm.weight", (g.head_dim,), "norm"))
        out.append(TensorShape(f"{p}input_layernorm.weight", (g.hidden,), "norm"))
        out.append(TensorShape(f"{p}post_attention_layernorm.weight", (g.hidden,), "norm"))
    out.append(TensorShape("model.norm.weight", (g.hidden,), "norm"))
    if not g.tied:
        out.append(TensorShape("lm_head.weight", (g.vocab, g.hidden), "lm_head"))
    return out


@dataclass(frozen=True)
class WeightBreakdown:
    total_bytes: int  # every stored tensor
    params: int  # every parameter (tied head once)
    quantized_bytes: int  # decoder linears in `format` (codes + scales + zeros)
    quantized_params: int
    other_bytes: int  # embeddings, head, norms, biases
    largest_quantized: tuple[int, int]  # (out, in) of the biggest matrix stored in a non-float format
    baseline_dtype: str


def weight_breakdown(
    config: dict | Geometry, format: str, *, embed_format: str | None = None, baseline_dtype: str | None = None
) -> WeightBreakdown:
    """Exact stored bytes of the model with its decoder linears in `format`.

    `embed_format` quantizes the embedding table and an untied ``lm_head`` too (a tied head once);
    `baseline_dtype` overrides the config's dtype for the tensors that stay unquantized (e.g. a
    checkpoint saved in bf16 but loaded in fp32).
    """
    g = geometry(config)
    base = dtype_name(baseline_dtype, "baseline dtype") if baseline_dtype else g.dtype
    spec = parse_format(format)
    embed_spec = parse_format(embed_format) if embed_format else None
    total = params = q_bytes = q_params = 0
    largest = (0, 0)
    for t in model_tensors(g):
        params += t.numel
        if t.role == "linear":
            nbytes = storage_bytes(spec, *t.shape)
            q_bytes += nbytes
            q_params += t.numel
            quantized = spec.family != "float"
        elif t.role in ("embedding", "lm_head") and embed_spec is not None:
            nbytes = storage_bytes(embed_spec, *t.shape)
            quantized = embed_spec.family != "float"
        else:
            nbytes = t.numel * DTYPE_BYTES[base]
            quantized = False
        if quantized and t.numel > largest[0] * largest[1]:
            largest = t.shape  # type: ignore[assignment]
        total += nbytes
    return WeightBreakdown(total, params, q_bytes, q_params, total - q_bytes, largest, base)


def weight_bytes_for_model_config(
    config: dict | Geometry, format: str, *, embed_format: str | None = None, baseline_dtype: str | None = None
) -> int:
    """Total stored weight bytes of the model in `format` (see :func:`weight_breakdown`)."""
    return weight_breakdown(config, format, embed_format=embed_format, baseline_dtype=baseline_dtype).total_bytes
