"""`quantscope sensitivity`: load a model and a text, then rank its layers by the KL divergence that
quantizing each alone causes (the measurement itself is :mod:`quantscope.methods.sensitivity`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..logs import check_threads, torch_threads
from ..methods.sensitivity import SensitivityCache, layer_sensitivity, rtn_spec
from ..quantization import resolve


@dataclass(frozen=True)
class SensitivityConfig:
    model: str = "default"  # as for compare: 'default', a local HF folder, a Hub id, a .gguf
    format: str = "int4-g128"
    unit: str = "layer"
    text: str = "python-docs"  # windows are taken from the start of this text
    windows: int = 2  # 2 x 256 tokens: a scan costs (units + 1) forward passes per window
    ctx: int = 256
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    include_embeddings: bool = False
    device: str = "auto"  # as for compare (quantscope.placement)
    dtype: str = "auto"
    trust_remote_code: bool = False
    use_cache: bool = True  # reuse a stored scan of the same model, windows, format and units
    threads: int | None = None  # torch threads for the scan (restored after it)

    def __post_init__(self):
        check_threads(self.threads)


def run_sensitivity(config: SensitivityConfig, progress: Callable[[int, int], None] | None = None
                    ) -> tuple[list[dict], dict]:
    """Load the model and text, scan, rank: (rows, meta). Errors in the inputs raise QuantscopeError."""
    from ..evaluate.text import load_text, make_windows, tokenize
    from ..model.load import cache_root, load_model

    fmt = rtn_spec(resolve(config.format).spec)
    lm = load_model(config.model, dtype=config.dtype, trust_remote_code=config.trust_remote_code,
                    device=config.device)
    text = load_text(config.text)
    windows = make_windows(tokenize(lm.tokenizer, text.text), config.ctx, config.windows, source=text.name)
    cache = (SensitivityCache(cache_root() / "sensitivity", f"{lm.info.fingerprint}|{lm.info.dtype}")
             if config.use_cache else None)
    with torch_threads(config.threads):
        rows = layer_sensitivity(lm.model, windows, fmt, config.unit, config.include, config.exclude,
                                 config.include_embeddings, cache=cache, progress=progress)
    meta = {"model": lm.info.name, "model_fingerprint": lm.info.fingerprint, "format": fmt.name,
            "unit": config.unit, "text": text.name, "text_sha256": text.sha256, "ctx": config.ctx,
            "windows": config.windows, "device": lm.info.device, "dtype": lm.info.dtype, "tokens_scored": int(windows.shape[0] * (windows.shape[1] - 1))}
    return rows, meta
