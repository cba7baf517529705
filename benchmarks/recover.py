"""Issue 18 benchmark: LoRA recovery of quantized formats on the embedded model (QLoRA-style adapters,
next-token loss vs distillation from the baseline, plain vs LoftQ initialisation), each outcome
measured like a format: the adapter kept beside the base, and merged + requantized.

    python benchmarks/recover.py [--steps 32] [--windows 16] [--grid full|reduced]

Embedded SmolLM2-135M; training = the head of WikiText-2 test (steps x batch + 2 rows of --seqlen
tokens), evaluation = --windows windows of 512 tokens right after it (disjoint spans of one file).
For every base format: held-out KLD and perplexity before recovery, with the adapter, merged and
requantized; the share of the KLD / perplexity gap won back with its 95% paired bootstrap interval over
windows; seconds per training step and peak RSS of the worker that trained. Writes
benchmarks/results/recover.json.

Published direction to compare with: LoftQ (Li et al. 2023) beats plain QLoRA initialisation at 3 bits
and below; torchao's QAT tutorial reports 36-67% of the degradation recovered (by QAT, a different
method with far more training).
"""

from __future__ import annotations

import argparse
import sys
import time

from _common import shared, write

from quantscope.harness import CompareConfig, compare
from quantscope.methods.recover_config import RecoverConfig, recovered_name
from quantscope.report.recovery import recovery_table, training_log
from quantscope.report.terminal import comparison_table

# (base format, objective, init): the full grid, and the one that fits a session on 2 shared cores
FULL = [(f, obj, init) for f in ("int4-g64", "nf4", "int3-g64") for obj in ("lm", "distill") for init in ("plain", "loftq")]
# reduced: both comparisons (objective, init) at 3 bits, where the published direction is clearest; distillation
# with both inits at 4 bits (int4-g64), distillation with plain init on nf4
REDUCED = [("int3-g64", "lm", "plain"), ("int3-g64", "distill", "plain"), ("int3-g64", "distill", "loftq"),
           ("int4-g64", "distill", "plain"), ("int4-g64", "distill", "loftq"), ("nf4", "distill", "plain")]
# quick: what fits when the shared machine is busy (the run in benchmarks/results/recover.json says which grid)
QUICK = [("int3-g64", "lm", "plain"), ("int3-g64", "distill", "plain"), ("int3-g64", "distill", "loftq"),
         ("int4-g64", "distill", "plain")]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=RecoverConfig().steps)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--grid", choices=("full", "reduced", "quick"), default="reduced")
    ap.add_argument("--formats", default=None, help="only these base formats (comma-separated)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/runs/recover")
    args = ap.parse_args()
    grid = {"full": FULL, "reduced": REDUCED, "quick": QUICK}[args.grid]
    if args.formats:
        grid = [g for g in grid if g[0] in args.formats.split(",")]
    out = {"grid": args.grid, "steps": args.steps, "windows": args.windows, "formats": {}}
    bases = list(dict.fromkeys(g[0] for g in grid))
    base_rc = RecoverConfig(steps=args.steps)
    for base in bases:
        names = [base]
        for b, obj, init in grid:
            if b != base:
                continue
            rc = RecoverConfig(steps=args.steps, objective=obj, init=init)
            names += [recovered_name(base, "adapter", rc), recovered_name(base, "merged", rc)]
        cfg = CompareConfig(formats=tuple(names), text=shared("wikitext2/wiki.test.raw"), ctx=512,
                            windows=args.windows, calib_samples=base_rc.steps * base_rc.batch + 2,
                            calib_seqlen=base_rc.seqlen, reserve_calib=True, threads=args.threads)
        t0 = time.perf_counter()
        records, meta = compare(cfg, on_record=lambda r: print(f"done: {r['format']} {r.get('error', '')}",
                                                                file=sys.stderr, flush=True), run_dir=args.out)
        print(f"\n=== {base} ({time.perf_counter() - t0:.0f} s) ===")
        for n in meta["notes"]:
            print("note:", n)
        print(comparison_table(records))
        print(recovery_table(records))
        print(training_log(records))
        out["formats"][base] = [_summary(r) for r in records]
        out["notes"] = meta["notes"]
        write("recover", out)
    return 0


def _summary(r: dict) -> dict:
    keep = ("format", "perplexity", "perplexity_stderr", "perplexity_delta", "perplexity_delta_ci", "kld_mean",
            "kld_stderr", "top1_agreement", "weight_bytes", "bits_per_weight", "peak_rss_bytes", "quantize_seconds",
            "recovered", "error", "reused")
    s = {k: r[k] for k in keep if k in r}
    rec = r.get("recover")
    if rec:
        s["recover"] = {k: rec.get(k) for k in ("outcome", "config", "seconds_per_step", "train_peak_rss_bytes",
                                                "train_seconds", "adapter_bytes", "trainable_params", "log", "loftq",
                                                "heldout_kld_merged", "train_tokens")}
    return s


if __name__ == "__main__":
    raise SystemExit(main())
