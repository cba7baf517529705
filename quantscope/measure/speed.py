"""Prefill and decode speed: greedy generation with the KV cache from a fixed prompt.

One warm-up run (a short prompt and two new tokens) first, then `repeats` timed runs of: a prefill of the
whole prompt (tokens/s = prompt tokens / seconds), and `new_tokens` single-token decode steps reusing
the cache (tokens/s = new tokens / seconds). The median over repeats is reported. This is a direct loop
over the model's forward rather than `generate`, so the figures are the model's cost, not the sampling
framework's. Speeds on a shared machine are noisy: compare them as ratios within one run.
"""

from __future__ import annotations

import inspect
import statistics
import time
from dataclasses import dataclass

import torch

from ..placement import module_device, synchronize


@dataclass(frozen=True)
class SpeedConfig:
    prompt_tokens: int = 64  # long enough that prefill is a batched matmul, short enough to be quick
    new_tokens: int = 16  # enough decode steps to average out per-step jitter
    repeats: int = 3  # median of this many timed runs


def cache_kwarg(model) -> str:
    """transformers >= 5.2x names the KV cache argument `cache` (older: `past_key_values`)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_of(out):
    return out.cache if hasattr(out, "cache") else out.past_key_values


def _greedy(model, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float, list[int]]:
    kw = cache_kwarg(model)
    device = prompt.device
    synchronize(device)
    t0 = time.perf_counter()
    out = model(input_ids=prompt, use_cache=True)
    past = cache_of(out)
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    synchronize(device)
    t1 = time.perf_counter()
    toks = [nxt]
    for _ in range(new_tokens - 1):
        out = model(input_ids=nxt, use_cache=True, **{kw: past})
        past = cache_of(out)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        toks.append(nxt)  # (int() here would wait for the device at every step)
    synchronize(device)
    t2 = time.perf_counter()
    toks = [int(t) for t in toks]
    return t1 - t0, t2 - t1, toks


def measure_speed(model, prompt_ids: torch.Tensor, cfg: SpeedConfig = SpeedConfig()) -> dict:
    """{"prefill_tokens_per_s", "decode_tokens_per_s", "generated"} for a 1-D prompt."""
    prompt = prompt_ids[: cfg.prompt_tokens].unsqueeze(0).to(module_device(model))
    if cfg.new_tokens < 2:
        raise ValueError("new_tokens must be >= 2")
    with torch.inference_mode():
        _greedy(model, prompt[:, :8], 2)
        pre, dec = [], []
        toks: list[int] = []
        for _ in range(cfg.repeats):
            a, b, toks = _greedy(model, prompt, cfg.new_tokens)
            pre.append(a)
            dec.append(b)
    return {
        "prefill_tokens_per_s": prompt.shape[1] / statistics.median(pre),
        "decode_tokens_per_s": (cfg.new_tokens - 1) / statistics.median(dec),
        "generated": toks,
    }
