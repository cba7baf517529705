"""Issue 3 benchmark: GPTQ and AWQ calibrated on WikiText-2 vs plain round-to-nearest.

    python benchmarks/calibrated.py [--windows 32] [--calib-samples 128] [--llmc]

Embedded SmolLM2-135M; calibration = 128 x 512 tokens from the head of WikiText-2 test; evaluation =
32 windows of 512 tokens right after them (disjoint). For each calibrated format, its KLD is compared
with the RTN format of the same storage as a paired difference over windows (bootstrap 95% CI).
`-bf16fwd` rows run GPTQ's calibration passes in bfloat16 and are paired against the float32 rows.
Writes benchmarks/results/calibrated.json.

`--llmc` measures quantscope's GPTQ and AWQ against llm-compressor's (needs QUANTSCOPE_LLMC_PYTHON,
see `quantscope formats`) at group 64, the group size llm-compressor accepts on this model's
576-wide layers: the same calibration tokens, the same storage (int4-g64), the same windows; each
llm-compressor row is paired against quantscope's rows of the same method. Writes calibrated-llmc.json.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
from _common import shared, write

from quantscope.report.terminal import comparison_table
from quantscope.harness import CompareConfig, compare
from quantscope.evaluate.stats import paired_bootstrap_ci, significant
from quantscope.quantization import resolve

FORMATS = ("int4-g128,gptq-int4-g128,gptq-int4-g128-act,awq-int4-g128,awq+gptq-int4-g128,"
           "int3-g128,gptq-int3-g128,gptq-int3-g128-act,awq-int3-g128,awq+gptq-int3-g128,"
           "gptq-int4-g128-bf16fwd,gptq-int3-g128-bf16fwd")
LLMC_FORMATS = "int4-g64,gptq-int4-g64,gptq-int4-g64-act,awq-int4-g64,llmc-gptq-int4-g64,llmc-awq-int4-g64"
# each llm-compressor format against quantscope's formats of the same method and storage
LLMC_PAIRS = (("llmc-gptq-int4-g64", "gptq-int4-g64"), ("llmc-gptq-int4-g64", "gptq-int4-g64-act"),
              ("llmc-awq-int4-g64", "awq-int4-g64"))


def window_kld(r):
    return np.asarray(r["window_kld"]) / np.asarray(r["window_tokens"])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--formats", default=None)
    ap.add_argument("--llmc", action="store_true", help="quantscope's GPTQ/AWQ against llm-compressor's")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (1 when two benchmarks share 2 cores)")
    ap.add_argument("--out", default="benchmarks/runs/calibrated")
    args = ap.parse_args()
    formats = args.formats or (LLMC_FORMATS if args.llmc else FORMATS)
    cfg = CompareConfig(formats=tuple(formats.split(",")), text=shared("wikitext2/wiki.test.raw"),
                        ctx=512, windows=args.windows, calib_samples=args.calib_samples, calib_seqlen=512,
                        threads=args.threads)
    records, meta = compare(cfg, on_record=lambda r: print(f"done: {r['format']}", file=sys.stderr, flush=True),
                            run_dir=args.out)
    for n in meta["notes"]:
        print("note:", n)
    print(comparison_table(records))
    by = {r["format"]: r for r in records if not r.get("error")}
    rows = []
    print("\nKLD vs round-to-nearest at the same storage (paired over windows, 95% bootstrap CI):")
    for name, r in by.items():
        if "llmc_stored_as" in r:
            rtn = r["llmc_stored_as"]  # llm-compressor's codes, stored as this quantscope format
        elif r.get("spec", {}).get("method", "rtn") == "rtn":
            continue
        else:
            rtn = resolve(name).spec.rtn().name  # the round-to-nearest format of the same storage
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
    fwd = []
    bf16_rows = [n for n in by if n.endswith("-bf16fwd") and n.removesuffix("-bf16fwd") in by]
    if bf16_rows:
        print("\nGPTQ with bfloat16 calibration passes vs float32 (KLD, paired over windows):")
    for name in bf16_rows:
        ref = name.removesuffix("-bf16fwd")
        d, lo, hi = paired_bootstrap_ci(window_kld(by[ref]), window_kld(by[name]))
        sig = "significant" if significant(lo, hi) else "within noise"
        print(f"  {name} {by[name]['kld_mean']:.4f} - {ref} {by[ref]['kld_mean']:.4f} = {d:+.4f} "
              f"[{lo:+.4f},{hi:+.4f}] {sig}")
        fwd.append({"format": name, "float32": ref, "delta": d, "ci": [lo, hi]})
    pairs = []
    if args.llmc:
        print("\nllm-compressor vs quantscope, same method and storage (KLD, paired over windows):")
        for theirs, ours in LLMC_PAIRS:
            if theirs not in by or ours not in by:
                continue
            d, lo, hi = paired_bootstrap_ci(window_kld(by[ours]), window_kld(by[theirs]))
            sig = "significant" if significant(lo, hi) else "within noise"
            print(f"  {theirs} {by[theirs]['kld_mean']:.4f} - {ours} {by[ours]['kld_mean']:.4f} = "
                  f"{d:+.4f} [{lo:+.4f},{hi:+.4f}] {sig}; quantize {by[theirs]['quantize_seconds']:.0f} s "
                  f"vs {by[ours]['quantize_seconds']:.0f} s")
            pairs.append({"llmc": theirs, "quantscope": ours, "delta": d, "ci": [lo, hi],
                          "kld_llmc": by[theirs]["kld_mean"], "kld_quantscope": by[ours]["kld_mean"]})
    slim = [{k: v for k, v in r.items() if k != "task_items"} for r in records]
    out = write("calibrated-llmc" if args.llmc else "calibrated",
                {"meta": meta, "records": slim, "vs_rtn": rows, "bf16fwd_vs_fp32": fwd,
                 "llmc_vs_quantscope": pairs})
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
