"""Log-likelihood scoring of a task's items, as lm-eval (v0.4) scores them.

- tokenisation, lm-eval's causal method: trailing spaces of the context move to the continuation;
  ``whole = encode(context + continuation)``, ``ctx = encode(context)``, continuation tokens are
  ``whole[len(ctx):]``. ``encode`` is ``tokenizer.encode(text)`` with the tokenizer's own default for
  special tokens (lm-eval 0.4.13's default): no BOS unless the tokenizer adds one itself.
- scores: ``acc`` = argmax of summed continuation log-likelihoods; ``acc_norm`` = argmax of the
  log-likelihood divided by the choice's length in characters (without the leading delimiter);
  LAMBADA ``acc`` = every target token is the greedy argmax, perplexity = ``exp(mean target NLL)``
  over items (lm-eval's ``perplexity`` aggregation: per item, not per token).
- inputs longer than the model's ``max_position_embeddings`` are truncated from the left.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from quantscope.errors import QuantscopeError
from quantscope.evaluate.tasks.items import CLOZE, Task, TaskScores
from quantscope.modules.qmodules import reference_products
from quantscope.placement import module_device


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text))


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's causal ``_encode_pair``: encode the whole string and split at len(encode(context)).

    An empty context is replaced by the BOS (else EOS) token, as lm-eval's ``prefix_token_id``.
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    if not context:
        prefix = getattr(tokenizer, "bos_token_id", None)
        if prefix is None:
            prefix = getattr(tokenizer, "eos_token_id", None)
        if prefix is None:
            raise QuantscopeError("empty context and the tokenizer has neither a BOS nor an EOS token")
        return [prefix], _encode(tokenizer, continuation)
    whole = _encode(tokenizer, context + continuation)
    ctx = _encode(tokenizer, context)
    return ctx, whole[len(ctx) :]


@dataclass
class _Row:
    """One distinct model input; several requests (choices) may read their scores from it."""

    tokens: list[int]
    requests: list[tuple[int, list[int]]] = field(default_factory=list)  # (request index, continuation tokens)


def _max_length(model: torch.nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "n_ctx"):
        v = getattr(config, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def _accepted_kwargs(model: torch.nn.Module) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


def task_rows(pairs: list[tuple[list[int], list[int]]], max_length: int | None) -> list[_Row]:
    """The distinct model inputs of `pairs` (requests with identical inputs share one row, as lm-eval's
    cache does), longest first; inputs longer than `max_length` are truncated from the left."""
    rows: dict[tuple[int, ...], _Row] = {}
    for i, (ctx, cont) in enumerate(pairs):
        if not cont:
            raise QuantscopeError(f"a continuation encodes to zero tokens (request {i})")
        if max_length is not None and len(cont) > max_length:
            raise QuantscopeError(
                f"a continuation of {len(cont)} tokens exceeds the model's {max_length}-token context"
            )
        full = list(ctx) + list(cont)
        if max_length is not None and len(full) > max_length + 1:
            full = full[-(max_length + 1) :]
        inp = tuple(full[:-1])
        rows.setdefault(inp, _Row(list(inp))).requests.append((i, list(cont)))
    return sorted(rows.values(), key=lambda r: -len(r.tokens))


def score_rows_from_hidden(rows: list[_Row], hidden: list[torch.Tensor], head: Callable[[torch.Tensor], torch.Tensor],
                           n_requests: int) -> list[tuple[float, bool]]:
    """:func:`loglikelihoods`' results from each row's final hidden states ([1, len, hidden] or [len, hidden])
    and the model's head (final norm + lm_head): the streamed path, which never holds a whole model."""
    results: list[tuple[float, bool] | None] = [None] * n_requests
    with torch.inference_mode():
        for row, h in zip(rows, hidden):
            h = h.reshape(-1, h.shape[-1])
            n = len(row.tokens)
            for req, cont in row.requests:
                c = len(cont)
                lp = torch.log_softmax(head(h[n - c : n]).float(), dim=-1)
                target = torch.tensor(cont, dtype=torch.long, device=lp.device)
                results[req] = (float(lp.gather(-1, target[:, None]).sum()), bool((lp.argmax(dim=-1) == target).all()))
    return results  # type: ignore[return-value]


@reference_products()
def loglikelihoods(
    model: torch.nn.Module,
    pairs: list[tuple[list[int], list[int]]],
    batch_size: int = 8,
    max_length: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[tuple[float, bool]]:
    """Summed log-likelihood of each continuation given its context, and whether it is greedy.

    ``pairs`` are token lists ``(context, continuation)``. Requests with identical model inputs
    (e.g. one-letter MMLU answers after the same prompt) share one forward row, as lm-eval's cache
    does. Rows are sorted longest first and right-padded in batches of ``batch_size``; when the
    model accepts ``logits_to_keep`` only the positions that score a continuation are materialised.
    ``progress(done_rows, total_rows)`` is called after each batch.
    """
    if batch_size < 1:
        raise QuantscopeError(f"batch size must be >= 1, got {batch_size}")
    ordered = task_rows(pairs, max_length)

    device = module_device(model)
    accepted = _accepted_kwargs(model)
    results: list[tuple[float, bool] | None] = [None] * len(pairs)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(ordered), batch_size):
                batch = ordered[start : start + batch_size]
                _score_batch(model, batch, device, accepted, results)
                if progress is not None:
                    progress(min(start + batch_size, len(ordered)), len(ordered))
    finally:
        model.train(was_training)
    return results  # type: ignore[return-value]


def _score_batch(model, batch: list[_Row], device, accepted: set[str], results: list) -> None:
    pad_len = max(len(r.tokens) for r in batch)
    ids = torch.zeros((len(batch), pad_len), dtype=torch.long)
    mask = torch.zeros((len(batch), pad_len), dtype=torch.long)
    for b, row in enumerate(batch):
        ids[b, : len(row.tokens)] = torch.tensor(row.tokens, dtype=torch.long)
        mask[b, : len(row.tokens)] = 1
    # The earliest position any continuation needs, counted from the right edge of the padded batch.
    keep = max(pad_len - (len(r.tokens) - max(len(c) for _, c in r.requests)) for r in batch)
    kwargs: dict[str, Any] = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
    if "use_cache" in accepted:
        kwargs["use_cache"] = False
    if "logits_to_keep" in accepted:
        kwargs["logits_to_keep"] = keep
    logits = model(**kwargs).logits
    offset = pad_len - logits.shape[1]  # position of logits[:, 0] in the padded sequence
    for b, row in enumerate(batch):
        n = len(row.tokens)
        for req, cont in row.requests:
            c = len(cont)
            lp = torch.log_softmax(logits[b, n - c - offset : n - offset].float(), dim=-1)
            target = torch.tensor(cont, dtype=torch.long, device=lp.device)
            ll = float(lp.gather(-1, target[:, None]).sum())
            greedy = bool((lp.argmax(dim=-1) == target).all())
            results[req] = (ll, greedy)


def score_task(
    model: torch.nn.Module,
    tokenizer: Any,
    task: Task,
    batch_size: int = 8,
    progress: Callable[[int, int], None] | None = None,
) -> TaskScores:
    """Score every item of ``task`` with ``model`` (any causal LM returning ``.logits``).

    ``tokenizer`` needs only ``encode(text) -> list[int]`` (and ``bos_token_id``/``eos_token_id``
    for an empty context). Returns per-item correctness for paired comparisons.
    """
    pairs = task_pairs(tokenizer, task)
    scored = loglikelihoods(model, pairs, batch_size=batch_size, max_length=_max_length(model), progress=progress)
    return task_scores(task, pairs, scored)


def task_pairs(tokenizer: Any, task: Task) -> list[tuple[list[int], list[int]]]:
    """Every (context, continuation) token pair of the task's items, choice by choice."""
    return [encode_pair(tokenizer, item.context, cont) for item in task.items for cont in item.continuations]


def task_scores(task: Task, pairs: list[tuple[list[int], list[int]]], scored: list[tuple[float, bool]]) -> TaskScores:
    """The task's per-item scores from each pair's (log-likelihood, greedy)."""
    loglik, correct, correct_norm, nll, ntok = [], [], [], [], []
    k = 0
    for item in task.items:
        m = len(item.choices)
        lls = np.array([scored[k + j][0] for j in range(m)], dtype=np.float64)
        greedy = [scored[k + j][1] for j in range(m)]
        lens = [len(pairs[k + j][1]) for j in range(m)]
        k += m
        loglik.append(lls)
        if task.kind == CLOZE:
            correct.append(int(greedy[0]))
            nll.append(-lls[0])
            ntok.append(lens[0])
        else:
            char_len = np.array([float(len(c)) for c in item.choices])
            correct.append(int(np.argmax(lls) == item.gold))
            correct_norm.append(int(np.argmax(lls / char_len) == item.gold))
    cloze = task.kind == CLOZE
    return TaskScores(
        task=task.name,
        kind=task.kind,
        item_ids=[it.id for it in task.items],
        loglik=loglik,
        correct=np.asarray(correct, dtype=np.int8),
        correct_norm=None if cloze else np.asarray(correct_norm, dtype=np.int8),
        target_nll=np.asarray(nll, dtype=np.float64) if cloze else None,
        target_tokens=np.asarray(ntok, dtype=np.int64) if cloze else None,
    )
