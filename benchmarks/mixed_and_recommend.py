"""Issue 6 benchmark: layer sensitivity, mixed precision vs uniform formats, and `recommend` with its trail.

    python benchmarks/mixed_and_recommend.py [--windows 32] [--ctx 512] [--threads 2] [--out RUN_DIR]
                                             [--include embed_tokens | --include none]

Embedded SmolLM2-135M-Instruct (FP32 baseline = its GGUF dequantized), WikiText-2 raw test
(../shared/data/wikitext2/wiki.test.raw). The first 2 x 256 tokens of the text are the calibration
tokens (mixed-auto's sensitivity scan and the ranking below); the evaluation windows (ctx 512,
consecutive) start right after them, so calibration and evaluation are disjoint.

Every format quantizes the decoder linears and, by default (`--include embed_tokens`), the token
embedding with the `lm_head` tied to it (one table, counted and quantized once): on this model it is
28M of 134.5M parameters, so the allocation must cover it, and formats are compared by whole-model
`weight_bytes` and by bits per weight over everything they quantize. `--include none` leaves it FP32.

1. Sensitivity ranking: each decoder linear alone in int4-g128, KL divergence on the calibration windows.
2. mixed-auto at 3.5 and 4.5 bits per weight (ladder int3-g128/int4-g128/int8) against the uniform
   formats of the same size (int3-g64 = 3.5 and int4-g64 = 4.5 bits per weight on these shapes) and the
   usual int3-g128 / int4-g128; KLD differences with paired bootstrap intervals over windows;
   predicted (sum of per-layer KLDs) next to measured KLD.
3. mixed-edges:int4-g128/int8 against mixed-auto at the same size over the same two formats.
4. `quantscope recommend --max-ppl-increase 2 --calib <the same text>` on the same windows, with its
   decision trail. Its calibration is the same 2 x 256 tokens (so every row shares the evaluation
   windows and is measured once): far less than GPTQ/AWQ's usual 128 x 512, so its calibrated
   step is a weak version of benchmarks/calibrated.py's.

Everything is measured in one run directory (resumable; recommend reuses the rows measured in 2-3),
and the sensitivity scans are cached, so mixed-auto at several budgets scans once. Results:
benchmarks/results/mixed_and_recommend.json.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

from _common import shared, write

from quantscope.report.terminal import comparison_table, sensitivity_table
from quantscope.cli import main as cli_main
from quantscope.harness import CompareConfig, compare, prepare
from quantscope.evaluate import stats
from quantscope.methods.mixed import parse_mixed, sensitivity_windows
from quantscope.plan import planner

LADDER = "int3-g128/int4-g128/int8"
EDGES = "mixed-edges:int4-g128/int8"
CALIB_SAMPLES, CALIB_SEQLEN = 2, 256  # = mixed-auto's scan: 2 windows of 256 tokens


def edges_bits_per_weight(model_ref: str, include: tuple[str, ...]) -> float:
    """Bits per weight of the edges preset over the modules it quantizes, measured on the model
    (the plan's stored bytes; a tied embedding and head counted once)."""
    from quantscope.methods.mixed import bpw_of_plan, edges_plan
    from quantscope.model.load import load_model

    lm = load_model(model_ref)
    return bpw_of_plan(lm.model, edges_plan(lm.model, parse_mixed(EDGES), include))


def per_window_kld(r: dict) -> list[float]:
    return [k / n for k, n in zip(r["window_kld"], r["window_tokens"])]


def paired_kld(a: dict, b: dict) -> dict:
    """KLD of b minus KLD of a, paired bootstrap over windows (same windows, same baseline)."""
    d, lo, hi = stats.paired_bootstrap_ci(per_window_kld(a), per_window_kld(b))
    return {"a": a["format"], "b": b["format"], "delta": d, "ci": [lo, hi], "significant": stats.significant(lo, hi)}


def sensitivity_ranking(cfg: CompareConfig) -> list[dict]:
    """int4-g128, one decoder linear at a time, on mixed-auto's calibration windows (cache shared)."""
    from quantscope.formats.spec import parse_format
    from quantscope.model.load import cache_root, load_model
    from quantscope.methods.sensitivity import SensitivityCache, layer_sensitivity

    job = next(j for j in prepare(cfg).jobs if j.calib is not None)
    lm = load_model(cfg.model, dtype=cfg.dtype)
    cache = SensitivityCache(cache_root() / "sensitivity", f"{job.common['model_fingerprint']}|{cfg.dtype}")
    return layer_sensitivity(lm.model, sensitivity_windows(job.calib), parse_format("int4-g128"), cache=cache,
                             include=cfg.include)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--text", default=None, help="default: WikiText-2 test from ../shared/data")
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/runs/mixed_and_recommend", help="run directory (resumable)")
    ap.add_argument("--results-name", default="mixed_and_recommend", help="benchmarks/results/<name>.json")
    ap.add_argument("--include", default="embed_tokens", help="module patterns quantized besides the decoder "
                    "linears (comma-separated; 'none' for only the decoder linears)")
    args = ap.parse_args()
    text = args.text or shared("wikitext2/wiki.test.raw")
    include = () if args.include == "none" else tuple(args.include.split(","))

    edges_bpw = edges_bits_per_weight(args.model, include)
    auto_at_edges = parse_mixed(f"mixed-auto:{math.floor(edges_bpw * 1e4) / 1e4}:int4-g128/int8").name
    auto35, auto45 = (parse_mixed(f"mixed-auto:{b}:{LADDER}").name for b in (3.5, 4.5))
    formats = ("int3-g128", "int3-g64", "int4-g128", "int4-g64", auto35, auto45, EDGES, auto_at_edges)
    cfg = CompareConfig(model=args.model, formats=formats, text=text, ctx=args.ctx, windows=args.windows,
                        calib_samples=CALIB_SAMPLES, calib_seqlen=CALIB_SEQLEN, measure_speed=False, include=include,
                        threads=args.threads, progress=sys.stderr.isatty())
    records, meta = compare(cfg, run_dir=args.out,
                            on_record=lambda r: print(f"done: {r['format']}" + (f" (error: {r['error']})" if r.get("error") else ""),
                                                      file=sys.stderr, flush=True))
    by = {r["format"]: r for r in records if not r.get("error")}
    print(f"model: {meta['model']}\ntext: {meta['text']}, ctx {meta['ctx']}, {meta['windows']} windows "
          f"from token {meta['window_start_token']}, {records[0].get('tokens_scored')} tokens scored")
    for n in meta["notes"]:
        print(f"note: {n}")

    ranking = sensitivity_ranking(cfg)
    print("\n1. sensitivity: each decoder linear alone in int4-g128 (calibration windows: 2 x 256 tokens)")
    print(sensitivity_table(ranking, 10))

    print("\n2-3. mixed precision and uniform formats (same evaluation windows)")
    print(comparison_table(records))
    pairs = [(auto35, "int3-g64"), (auto35, "int3-g128"), (auto45, "int4-g64"), (auto45, "int4-g128"),
             (auto_at_edges, EDGES)]
    compared = []
    print("\nKLD difference (second minus first), paired bootstrap 95% interval over windows:")
    for mixed, other in pairs:
        if mixed in by and other in by:
            c = paired_kld(by[other], by[mixed])
            c["bits_per_weight"] = {other: by[other]["bits_per_weight"], mixed: by[mixed]["bits_per_weight"]}
            compared.append(c)
            sig = " *" if c["significant"] else ""
            print(f"  {other:<28} {by[other]['bits_per_weight']:.3f} b/w  ->  {mixed:<42} {by[mixed]['bits_per_weight']:.3f} b/w: "
                  f"ΔKLD {c['delta']:+.5f} [{c['ci'][0]:+.5f}, {c['ci'][1]:+.5f}]{sig}")
    print("\npredicted (sum of per-layer KLDs) vs measured KLD:")
    predictions = []
    for f in (auto35, auto45, auto_at_edges):
        if f in by:
            r = by[f]
            predictions.append({"format": f, "predicted_kld": r["predicted_kld"], "kld_mean": r["kld_mean"],
                                "kld_stderr": r["kld_stderr"], "counts": r["mixed_allocation"]["counts"]})
            print(f"  {f:<42} predicted {r['predicted_kld']:.5f}  measured {r['kld_mean']:.5f} ± {r['kld_stderr']:.5f}"
                  f"  ({r['predicted_kld'] / r['kld_mean']:.2f}x)  formats: {r['mixed_allocation']['counts']}")

    print("\n4. quantscope recommend --max-ppl-increase 2")
    with tempfile.TemporaryDirectory() as tmp:
        out_json = Path(tmp) / "recommend.json"
        code = cli_main(["recommend", "--max-ppl-increase", "2", "--model", args.model, "--text", text,
                         *(a for pat in include for a in ("--include", pat)),
                         "--calib", text,
                         "--windows", str(args.windows), "--ctx", str(args.ctx), "--calib-samples", str(CALIB_SAMPLES),
                         "--calib-seqlen", str(CALIB_SEQLEN), "--threads", str(args.threads), "--out", args.out,
                         "--json", str(out_json)])
        import json

        decision = json.loads(out_json.read_text()) if code == 0 else {"exit_code": code}
    out = write(args.results_name, {
        "meta": meta, "edges_bits_per_weight": edges_bpw, "sensitivity": ranking, "records": records,
        "paired_kld": compared, "predicted_vs_measured": predictions, "recommend": decision,
    })
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
