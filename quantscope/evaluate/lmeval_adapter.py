"""Run lm-evaluation-harness tasks on an in-memory (e.g. quantized) model.

lm-eval is optional and heavy (datasets, pandas, pyarrow, scikit-learn ...), so it is imported
lazily; without it `run_lm_eval` raises QuantscopeError with the install hint. The model is wrapped
in lm-eval's own ``HFLM`` (``pretrained=<nn.Module>``), so any of its tasks, or a local YAML task
directory given as ``include_path``, runs on exactly the weights quantscope measured.

lm-eval seeds Python's, numpy's and torch's global generators by default; this adapter passes
``None`` for those seeds so running it leaves the caller's random state alone (few-shot sampling
keeps lm-eval's own seeded generator).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from quantscope.errors import QuantscopeError
from quantscope.evaluate.tasks import MULTIPLE_CHOICE, TaskScores

INSTALL_HINT = "pip install 'quantscope[lmeval]'"


def import_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        missing = e.name or e
        raise QuantscopeError(
            f"--lm-eval-task needs lm-evaluation-harness ({missing} is missing): {INSTALL_HINT}"
        ) from None
    return lm_eval, HFLM, TaskManager


def run_lm_eval(
    model: torch.nn.Module,
    tokenizer: Any,
    task_names: list[str],
    limit: int | None = None,
    *,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    include_path: str | None = None,
    include_defaults: bool = True,
    bootstrap_iters: int = 1000,
) -> dict[str, Any]:
    """Evaluate ``model`` on lm-eval tasks; returns ``{"lm_eval_version", "tasks": {name: ...}}``.

    Each task entry holds ``n`` (documents scored), lm-eval's metrics with the filter suffix
    dropped (``acc``, ``acc_stderr``, ``acc_norm`` ...) and ``per_item``: per-document metric
    values in document order, for paired comparisons (see `to_task_scores`). ``limit`` takes
    the first N documents of each task. ``include_path`` adds a directory of YAML task configs;
    ``include_defaults=False`` skips indexing lm-eval's built-in tasks (saves ~10 s).
    """
    lm_eval, HFLM, TaskManager = import_lm_eval()
    if not task_names:
        raise QuantscopeError("no lm-eval task given")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    manager = TaskManager(include_path=include_path, include_defaults=include_defaults)
    try:
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(task_names),
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=manager,
            log_samples=True,
            bootstrap_iters=bootstrap_iters,
            random_seed=None,
            numpy_random_seed=None,
            torch_random_seed=None,
        )
    except KeyError as e:  # lm-eval's "not a registered task/group/tag name" error
        raise QuantscopeError(f"lm-eval: {e.args[0] if e.args else e}") from None
    n_samples = out.get("n-samples", {})
    tasks: dict[str, Any] = {}
    for name, metrics in out["results"].items():
        entry: dict[str, Any] = {"n": n_samples.get(name, {}).get("effective")}
        for key, value in metrics.items():
            metric, _, _filter = key.partition(",")
            if _filter and isinstance(value, (int, float)):
                entry[metric] = float(value)
        samples = sorted(out.get("samples", {}).get(name, []), key=lambda s: s["doc_id"])
        if samples:
            per_item = {k: [float(s[k]) for s in samples] for k in ("acc", "acc_norm") if k in samples[0]}
            entry["per_item"] = per_item
            entry["doc_ids"] = [int(s["doc_id"]) for s in samples]
        tasks[name] = entry
    return {"lm_eval_version": getattr(lm_eval, "__version__", None), "tasks": tasks}


def to_task_scores(result: dict[str, Any], task_name: str) -> TaskScores:
    """Per-document correctness of one lm-eval task as `TaskScores`, so `tasks.summarize` can pair it."""
    entry = result["tasks"].get(task_name)
    if entry is None or "per_item" not in entry or "acc" not in entry["per_item"]:
        raise QuantscopeError(f"lm-eval result has no per-document accuracy for task {task_name!r}")
    per = entry["per_item"]
    correct = np.asarray(per["acc"], dtype=np.int8)
    norm = per.get("acc_norm")
    return TaskScores(
        task=task_name,
        kind=MULTIPLE_CHOICE,
        item_ids=[str(i) for i in entry["doc_ids"]],
        loglik=[np.zeros(0) for _ in correct],  # lm-eval's per-choice log-likelihoods are not kept
        correct=correct,
        correct_norm=None if norm is None else np.asarray(norm, dtype=np.int8),
    )
