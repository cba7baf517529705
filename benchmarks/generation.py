"""Issue 17 benchmark: generation agreement on the embedded model, beside perplexity/KLD on text.

    python benchmarks/generation.py [--windows 6] [--gen-tokens 32] [--calib-samples 32]

Embedded SmolLM2-135M-Instruct; the default prompt set shipped with quantscope (12 plain prompts and
8 chat conversations); each prompt's greedy continuation of --gen-tokens tokens under every format
against the FP32 baseline's: exact-match rate (Wilson 95%), mean tokens until the first divergence and
mean per-token KLD along the baseline's continuation (paired bootstrap over prompts). Beside them:
perplexity and KLD on WikiText-2 test windows, and the KLD on chat prompts vs on plain prompts.
Calibrated formats take the head of WikiText-2 test. Writes benchmarks/results/generation.json.
"""

from __future__ import annotations

import argparse
import sys

from _common import shared, write

from quantscope.harness import CompareConfig, compare
from quantscope.report.terminal import comparison_table, generation_table

FORMATS = "fp32,int8,int4-g64,nf4,gptq-int4-g64-act,awq-int4-g64"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--formats", default=FORMATS)
    ap.add_argument("--windows", type=int, default=6)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/runs/generation")
    args = ap.parse_args()
    cfg = CompareConfig(formats=tuple(args.formats.split(",")), text=shared("wikitext2/wiki.test.raw"), ctx=512,
                        windows=args.windows, calib_samples=args.calib_samples, calib_seqlen=512,
                        reserve_calib=True, measure_speed=False, threads=args.threads, gen_prompts="default",
                        gen_tokens=args.gen_tokens)
    records, meta = compare(cfg, on_record=lambda r: print(f"done: {r['format']}", file=sys.stderr, flush=True),
                            run_dir=args.out)
    for n in meta["notes"]:
        print("note:", n)
    print(comparison_table(records))
    print(generation_table(records))
    head = ["format", "ppl (text)", "KLD text", "KLD gen (all)", "KLD gen chat", "KLD gen plain", "exact", "diverge"]
    rows = []
    out = []
    for r in records:
        if r.get("error"):
            continue
        g = r["gen_agreement"]
        rows.append([r["format"], f"{r['perplexity']:.3f}", f"{r['kld_mean']:.4f}", f"{g['kld_mean']:.4f}",
                     f"{g['kld_mean_chat']:.4f}", f"{g['kld_mean_text']:.4f}", f"{100 * g['exact_match']:.0f}%",
                     f"{g['divergence_mean']:.1f}"])
        out.append({"format": r["format"], "bits_per_weight": r.get("bits_per_weight"),
                    "perplexity": r["perplexity"], "perplexity_delta_ci": r.get("perplexity_delta_ci"),
                    "kld_text": r["kld_mean"], "kld_text_stderr": r["kld_stderr"], "generation": g})
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    print("\n" + "\n".join("  ".join(x.ljust(w) for x, w in zip(row, widths)) for row in [head, *rows]))
    path = write("generation", {"config": {k: v for k, v in cfg.to_dict().items() if k != "speed"},
                                "meta": {k: meta[k] for k in ("model", "text", "ctx", "windows", "machine", "date")},
                                "rows": out})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
