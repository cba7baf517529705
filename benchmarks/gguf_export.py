"""Issue 17 benchmark: GGUF export of the embedded model, each file reloaded and measured by llama.cpp.

    python benchmarks/gguf_export.py [--windows 8] [--calib-samples 32] [--formats ...]

Embedded SmolLM2-135M (its Q4_1 GGUF dequantized to FP32 is the baseline). Calibration (GPTQ/AWQ/mixed
and llama.cpp's importance matrix): the head of WikiText-2 valid; evaluation: `--windows` windows of
`--ctx` tokens of WikiText-2 test, every position but the first scored.

Table 1, export: per quantscope format, `save_gguf` (gguf-py read-back + transformers reload check
inside), then on the same windows, against the torch baseline, the KLD of (a) quantscope's in-memory
quantized model, (b) the file reloaded by transformers' GGUF loader, (c) llama.cpp's own logits on the
file, and (d) quantscope's model with llama.cpp's 8-bit activation rounding
(`gguf_check.llamacpp_activation_rounding`); perplexity of (a) and (c).

Table 2, Q4_0 files measured by llama.cpp's kernels: quantscope's Q4_0 from RTN, GPTQ (act-order) and
AWQ codes against llama.cpp's `llama_model_quantize` Q4_0, without and with its importance matrix
(computed on the same calibration sequences), plus llama.cpp's Q8_0 and its F32 file (the engine's own
difference from torch). KLD against the torch baseline and against llama.cpp's F32 file (what
`llama-perplexity --kl-divergence` reports). Needs llama-cpp-python. Writes benchmarks/results/gguf_export.json.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from _common import shared, write

FORMATS = ("int8-g32-sym,int4-g32-sym,int4-g32,gptq-int4-g32-sym-act,awq-int4-g32-sym,"
           "mixed-edges:int4-g32-sym/int8-g32-sym")
LLAMACPP = ("llamacpp-f32", "llamacpp-q8_0", "llamacpp-q4_0", "llamacpp-q4_0-imatrix")


class Refs:
    """Log-probabilities of a model on the windows, kept to serve as a KLD reference."""

    def __init__(self, model, windows):
        from quantscope.evaluate.perplexity import score_windows

        self.logp = {}
        self.summary = score_windows(model, windows, export=lambda i, lp: self.logp.__setitem__(i, lp.clone())).summary()

    def __call__(self, i):
        return self.logp[i]


def measure(model, windows, *refs) -> dict:
    """Perplexity, and KLD / top-1 against each reference (the first also gives the window sums)."""
    from quantscope.evaluate.perplexity import score_windows

    out = {}
    for k, ref in enumerate(refs):
        s = score_windows(model, windows, reference=ref).summary()
        if k == 0:
            out.update(perplexity=s["perplexity"], kld=s["kld_mean"], top1=s["top1_agreement"],
                       window_kld=[x / t for x, t in zip(s["window_kld"], s["window_tokens"])])
        else:
            out[f"kld_ref{k}"] = s["kld_mean"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--formats", default=FORMATS)
    args = ap.parse_args()
    torch.set_num_threads(2)
    from quantscope.backends import llamacpp
    from quantscope.evaluate.text import load_text, tokenize
    from quantscope.model.gguf_check import llamacpp_activation_rounding, reload_model
    from quantscope.model.gguf_export import save_gguf
    from quantscope.model.load import load_model
    from quantscope.quantization import QuantizeOptions, quantize, resolve

    lm = load_model("default")
    test = tokenize(lm.tokenizer, load_text(shared("wikitext2/wiki.test.raw")).text[:200_000])
    train = tokenize(lm.tokenizer, load_text(shared("wikitext2/wiki.valid.tokens")).text[:400_000])
    windows = torch.stack([test[i * args.ctx:(i + 1) * args.ctx] for i in range(args.windows)])
    calib = [train[i * 512:(i + 1) * 512] for i in range(args.calib_samples)]
    base = Refs(lm.model, windows)
    src = llamacpp.gguf_source("default")
    f32 = llamacpp.f32_gguf(src)

    def cpp(path):
        return llamacpp.LlamaCppLM(path, args.ctx, 2, llamacpp.tensor_types(path))

    cpp_f32_model = cpp(f32)
    cpp_f32 = Refs(cpp_f32_model, windows)
    cpp_f32_model._llm.close()
    work = Path(tempfile.mkdtemp(prefix="quantscope-gguf-bench-"))
    export_rows, q4_rows = [], []
    for name in args.formats.split(","):
        fmt = resolve(name)
        t0 = time.perf_counter()
        q = quantize(load_model("default").model, fmt, QuantizeOptions(calib=calib if fmt.needs_calibration else None)).model
        secs = time.perf_counter() - t0
        ours = measure(q, windows, base)
        with llamacpp_activation_rounding(q):
            rounded = measure(q, windows, base)
        out = work / (name.replace("/", "_").replace(":", "_") + ".gguf")
        r = save_gguf(q, lm.tokenizer, q.config, out, windows[0][:64], {"model": "embedded", "format": name}, src)
        reloaded = measure(reload_model(out), windows, base)
        m = cpp(out)
        theirs = measure(m, windows, base, cpp_f32)
        m._llm.close()
        row = {"format": name, "gguf_types": r.gguf_types, "file_bytes": r.file_bytes,
               "readback_identical": r.readback_identical, "exact": r.exact, "max_weight_diff": r.max_weight_diff,
               "check_kld": r.kld, "quantize_seconds": secs, "ppl_quantscope": ours["perplexity"],
               "ppl_llamacpp": theirs["perplexity"], "kld_quantscope": ours["kld"], "kld_reloaded": reloaded["kld"],
               "kld_llamacpp": theirs["kld"], "kld_quantscope_q8_activations": rounded["kld"],
               "kld_llamacpp_vs_llamacpp_f32": theirs["kld_ref1"], "top1_llamacpp": theirs["top1"]}
        export_rows.append(row)
        if set(r.gguf_types) <= {"Q4_0", "F32"}:
            q4_rows.append({"file": f"quantscope {name}", "gguf_types": r.gguf_types, "file_bytes": r.file_bytes,
                            "ppl": theirs["perplexity"], "kld": theirs["kld"], "kld_vs_llamacpp_f32": theirs["kld_ref1"],
                            "top1": theirs["top1"], "quantize_seconds": secs, "window_kld": theirs["window_kld"]})
        print(f"done: {name}", flush=True)
        out.unlink()
        del q
    for name in LLAMACPP:
        fmt = resolve(name)
        path = f32 if name == "llamacpp-f32" else work / f"{name}.gguf"
        t0 = time.perf_counter()
        if name != "llamacpp-f32":
            llamacpp.make_file(fmt.spec, lm.model, calib, f32, path, 2)
        secs = time.perf_counter() - t0
        m = cpp(path)
        theirs = measure(m, windows, base, cpp_f32)
        q4_rows.append({"file": name, "gguf_types": dict(m.types), "file_bytes": path.stat().st_size,
                        "ppl": theirs["perplexity"], "kld": theirs["kld"], "kld_vs_llamacpp_f32": theirs["kld_ref1"],
                        "top1": theirs["top1"], "quantize_seconds": secs, "window_kld": theirs["window_kld"]})
        m._llm.close()
        print(f"done: {name}", flush=True)
    _pair_with_llamacpp(q4_rows)
    _print(args, base, export_rows, q4_rows)
    meta = {"model": lm.info.name, "windows": args.windows, "ctx": args.ctx, "calib_samples": args.calib_samples,
            "baseline_perplexity": base.summary["perplexity"], "llamacpp_version": llamacpp.version(),
            "kld": "mean KL(reference || model) per token, nats; reference = the torch baseline unless named",
            "tokens_scored": base.summary["tokens_scored"]}
    print(f"wrote {write('gguf_export', {'meta': meta, 'export': export_rows, 'q4_0': q4_rows})}")
    return 0


def _pair_with_llamacpp(rows: list[dict]) -> None:
    """Each file's KLD minus that of llama.cpp's own Q4_0 files (plain and with its importance matrix):
    a paired bootstrap over windows (each window's mean KLD per token), so "better" means the interval
    lies below zero."""
    from quantscope.evaluate.stats import paired_bootstrap_ci

    refs = {r["file"]: r["window_kld"] for r in rows if r["file"] in ("llamacpp-q4_0", "llamacpp-q4_0-imatrix")}
    for r in rows:
        r["kld_minus"] = {ref: dict(zip(("delta", "lo", "hi"), paired_bootstrap_ci(w, r["window_kld"])))
                          for ref, w in refs.items() if ref != r["file"]}


def _types(t: dict) -> str:
    return "+".join(f"{k}x{n}" for k, n in sorted(t.items()))


def _print(args, base, export_rows, q4_rows) -> None:
    print(f"embedded SmolLM2-135M, WikiText-2 test, {args.windows} x {args.ctx} tokens; calib {args.calib_samples} "
          f"x 512 (valid); baseline perplexity {base.summary['perplexity']:.3f}")
    print("\nexport: quantscope's file, measured by quantscope, transformers' reload and llama.cpp (KLD vs torch baseline)")
    print(f"{'format':38} {'GGUF types':18} {'bytes':>10} {'read-back':>9} {'ppl qs':>8} {'ppl cpp':>8} {'Δppl':>6} "
          f"{'KLD qs':>8} {'KLD file':>8} {'KLD cpp':>8} {'ΔKLD':>6} {'KLD qs+q8a':>10}")
    for r in export_rows:
        dp = 100 * (r["ppl_llamacpp"] / r["ppl_quantscope"] - 1)
        dk = 100 * (r["kld_llamacpp"] / r["kld_quantscope"] - 1)
        print(f"{r['format']:38} {_types(r['gguf_types']):18} {r['file_bytes']:>10} "
              f"{'identical' if r['readback_identical'] else 'DIFF':>9} {r['ppl_quantscope']:>8.3f} {r['ppl_llamacpp']:>8.3f} "
              f"{dp:>+5.1f}% {r['kld_quantscope']:>8.5f} {r['kld_reloaded']:>8.5f} {r['kld_llamacpp']:>8.5f} {dk:>+5.1f}% "
              f"{r['kld_quantscope_q8_activations']:>10.5f}")
    print("\nfiles measured by llama.cpp's kernels (KLD vs the torch baseline, and vs llama.cpp's own F32 file)")
    print(f"{'file':40} {'GGUF types':26} {'bytes':>10} {'ppl':>8} {'KLD':>8} {'KLD vs F32':>10} {'top-1':>6} "
          f"{'KLD - cpp q4_0 [95% CI]':>27} {'KLD - cpp q4_0+imatrix [95% CI]':>31}")
    for r in q4_rows:
        d = [r["kld_minus"].get(k) for k in ("llamacpp-q4_0", "llamacpp-q4_0-imatrix")]
        cells = [f"{x['delta']:+.4f} [{x['lo']:+.4f}, {x['hi']:+.4f}]" if x else "" for x in d]
        print(f"{r['file']:40} {_types(r['gguf_types']):26} {r['file_bytes']:>10} {r['ppl']:>8.3f} {r['kld']:>8.5f} "
              f"{r['kld_vs_llamacpp_f32']:>10.5f} {100 * r['top1']:>5.1f}% {cells[0]:>27} {cells[1]:>31}")


if __name__ == "__main__":
    raise SystemExit(main())
