"""Perplexity and KL divergence against a reference model, streamed window by window.

For each window the model's log-probabilities of the scored positions are compared with the
reference's on the same tokens: per-token NLL, per-token KL(reference || model), and whether the two
argmaxes agree. Only per-token scalars are kept (never a vocabulary x tokens dump), so memory does not
grow with the vocabulary beyond one window's logits.

Scoring: within a window of `ctx` tokens, position t predicts token t+1. By default every token after
the window's first is scored (the usual Hugging Face recipe); with `score_from = ctx // 2` only the
second half is, the llama.cpp `perplexity` convention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..modules.qmodules import reference_products
from ..placement import module_device
from .stats import mean_stderr


@dataclass
class WindowScores:
    nll: list[np.ndarray] = field(default_factory=list)  # per window, per scored token
    kld: list[np.ndarray] = field(default_factory=list)
    top1: list[np.ndarray] = field(default_factory=list)

    @property
    def n_tokens(self) -> int:
        return int(sum(len(a) for a in self.nll))

    def summary(self) -> dict:
        nll = np.concatenate(self.nll).astype(np.float64)
        n = len(nll)
        mean, se_mean = mean_stderr(nll)
        ppl = math.exp(mean)
        out = {
            "tokens_scored": n,
            "perplexity": ppl,
            "perplexity_stderr": ppl * se_mean,  # delta method on the per-token NLL (as llama.cpp)
            "nll_mean": mean,
            # per-window sums in float64: float32 sums carry ~1e-7 relative error, which statistics built on
            # differences of near-equal sums (recovered fractions, paired deltas) would amplify
            "window_nll": [float(a.sum(dtype=np.float64)) for a in self.nll],
            "window_tokens": [int(len(a)) for a in self.nll],
        }
        if self.kld:
            kld = np.concatenate(self.kld).astype(np.float64)
            top1 = np.concatenate(self.top1)
            kld_mean, kld_se = mean_stderr(kld)
            out.update({
                "kld_mean": kld_mean,
                "kld_stderr": kld_se,
                "kld_p99": float(np.quantile(kld, 0.99)),
                "kld_median": float(np.median(kld)),
                "top1_agreement": float(top1.mean()),
                "window_kld": [float(a.sum(dtype=np.float64)) for a in self.kld],
            })
        return out


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids.unsqueeze(0), use_cache=False)
    return out.logits[0].float()


_ROWS = 16  # positions per step of _agreement: a step's three [rows, vocab] arrays stay in the CPU's caches


def _agreement(logp: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-1 agreement, KL(ref || model)) per position, KL = sum exp(ref) (ref - logp) computed in place
    over logp (its last use). Taken a few positions at a time: each position's numbers are the same
    operations in the same order as over the whole window (bit-identical), and the window's 100 MB arrays
    are not walked once per operation (30% less time for the embedded model's 49152-token vocabulary)."""
    n = logp.shape[0]
    top1 = torch.empty(n, dtype=torch.bool, device=logp.device)
    kld = torch.empty(n, dtype=logp.dtype, device=logp.device)
    step = _ROWS if logp.device.type == "cpu" else n
    for a in range(0, n, step):
        lp, r = logp[a:a + step], ref[a:a + step]
        top1[a:a + step] = r.argmax(-1) == lp.argmax(-1)
        kld[a:a + step] = lp.neg_().add_(r).mul_(r.exp()).sum(-1)
    return top1, kld.clamp_min_(0)


@reference_products()
def score_windows(model, windows: torch.Tensor, reference=None, score_from: int = 1,
                  progress=None, export=None) -> WindowScores:
    """Score [n, ctx] windows with `model`, comparing with `reference` if given.

    `reference` is either a model (its log-probabilities are computed here, window by window) or a
    callable `reference(i) -> Tensor[scored positions, vocab]` handing over log-probabilities computed
    elsewhere (the comparison harness computes the baseline's once and serves them to every format).
    `export(i, logp)`, if given, receives this model's log-probabilities of window i.
    """
    if not 1 <= score_from < windows.shape[1]:
        raise ValueError("score_from must be in [1, ctx)")
    res = WindowScores()
    with torch.inference_mode():
        device = module_device(model)
        for i, w in enumerate(windows):
            w = w.to(device)
            targets = w[score_from:]
            logp = torch.log_softmax(_logits(model, w)[score_from - 1:-1], dim=-1)
            res.nll.append((-logp.gather(1, targets[:, None]).squeeze(1)).cpu().numpy().astype(np.float32))
            if export is not None:
                export(i, logp)
            if reference is not None:
                if isinstance(reference, torch.nn.Module):
                    ref = torch.log_softmax(_logits(reference, w)[score_from - 1:-1], dim=-1)
                else:
                    ref = reference(i).to(device)
                top1, kld = _agreement(logp, ref)
                res.top1.append(top1.cpu().numpy())
                res.kld.append(kld.cpu().numpy().astype(np.float32))
                del ref
            del logp
            if progress is not None:
                progress(1)
    return res
