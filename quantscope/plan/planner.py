"""Memory plan for a model that is never loaded: weights, KV cache and runtime overhead from config.json.

Only the Hugging Face ``config.json`` is read (Llama, Mistral, Qwen2, Qwen3 and other dense decoders
with the same layout). The model's tensors are enumerated by their state-dict names and shapes
(:func:`model_tensors`), and each is priced *exactly* as stored:

- decoder linear weights (q/k/v/o, gate/up/down) in the requested format, via
  ``storage_bytes(parse_format(name), out, in)`` (packed codes + 16-bit scales/zeros, partial last
  groups counted) -- the same definition the quantizers use, so planned and measured bytes agree;
- embeddings and ``lm_head`` at the baseline dtype (``dtype`` / ``torch_dtype`` of the config, float32
  when absent), or in ``embed_format`` when given; a tied ``lm_head`` is counted once;
- norms and biases at the baseline dtype (quantization leaves them alone).

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

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from quantscope.errors import QuantscopeError
from quantscope.formats.registry import storage_bytes
from quantscope.formats.spec import parse_format
from quantscope.plan.devices import DEVICES, GiB, Device

# Bytes per element of the dtypes a checkpoint's unquantized tensors, activations or KV cache use.
_DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "fp8-e4m3": 1, "fp8-e5m2": 1}
_DTYPE_ALIASES = {
    "float32": "fp32", "float": "fp32", "torch.float32": "fp32",
    "bfloat16": "bf16", "torch.bfloat16": "bf16",
    "float16": "fp16", "half": "fp16", "torch.float16": "fp16",
}  # fmt: skip
_MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size")


def _dtype_name(value: str, what: str) -> str:
    name = _DTYPE_ALIASES.get(str(value).lower(), str(value).lower())
    if name not in _DTYPE_BYTES:
        raise QuantscopeError(f"unsupported {what} {value!r}: use one of {', '.join(_DTYPE_BYTES)}")
    return name


@dataclass(frozen=True)
class Geometry:
    """The shape facts of a dense decoder, read from config.json."""

    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    qkv_bias: bool  # Qwen2 always; Llama/Qwen3 when attention_bias
    o_bias: bool  # Llama/Qwen3 when attention_bias (Qwen2: never)
    mlp_bias: bool
    qk_norm: bool  # Qwen3: RMSNorm over head_dim on q and k
    dtype: str  # baseline dtype of the checkpoint ("fp32" when the config names none)
    dtype_from_config: bool
    sliding_window: int | None


SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")  # dense decoders with this tensor layout


def _resolve_defaults(config: dict) -> dict:
    """config.json as transformers reads it: keys a saved config omits take their class defaults.

    ``save_pretrained`` may drop keys equal to the class default, and those defaults differ by model
    type (Mistral's ``num_key_value_heads`` is 8, Qwen3's ``head_dim`` 128), so the config class is
    the authority on what an absent key means.
    """
    from transformers import AutoConfig

    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise QuantscopeError(
            f"config.json: model_type {model_type!r} is not planned (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    try:
        resolved = AutoConfig.for_model(model_type, **{k: v for k, v in config.items() if k != "model_type"})
    except Exception as e:  # transformers' own validation of the values
        raise QuantscopeError(f"config.json: transformers rejects it ({type(e).__name__}: {e})") from None
    return resolved.to_dict()


def geometry(config: dict | Geometry) -> Geometry:
    """Read a dense decoder's shape from a config.json dict; unknown layouts and MoE models are refused."""
    if isinstance(config, Geometry):
        return config
    if "hidden_size" not in config and isinstance(config.get("text_config"), dict):
        config = config["text_config"]  # multimodal wrappers keep the language model's config here
    for key in _MOE_KEYS:
        if config.get(key):
            raise QuantscopeError(
                f"config.json has {key} = {config[key]!r}: mixture-of-experts models are not planned "
                "(only dense decoders)"
            )
    written = config
    config = _resolve_defaults(config)

    def need(key: str) -> int:
        if written.get(key) is None:  # the shape itself must be in the file, never a class default
            raise QuantscopeError(f"config.json has no {key!r}: cannot plan this model")
        value = config[key]
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise QuantscopeError(f"config.json: {key} = {value!r} is not a positive integer")
        return value

    model_type = str(config["model_type"])
    hidden, heads = need("hidden_size"), need("num_attention_heads")
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    attention_bias = bool(config.get("attention_bias", False))
    raw_dtype = written.get("dtype") or written.get("torch_dtype")
    window = config.get("sliding_window") if config.get("use_sliding_window", True) is not False else None
    return Geometry(
        model_type=model_type,
        hidden=hidden,
        intermediate=need("intermediate_size"),
        layers=need("num_hidden_layers"),
        heads=heads,
        kv_heads=int(kv_heads),
        head_dim=int(head_dim),
        vocab=need("vocab_size"),
        tied=bool(config.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2" or attention_bias,
        o_bias=attention_bias and model_type != "qwen2",
        mlp_bias=bool(config.get("mlp_bias", False)),
        qk_norm=model_type == "qwen3",
        dtype=_dtype_name(raw_dtype, "config dtype") if isinstance(raw_dtype, str) else "fp32",
        dtype_from_config=isinstance(raw_dtype, str),
        sliding_window=window if isinstance(window, int) else None,
    )


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
    base = _dtype_name(baseline_dtype, "baseline dtype") if baseline_dtype else g.dtype
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
            nbytes = t.numel * _DTYPE_BYTES[base]
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


def kv_cache_bytes(config: dict | Geometry, ctx: int, batch: int, kv_dtype: str = "bf16") -> int:
    """2 x layers x kv_heads x head_dim x ctx x batch x bytes per element."""
    g = geometry(config)
    _check_positive(ctx=ctx, batch=batch)
    return 2 * g.layers * g.kv_heads * g.head_dim * ctx * batch * _DTYPE_BYTES[_dtype_name(kv_dtype, "KV cache dtype")]


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
        _dtype_name(self.activation_dtype, "activation dtype")


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
    return per_layer * _DTYPE_BYTES[_dtype_name(assumptions.activation_dtype, "activation dtype")] + logits


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
    act_bytes = _DTYPE_BYTES[_dtype_name(assumptions.activation_dtype, "activation dtype")]
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


# ---------------------------------------------------------------------------------------------
# Reading config.json


def load_config(model_ref: str | os.PathLike) -> dict:
    """config.json of a local model directory, a path to a .json file, or a Hub id (downloaded)."""
    ref = str(model_ref)
    path = Path(ref).expanduser()
    if path.is_dir():
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise QuantscopeError(f"{path}: no config.json in this directory")
    elif path.is_file():
        if path.suffix != ".json":
            raise QuantscopeError(
                f"{path}: the planner reads config.json; pass the model directory, its config.json or a Hub id"
            )
        cfg_path = path
    elif ref.startswith((".", "/", "~")) or ref.endswith(".json") or ref.count("/") > 1 or "\\" in ref:
        raise QuantscopeError(f"{ref}: no such file or directory")
    else:  # "owner/name" (or a bare legacy name) that is not a local path: a Hub id, as transformers reads it
        cfg_path = _download_config(ref)
    return _read_config(cfg_path)


def _read_config(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise QuantscopeError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise QuantscopeError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(config, dict):
        raise QuantscopeError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def _download_config(repo_id: str) -> Path:
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub import errors as hf_errors
        from huggingface_hub.utils import validate_repo_id
    except ImportError:
        raise QuantscopeError(
            f"{repo_id!r} is not a local path; reading a Hub id needs huggingface_hub (pip install huggingface_hub)"
        ) from None
    try:
        validate_repo_id(repo_id)
    except hf_errors.HFValidationError:
        raise QuantscopeError(f"{repo_id}: no such file or directory, and not a valid Hub id") from None
    try:
        return Path(hf_hub_download(repo_id, "config.json"))
    except hf_errors.GatedRepoError:
        raise QuantscopeError(
            f"{repo_id} is gated on the Hub: accept its license there and log in (hf auth login)"
        ) from None
    except hf_errors.RepositoryNotFoundError:
        raise QuantscopeError(f"{repo_id}: not found on the Hub (or private: log in with hf auth login)") from None
    except hf_errors.LocalEntryNotFoundError:
        raise QuantscopeError(
            f"{repo_id}: cannot reach the Hub and its config.json is not in the local cache "
            "(offline? pass a local model directory instead)"
        ) from None
    except (hf_errors.EntryNotFoundError, hf_errors.RemoteEntryNotFoundError):
        raise QuantscopeError(f"{repo_id}: the Hub repository has no config.json") from None
    except (hf_errors.HfHubHTTPError, OSError) as e:
        raise QuantscopeError(f"{repo_id}: could not download config.json ({type(e).__name__}: {e})") from None
