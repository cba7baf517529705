"""Generation agreement: how a model's greedy continuations compare with the baseline's.

For each prompt the baseline's greedy continuation of N tokens is computed once (no stop at the end of
sequence, so every prompt is compared over the same length). A format's continuation is compared
token by token: exact match of all N tokens, and tokens until the first divergence (N when none).
Its mean per-token KL(baseline || format) is measured along the *baseline's* continuation, teacher
forced (one forward pass of prompt + continuation), so it does not depend on where the format drifted.
"""

from __future__ import annotations


import numpy as np
import torch

from ..measure.speed import cache_kwarg, cache_of
from ..placement import module_device
from . import stats


def _pick(logits: torch.Tensor, temperature: float, top_p: float, generator) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)  # (the seeded sampler is on the CPU)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p  # the smallest set whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


def decode(model, prompt: list[int], n: int, temperature: float = 0.0, top_p: float = 1.0, generator=None,
           on_token=None, stop=()) -> list[int]:
    """Up to `n` new tokens after `prompt` with the KV cache: greedy at temperature 0, else sampled
    (top-p). `on_token(id)` sees each token as it is made; a token in `stop` ends the generation."""
    kw = cache_kwarg(model)
    device = module_device(model)
    out_ids: list[int] = []
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([prompt], device=device), use_cache=True)
        for step in range(n):
            tok = _pick(out.logits[0, -1], temperature, top_p, generator)
            out_ids.append(tok)
            if on_token is not None:
                on_token(tok)
            if tok in stop or step == n - 1:
                break
            out = model(input_ids=torch.tensor([[tok]], device=device), use_cache=True, **{kw: cache_of(out)})
    return out_ids


def greedy_continuation(model, prompt: list[int], n: int) -> list[int]:
    return decode(model, prompt, n)


def continuation_logprobs(model, prompt: list[int], continuation: list[int]) -> torch.Tensor:
    """[len(continuation), vocab] log-probabilities of each continuation position, teacher forced."""
    ids = torch.tensor([prompt + continuation[:-1]], device=module_device(model))
    with torch.inference_mode():
        logits = model(input_ids=ids, use_cache=False).logits[0].float()
    return torch.log_softmax(logits[len(prompt) - 1:], dim=-1).cpu()  # (small: compared on the CPU)


def divergence(reference: list[int], candidate: list[int]) -> int:
    """Tokens until the first that differs (len(reference) when all agree)."""
    for i, (a, b) in enumerate(zip(reference, candidate)):
        if a != b:
            return i
    return min(len(reference), len(candidate))


def token_kld(ref_logp: torch.Tensor, logp: torch.Tensor) -> float:
    """Mean over positions of KL(reference || model)."""
    return float((ref_logp.exp() * (ref_logp - logp)).sum(-1).clamp_min(0).mean())


def compare_prompt(ref_cont: list[int], cont: list[int], ref_logp: torch.Tensor, logp: torch.Tensor) -> dict:
    d = divergence(ref_cont, cont)
    return {"exact": d == len(ref_cont), "divergence": d, "kld": token_kld(ref_logp, logp)}


def summarize(per_prompt: dict, tokens: int, kinds: list[str] | None = None, n_boot: int = 2000, seed: int = 0) -> dict:
    """Per format: exact-match rate (Wilson 95%), mean tokens to divergence and mean KLD, each with a
    paired bootstrap interval over prompts against the baseline (which agrees with itself: N and 0)."""
    exact = np.asarray(per_prompt["exact"], dtype=bool)
    div = np.asarray(per_prompt["divergence"], dtype=np.float64)
    kld = np.asarray(per_prompt["kld"], dtype=np.float64)
    n = int(exact.size)
    lo, hi = stats.wilson_interval(int(exact.sum()), n)
    dd, dlo, dhi = stats.paired_bootstrap_ci(np.full(n, float(tokens)), div, n_boot=n_boot, seed=seed)
    kd, klo, khi = stats.paired_bootstrap_ci(np.zeros(n), kld, n_boot=n_boot, seed=seed)
    out = {"prompts": n, "tokens": tokens, "exact_match": float(exact.mean()), "exact_match_ci": [lo, hi],
           "divergence_mean": float(div.mean()), "divergence_ci": [tokens + dlo, tokens + dhi],
           "divergence_delta_significant": stats.significant(dlo, dhi),
           "kld_mean": kd, "kld_ci": [klo, khi], "kld_significant": stats.significant(klo, khi)}
    if kinds:
        for kind in sorted(set(kinds)):
            sel = np.asarray([k == kind for k in kinds])
            out[f"kld_mean_{kind}"] = float(kld[sel].mean())
            out[f"exact_match_{kind}"] = float(exact[sel].mean())
    return out
