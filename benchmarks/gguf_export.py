"""Issue 17 benchmark: GGUF export of the embedded model, each file reloaded and measured.

    python benchmarks/gguf_export.py [--windows 4] [--calib-samples 32] [--formats ...]

Embedded SmolLM2-135M (its Q4_1 GGUF dequantized to FP32 is the baseline). Calibration (GPTQ/AWQ/mixed):
the head of WikiText-2 valid; evaluation: `--windows` windows of 512 tokens of WikiText-2 test. For
each format: quantize, `save_gguf` (gguf-py read-back + transformers reload check inside), then on the
same windows the KLD against the baseline of (a) quantscope's in-memory quantized model and (b) the
saved file reloaded by transformers' GGUF loader, and (c) llama.cpp's own logits on the file when
llama-cpp-python is importable. Prints a table; writes benchmarks/results/gguf_export.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time
from pathlib import Path

import torch
from _common import shared, write

FORMATS = ("int8-g32-sym,int4-g32-sym,int4-g32,gptq-int4-g32-sym-act,awq-int4-g32-sym,"
           "mixed-edges:int4-g32-sym/int8-g32-sym")


def _kld(base: list[torch.Tensor], other: list[torch.Tensor]) -> float:
    from quantscope.model.gguf_check import compare_logits

    return sum(compare_logits(b, o)[0] for b, o in zip(base, other)) / len(base)


def _logits(model, windows) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(input_ids=w.unsqueeze(0), use_cache=False).logits[0].float() for w in windows]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--formats", default=FORMATS)
    args = ap.parse_args()
    torch.set_num_threads(2)
    from quantscope.backends.llamacpp import gguf_source
    from quantscope.evaluate.text import load_text, tokenize
    from quantscope.model.gguf_check import reload_model
    from quantscope.model.gguf_export import save_gguf
    from quantscope.model.load import load_model
    from quantscope.quantization import QuantizeOptions, quantize, resolve

    lm = load_model("default")
    test = tokenize(lm.tokenizer, load_text(shared("wikitext2/wiki.test.raw")).text[:200_000])
    train = tokenize(lm.tokenizer, load_text(shared("wikitext2/wiki.valid.tokens")).text[:400_000])
    windows = [test[i * args.ctx:(i + 1) * args.ctx] for i in range(args.windows)]
    calib = [train[i * 512:(i + 1) * 512] for i in range(args.calib_samples)]
    base = _logits(lm.model, windows)
    has_cpp = importlib.util.find_spec("llama_cpp") is not None
    rows = []
    work = Path(tempfile.mkdtemp(prefix="quantscope-gguf-bench-"))
    for name in args.formats.split(","):
        fmt = resolve(name)
        model = load_model("default").model
        t0 = time.perf_counter()
        q = quantize(model, fmt, QuantizeOptions(calib=calib if fmt.needs_calibration else None)).model
        secs = time.perf_counter() - t0
        ours = _logits(q, windows)
        out = work / (name.replace("/", "_") + ".gguf")
        r = save_gguf(q, lm.tokenizer, q.config, out, windows[0][:64], {"model": "embedded", "format": name},
                      gguf_source("default"))
        reloaded = _logits(reload_model(out), windows)
        row = {"format": name, "gguf_types": r.gguf_types, "file_bytes": r.file_bytes,
               "readback_identical": r.readback_identical, "exact": r.exact, "max_weight_diff": r.max_weight_diff,
               "check_kld": r.kld, "kld_quantscope": _kld(base, ours), "kld_reloaded": _kld(base, reloaded),
               "quantize_seconds": secs, "kld_llamacpp": None}
        if has_cpp:
            from quantscope.backends.llamacpp import LlamaCppLM

            cpp = LlamaCppLM(out, args.ctx, 2, {})
            row["kld_llamacpp"] = _kld(base, _logits(cpp, windows))
        rows.append(row)
        print(f"done: {name}", flush=True)
        out.unlink()
    hdr = f"{'format':34} {'GGUF types':22} {'bytes':>11} {'read-back':>9} {'KLD qs':>9} {'KLD file':>9} {'KLD llama.cpp':>13}"
    print(f"embedded SmolLM2-135M, WikiText-2 test, {args.windows} x {args.ctx} tokens; calib {args.calib_samples} x 512 (valid)")
    print(hdr)
    for r in rows:
        types = "+".join(f"{t}x{n}" for t, n in sorted(r["gguf_types"].items()))
        cpp = "n/a" if r["kld_llamacpp"] is None else f"{r['kld_llamacpp']:.5f}"
        print(f"{r['format']:34} {types:22} {r['file_bytes']:>11} {'identical' if r['readback_identical'] else 'DIFF':>9} "
              f"{r['kld_quantscope']:>9.5f} {r['kld_reloaded']:>9.5f} {cpp:>13}")
    meta = {"model": lm.info.name, "windows": args.windows, "ctx": args.ctx, "calib_samples": args.calib_samples,
            "llama_cpp": has_cpp, "kld": "mean KL(baseline || model) per token, nats"}
    print(f"wrote {write('gguf_export', {'meta': meta, 'rows': rows})}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
