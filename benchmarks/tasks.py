"""Issue 5 benchmark: task accuracy with paired intervals on the embedded model.

    python benchmarks/tasks.py [--formats fp32,int8,int4-g128,nf4,gptq-int4-g128,awq-int4-g128] [--limit N]

Tasks from ../shared/data at the issue's sizes: ARC-Easy and ARC-Challenge (test, first 500 each),
HellaSwag (first 500 of the 1,000-record sample), PIQA (validation, first 500), MMLU (all 10 subjects,
zero-shot), LAMBADA (OpenAI test, first 1000). `--limit N` caps every task at N (a quick run).
Calibrated formats are calibrated on the head of WikiText-2 test (128 x 512 tokens). lm-evaluation-harness prompts and log-likelihood scoring; Wilson 95% intervals; deltas
vs the baseline paired per question (bootstrap CI) with exact McNemar p-values.
Writes benchmarks/results/tasks.json.
"""

from __future__ import annotations

import argparse
import sys

from _common import shared, write

from quantscope.report.terminal import task_table
from quantscope.harness import CompareConfig, compare, paired_tasks

TASKS = (  # (name, path under ../shared/data, first N questions or None for all)
    ("arc-easy", "arc/ARC-Easy-Test.jsonl", 500),
    ("arc-challenge", "arc/ARC-Challenge-Test.jsonl", 500),
    ("hellaswag", "hellaswag/hellaswag_val_sample1000.jsonl", 500),
    ("piqa", "piqa/valid.jsonl", 500),
    ("mmlu", "mmlu/test", None),
    ("lambada", "lambada/lambada_test.jsonl", 1000),
)
# calibrated formats against round-to-nearest on the same integer grid, paired question by question
VERSUS = {"gptq-int4-g128": "int4-g128", "awq-int4-g128": "int4-g128"}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=None, help="cap every task at its first N questions")
    ap.add_argument("--formats", default="fp32,int8,int4-g128,nf4,gptq-int4-g128,awq-int4-g128")
    ap.add_argument("--tasks", default=",".join(t for t, _, _ in TASKS))
    ap.add_argument("--threads", type=int, default=2, help="torch threads (1 when two benchmarks share 2 cores)")
    ap.add_argument("--out", default="benchmarks/runs/tasks")
    args = ap.parse_args()
    wanted = set(args.tasks.split(","))

    def cap(n):
        return n if args.limit is None else min(args.limit, n or args.limit)

    tasks = tuple((n, shared(p), cap(lim)) for n, p, lim in TASKS if n in wanted)
    cfg = CompareConfig(formats=tuple(args.formats.split(",")), text=shared("wikitext2/wiki.test.raw"),
                        windows=2, ctx=512, tasks=tasks, measure_speed=False, threads=args.threads)
    records, meta = compare(cfg, on_record=lambda r: print(f"done: {r['format']}", file=sys.stderr, flush=True),
                            run_dir=args.out)
    sizes = ", ".join(f"{n} {lim or 'all'}" for n, _, lim in tasks)
    print(f"model: {meta['model']}; questions per task (first N): {sizes}")
    print(task_table(records))
    by = {r["format"]: r for r in records if not r.get("error")}
    versus = {}
    for fmt, ref in VERSUS.items():
        if fmt in by and ref in by:
            versus[fmt] = paired_tasks(by[fmt], by[ref])
    if versus:
        print("\ncalibrated vs round-to-nearest on the same grid (Δ = calibrated - RTN, the same questions)")
        print(task_table(list(versus.values()), paired_with="round-to-nearest int4-g128"))
    print("\n* = paired 95% interval of the accuracy delta excludes zero")
    slim = [{k: v for k, v in r.items() if k != "task_items"} for r in records]
    out = write("tasks", {"meta": meta, "records": slim, "calibrated_vs_rtn": versus})
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
