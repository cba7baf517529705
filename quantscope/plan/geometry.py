"""The shape of a dense decoder, read from its Hugging Face config.json (Llama, Mistral, Qwen2, Qwen3 and
others with the same layout), and the element sizes of the dtypes the planner prices.

Keys a saved config omits are resolved as transformers resolves them (the model type's config class
defaults); the shape itself must be in the file. Mixture-of-experts models are refused.
"""

from __future__ import annotations

from dataclasses import dataclass

from quantscope.dtypes import short_name
from quantscope.errors import QuantscopeError

# Bytes per element of the dtypes a checkpoint's unquantized tensors, activations or KV cache use.
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "fp8-e4m3": 1, "fp8-e5m2": 1}
_MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size")


def dtype_name(value: str, what: str) -> str:
    try:
        name = short_name(value)
    except QuantscopeError:  # fp8 names are the planner's own (KV cache in fp8)
        name = str(value).lower()
    if name not in DTYPE_BYTES:
        raise QuantscopeError(f"unsupported {what} {value!r}: use one of {', '.join(DTYPE_BYTES)}")
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
        dtype=dtype_name(raw_dtype, "config dtype") if isinstance(raw_dtype, str) else "fp32",
        dtype_from_config=isinstance(raw_dtype, str),
        sliding_window=window if isinstance(window, int) else None,
    )
