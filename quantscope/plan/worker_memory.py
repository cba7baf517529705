"""Memory one measuring worker needs: what a Ray task declares so that a node is not overfilled.

An ESTIMATE for scheduling, built from the planner's exact weight bytes (:mod:`.weights`) and its
activation estimate (:mod:`.planner`), plus what a measuring worker holds beside them:

- the baseline in its dtype, loaded in full;
- with the reference computed in the worker (``reference_copy``), a second copy of it that the format
  is quantized from (the first stays, to compute the baseline's log-probabilities window by window);
  with the reference handed in, the baseline itself is quantized in place;
- the quantized model: the format's exact bytes where it has one storage grid (own and calibrated
  formats), else the baseline's bytes (an upper bound: a library's copy starts as the baseline);
- one window's activations (the planner's, float32 on the CPU) and its logits: five ``[ctx, vocab]``
  float32 arrays (the format's logits and log-probabilities, the reference's, the KL terms);
- the baseline's log-probabilities of every scored position, when the worker hands them to others;
- the runtime: RSS of a worker after importing torch 2.13 (CPU), transformers 5.24 and quantscope's
  harness, measured at 432 MiB; 512 MiB leaves room for Ray's own worker code.

Task scoring (multiple-choice batches), generation prompts and a library's own workspaces are not
counted. `benchmarks/ray_sweep.py` prints each format's estimate beside its measured peak RSS.
"""

from __future__ import annotations

from typing import Callable

from quantscope.plan.geometry import DTYPE_BYTES, dtype_name, geometry
from quantscope.plan.planner import RuntimeAssumptions, activation_bytes
from quantscope.plan.weights import model_tensors

MiB = 2**20
RUNTIME_BYTES = 512 * MiB
LOGIT_ARRAYS = 5


def worker_memory_bytes(config: dict, ctx: int, baseline_dtype: str,
                        linear_bytes: Callable[[int, int], int] | None, reference_copy: bool,
                        baseline_only: bool = False, held_bytes: int = 0) -> int:
    """Estimated peak bytes of one worker measuring a format of the model described by `config`.

    `linear_bytes(out, in)` prices one decoder linear in the format (None: priced at the baseline's
    dtype); `baseline_dtype` is the dtype the baseline is loaded in (e.g. "float32");
    `baseline_only`: the worker measures the baseline itself (no quantized model); `held_bytes`: what it
    keeps until it returns (the baseline's log-probabilities, when it hands them to other workers)."""
    g = geometry(config)
    elem = DTYPE_BYTES[dtype_name(baseline_dtype, "baseline dtype")]
    baseline = quantized = 0
    for t in model_tensors(g):
        dense = t.numel * elem
        baseline += dense
        quantized += linear_bytes(*t.shape) if (t.role == "linear" and linear_bytes is not None) else dense
    act_dtype = dtype_name(baseline_dtype, "baseline dtype")
    act = activation_bytes(g, ctx, 1, RuntimeAssumptions(framework_bytes=0, activation_dtype=act_dtype,
                                                         attention="eager"))
    logits = LOGIT_ARRAYS * ctx * g.vocab * 4
    models = baseline if baseline_only else baseline * (2 if reference_copy else 1) + quantized
    return models + act + logits + held_bytes + RUNTIME_BYTES
