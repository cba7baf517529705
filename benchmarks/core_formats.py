"""Issue 2 benchmark: the basic formats on the embedded model over WikiText-2 test.

    python benchmarks/core_formats.py [--windows 32] [--formats ...]

Embedded SmolLM2-135M-Instruct (its Q4_1 GGUF dequantized to FP32 is the baseline), WikiText-2 raw test
(../shared/data/wikitext2/wiki.test.raw), ctx 512, 32 consecutive windows from the start, every token
after a window's first scored. Prints the comparison table and writes benchmarks/results/core_formats.json.
Expectations from the issue are checked and printed (they are measurements, not asserts).
"""

from __future__ import annotations

import argparse
import sys

from _common import shared, write

from quantscope.report.terminal import comparison_table
from quantscope.harness import CompareConfig, compare

FORMATS = "fp32,bf16,fp8-e4m3,int8,int4-g128,int3-g128,nf4"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--formats", default=FORMATS)
    ap.add_argument("--out", default=None, help="run directory (resumable)")
    args = ap.parse_args()
    cfg = CompareConfig(formats=tuple(args.formats.split(",")), text=shared("wikitext2/wiki.test.raw"),
                        ctx=args.ctx, windows=args.windows, threads=2)
    records, meta = compare(cfg, on_record=lambda r: print(f"done: {r['format']}", file=sys.stderr, flush=True),
                            run_dir=args.out or "benchmarks/runs/core_formats")
    print(f"model: {meta['model']}\ntext: {meta['text']}, ctx {meta['ctx']}, {meta['windows']} windows, "
          f"{records[0]['tokens_scored']} tokens scored")
    print(comparison_table(records))
    by = {r["format"]: r for r in records if not r.get("error")}
    checks = []
    if {"fp32", "int8"} <= by.keys():
        rel = by["int8"]["perplexity"] / by["fp32"]["perplexity"] - 1
        checks.append(("int8 within 1% of fp32 perplexity", abs(rel) < 0.01, f"{100 * rel:+.2f}%"))
    for a, b in (("int4-g128", "int8"), ("nf4", "int8"), ("int3-g128", "int4-g128"), ("int3-g128", "nf4")):
        if {a, b} <= by.keys():
            checks.append((f"{a} worse than {b}", by[a]["perplexity"] > by[b]["perplexity"],
                           f"{by[a]['perplexity']:.3f} vs {by[b]['perplexity']:.3f}"))
    if "int4-g128" in by:
        bpw = by["int4-g128"]["bits_per_weight"]
        checks.append(("int4-g128 <= 4.5 bits per weight", bpw <= 4.5, f"{bpw:.3f}"))
    print("\nexpectations (issue 2):")
    for name, ok, val in checks:
        print(f"  [{'ok' if ok else 'NOT MET'}] {name}: {val}")
    out = write("core_formats", {"meta": meta, "records": records, "checks": checks})
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
