"""Generation agreement inside a comparison: the worker's side (continuations, teacher-forced KLD).

The baseline's worker makes the greedy continuations (stored in its record, so a resumed run reuses
them) and, when the run shares the baseline's log-probabilities, exports them along each continuation
under the key ("gen", i). A format's worker is handed the baseline's continuations in its job and
gets the baseline's log-probabilities from the parent (or computes them with a local copy of the
baseline when the run does not share them).
"""

from __future__ import annotations

import torch

from ..evaluate.generation import compare_prompt, continuation_logprobs, greedy_continuation
from .config import Job


def measure_generation(model, job: Job, reference, refs) -> dict:
    """`generation` of a record: continuations and, per prompt, exact match, divergence and KLD."""
    n = job.gen_tokens
    out = {"tokens": n, "kinds": list(job.gen_kinds), "continuations": [], "exact": [], "divergence": [], "kld": []}
    for i, prompt in enumerate(job.gen_prompts):
        prompt = list(prompt)
        if job.is_baseline:
            cont = list(job.gen_baseline[i]) if job.gen_baseline else greedy_continuation(model, prompt, n)
            if job.ref_mode == "export" and refs is not None:
                refs.put(("gen", i), continuation_logprobs(model, prompt, cont).numpy().copy())
            row = {"exact": True, "divergence": n, "kld": 0.0}
        else:
            ref_cont = list(job.gen_baseline[i])
            cont = greedy_continuation(model, prompt, n)
            logp = continuation_logprobs(model, prompt, ref_cont)
            if isinstance(reference, torch.nn.Module):
                ref_logp = continuation_logprobs(reference, prompt, ref_cont)
            else:
                ref_logp = torch.from_numpy(refs.get(("gen", i)))
            row = compare_prompt(ref_cont, cont, ref_logp, logp)
        out["continuations"].append(cont)
        for k, v in row.items():
            out[k].append(v)
    return out
