"""Perplexity, KL divergence and top-1 agreement from final hidden states, a chunk of tokens at a time.

The streamed path never holds a model whole, so it cannot call ``model(input_ids)``: it carries each
window's hidden states through the decoder blocks and ends here, where the model's head (final norm
and ``lm_head``, passed in as a function) turns them into log-probabilities. The same quantities as
:func:`.perplexity.score_windows`, position for position (``score_from`` as there), into the same
:class:`.perplexity.WindowScores`; logits exist for one chunk of positions at a time, for the
reference and the model side by side, so memory is bounded by the chunk, not the window or vocabulary.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from .perplexity import WindowScores

Head = Callable[[torch.Tensor], torch.Tensor]  # [tokens, hidden] -> [tokens, vocab] logits


def chunk_tokens(vocab: int, budget_bytes: int = 2**28) -> int:
    """Positions per chunk so that four float32 [chunk, vocab] arrays stay within `budget_bytes`
    (:func:`score_hidden` holds at most three: the reference's and a model's log-probabilities and one
    temporary; the fourth is the allocator's slack)."""
    return max(1, budget_bytes // (16 * max(1, vocab)))


def score_hidden(windows: torch.Tensor, score_from: int, reference: tuple[Head, list[torch.Tensor]],
                 models: list[tuple[Head, list[torch.Tensor]]], chunk: int) -> tuple[WindowScores, list[WindowScores]]:
    """Score the reference and every model from their final hidden states.

    `windows` is [n, ctx] token ids; `reference` and each of `models` are (head, hidden states per window:
    [1, ctx, hidden] or [ctx, hidden]). Returns the reference's scores (NLL only) and each model's (NLL,
    KL(reference || model), top-1 agreement)."""
    ref_head, ref_h = reference
    ref_out, outs = WindowScores(), [WindowScores() for _ in models]
    with torch.inference_mode():
        for i, w in enumerate(windows):
            targets_all = w[score_from:]
            parts_ref, parts = [], [([], [], []) for _ in models]
            for a in range(score_from - 1, w.shape[0] - 1, chunk):
                b = min(a + chunk, w.shape[0] - 1)
                href = ref_h[i].reshape(-1, ref_h[i].shape[-1])
                targets = targets_all[a - score_from + 1:b - score_from + 1].to(href.device)
                ref = torch.log_softmax(ref_head(href[a:b]).float(), dim=-1)
                parts_ref.append(_nll(ref, targets))
                for (head, hs), (nll, kld, top1) in zip(models, parts):
                    h = hs[i].reshape(-1, hs[i].shape[-1])
                    logp = torch.log_softmax(head(h[a:b]).float(), dim=-1)
                    nll.append(_nll(logp, targets))
                    top1.append((ref.argmax(-1) == logp.argmax(-1)).cpu().numpy())
                    # KL(ref || model) = sum p_ref (log p_ref - log p_model), in place over logp: at most three
                    # [chunk, vocab] arrays live (ref, logp and exp(ref))
                    kld.append(logp.neg_().add_(ref).mul_(ref.exp()).sum(-1).clamp_min(0).cpu().numpy().astype(np.float32))
                    del logp
                del ref
            ref_out.nll.append(np.concatenate(parts_ref))
            for out, (nll, kld, top1) in zip(outs, parts):
                out.nll.append(np.concatenate(nll))
                out.kld.append(np.concatenate(kld))
                out.top1.append(np.concatenate(top1))
    return ref_out, outs


def _nll(logp: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
    return (-logp.gather(1, targets[:, None]).squeeze(1)).cpu().numpy().astype(np.float32)
