"""Issue 5 benchmark, long context: does quantization error grow with the context length?

    python benchmarks/long_context.py [--formats fp32,int8,int4-g128,nf4] [--lengths 256,1024,2048]

Embedded SmolLM2-135M-Instruct (its Q4_1 GGUF dequantized to FP32 is the baseline), WikiText-2 raw test.
The same head of the text (windows x 512 tokens) is cut into windows of each length (`--ctx-sweep`);
at each length every format is scored on the same windows as the baseline: perplexity, Δppl paired
over windows with a bootstrap interval, KLD and top-1 agreement against the baseline's distribution.
Then, per format, the change of KLD from the shortest to the longest length with a conservative 95%
interval (the two means are on the same tokens, positively correlated, so adding their variances
overstates the uncertainty: an interval that excludes zero is a real change).
Writes benchmarks/results/long_context.json.
"""

from __future__ import annotations

import argparse
import math
import sys

from _common import shared, write

from quantscope.report.terminal import ctx_sweep_table
from quantscope.harness import CompareConfig, compare


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--formats", default="fp32,int8,int4-g128,nf4")
    ap.add_argument("--lengths", default="256,1024,2048", help="context lengths besides the 512 of the main windows")
    ap.add_argument("--windows", type=int, default=20, help="512-token windows of text (the span every length covers)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (1 when two benchmarks share 2 cores)")
    ap.add_argument("--out", default="benchmarks/runs/long_context")
    args = ap.parse_args()
    lengths = tuple(int(x) for x in args.lengths.split(","))
    cfg = CompareConfig(formats=tuple(args.formats.split(",")), text=shared("wikitext2/wiki.test.raw"),
                        ctx=512, windows=args.windows, ctx_sweep=lengths, measure_speed=False,
                        threads=args.threads)
    records, meta = compare(cfg, on_record=lambda r: print(f"done: {r['format']}", file=sys.stderr, flush=True),
                            run_dir=args.out)
    bad = [r for r in records if r.get("error")]
    for r in bad:
        print(f"{r['format']}: skipped: {r['error']}")
    records = [r for r in records if not r.get("error")]
    for r in records:  # the 512-token main windows join the sweep as one more length
        r.setdefault("ctx_sweep", {})["512"] = {k: r.get(k) for k in (
            "tokens_scored", "perplexity", "perplexity_stderr", "kld_mean", "kld_stderr", "top1_agreement",
            "perplexity_delta", "perplexity_delta_ci", "perplexity_delta_significant", "window_nll", "window_tokens")}
    print(f"model: {meta['model']}\ntext: {meta['text']}, the first {args.windows} x 512 tokens in windows of "
          f"{', '.join(str(L) for L in sorted((512, *lengths)))}")
    print(ctx_sweep_table(records))
    all_lens = sorted(int(L) for L in records[0]["ctx_sweep"])
    short, long_ = str(all_lens[0]), str(all_lens[-1])
    print(f"\nper format: Δppl as % of the baseline's perplexity at each length; KLD({long_}) - KLD({short})")
    growth = {}
    base = next(r for r in records if r.get("baseline"))
    for r in records:
        if r.get("baseline"):
            continue
        cs, bs = r["ctx_sweep"], base["ctx_sweep"]
        rel = "  ".join(f"{L}: {100 * cs[str(L)]['perplexity_delta'] / bs[str(L)]['perplexity']:+.2f}%"
                        for L in all_lens)
        d = cs[long_]["kld_mean"] - cs[short]["kld_mean"]
        half = 1.96 * math.hypot(cs[long_]["kld_stderr"], cs[short]["kld_stderr"])
        real = "real" if abs(d) > half else "noise"
        growth[r["format"]] = {"kld_change": d, "kld_change_ci": [d - half, d + half], "verdict": real,
                               "relative_perplexity_delta": {str(L): cs[str(L)]["perplexity_delta"] / bs[str(L)]["perplexity"]
                                                             for L in all_lens}}
        print(f"  {r['format']:<12} {rel}   KLD change {d:+.4f} [{d - half:+.4f},{d + half:+.4f}] {real}")
    slim = [{k: v for k, v in r.items() if k not in ("task_items", "window_kld")} for r in records]
    out = write("long_context", {"meta": meta, "records": slim, "kld_growth": growth})
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
