"""Issue 3 benchmark: GPTQ and AWQ calibrated on WikiText-2 vs plain round-to-nearest.

    python benchmarks/calibrated.py [--windows 32] [--calib-samples 128]

Embedded SmolLM2-135M; calibration = 128 x 512 tokens from the head of WikiText-2 test; evaluation =
32 windows of 512 tokens right after them (disjoint). For each calibrated format, its KLD is compared
with the RTN format of the same storage as a paired difference over windows (bootstrap 95% CI).
Writes benchmarks/results/calibrated.json.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
from _common import shared, write

from quantscope.cli import comparison_table
from quantscope.compare import CompareConfig, compare
from quantscope.evaluate.stats import paired_bootstrap_ci, significant
from quantscope.registry import resolve_format

FORMATS = ("int4-g128,gptq-int4-g128,gptq-int4-g128-act,awq-int4-g128,awq+gptq-int4-g128,"
           "int3-g128,gptq-int3-g128,gptq-int3-g128-act,awq-int3-g128,awq+gptq-int3-g128")


def window_kld(r):
    return np.asarray(r["window_kld"]) / np.asarray(r["window_tokens"])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--formats", default=FORMATS)
    ap.add_argument("--out", default="benchmarks/runs/calibrated")
    args = ap.parse_args()
    cfg = CompareConfig(formats=tuple(args.formats.split(",")), text=shared("wikitext2/wiki.test.raw"),
                        ctx=512, windows=args.windows, calib_samples=args.calib_samples, calib_seqlen=512,
                        threads=2)
    records, meta = compare(cfg, on_record=lambda r: print(f"done: {r['format']}", file=sys.stderr, flush=True),
                            run_dir=args.out)
    for n in meta["notes"]:
        print("note:", n)
    print(comparison_table(records))
    by = {r["format"]: r for r in records if not r.get("error")}
    rows = []
    print("\nKLD vs round-to-nearest at the same storage (paired over windows, 95% bootstrap CI):")
    for name, r in by.items():
        if r.get("spec", {}).get("method", "rtn") == "rtn":
            continue
        rtn = resolve_format(name).rtn().name  # the round-to-nearest format of the same storage
        if rtn not in by:
            continue
        d, lo, hi = paired_bootstrap_ci(window_kld(by[rtn]), window_kld(r))
        rel = r["kld_mean"] / by[rtn]["kld_mean"] - 1
        sig = "significant" if significant(lo, hi) else "within noise"
        print(f"  {name:<22} KLD {r['kld_mean']:.4f} vs {rtn} {by[rtn]['kld_mean']:.4f}: "
              f"{100 * rel:+.1f}%  Δ {d:+.4f} [{lo:+.4f},{hi:+.4f}] {sig}; quantize {r['quantize_seconds']:.0f} s, "
              f"peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB")
        rows.append({"format": name, "rtn": rtn, "kld": r["kld_mean"], "kld_rtn": by[rtn]["kld_mean"],
                     "relative_change": rel, "delta": d, "ci": [lo, hi]})
    out = write("calibrated", {"meta": meta, "records": records, "vs_rtn": rows})
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
