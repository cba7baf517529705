"""Issue 5 benchmark: task accuracy with paired intervals on the embedded model.

    python benchmarks/tasks.py [--limit 100] [--formats fp32,int8,int4-g128,nf4]

Tasks from ../shared/data: ARC-Easy and ARC-Challenge (test), HellaSwag (the 1,000-record sample),
PIQA (validation), MMLU (10 subjects, zero-shot; a seeded sample when --limit is given), LAMBADA
(OpenAI test). lm-evaluation-harness prompts and log-likelihood scoring; Wilson 95% intervals; deltas
vs the baseline paired per question (bootstrap CI) with exact McNemar p-values.
Writes benchmarks/results/tasks.json.
"""

from __future__ import annotations

import argparse
import sys

from _common import shared, write

from quantscope.cli import task_table
from quantscope.compare import CompareConfig, compare

TASKS = (
    ("arc-easy", "arc/ARC-Easy-Test.jsonl"),
    ("arc-challenge", "arc/ARC-Challenge-Test.jsonl"),
    ("hellaswag", "hellaswag/hellaswag_val_sample1000.jsonl"),
    ("piqa", "piqa/valid.jsonl"),
    ("mmlu", "mmlu/test"),
    ("lambada", "lambada/lambada_test.jsonl"),
)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=100, help="questions per task (first N; MMLU: seeded sample)")
    ap.add_argument("--formats", default="fp32,int8,int4-g128,nf4")
    ap.add_argument("--tasks", default=",".join(t for t, _ in TASKS))
    ap.add_argument("--out", default="benchmarks/runs/tasks")
    args = ap.parse_args()
    wanted = set(args.tasks.split(","))
    tasks = tuple((n, shared(p)) for n, p in TASKS if n in wanted)
    cfg = CompareConfig(formats=tuple(args.formats.split(",")), windows=2, ctx=512, tasks=tasks,
                        task_limit=args.limit, task_sample_seed=0, measure_speed=False, threads=2)
    records, meta = compare(cfg, on_record=lambda r: print(f"done: {r['format']}", file=sys.stderr, flush=True),
                            run_dir=args.out)
    print(f"model: {meta['model']}; {args.limit} questions per task (seeded sample, seed 0)")
    print(task_table(records))
    print("\n* = paired 95% interval of the accuracy delta excludes zero")
    slim = [{k: v for k, v in r.items() if k != "task_items"} for r in records]
    out = write("tasks", {"meta": meta, "records": slim})
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
