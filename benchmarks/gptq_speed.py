"""Issue 3 benchmark: how long GPTQ takes on the embedded model, float32 vs bfloat16 forward passes.

    python benchmarks/gptq_speed.py [--formats gptq-int4-g128,gptq-int4-g128-bf16fwd] [--repeats 2]

Calibration = the first 128 x 512 tokens of WikiText-2 test (as benchmarks/calibrated.py). Each format
quantizes a fresh copy of the model in this process, in turns (A B A B ...), so the ratio of their
times is measured under the same machine load. Accuracy (KLD on 32 windows after the calibration
head) is benchmarks/calibrated.py's job: run it with --formats including the -bf16fwd rows.
Writes benchmarks/results/gptq_speed.json.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from _common import shared, write

from quantscope.evaluate.text import load_text, tokenize
from quantscope.formats.spec import parse_format
from quantscope.methods.calibrate import quantize_calibrated
from quantscope.model.load import load_model


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--formats", default="gptq-int4-g128,gptq-int4-g128-bf16fwd")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model("default")
    ids = tokenize(lm.tokenizer, load_text(shared("wikitext2/wiki.test.raw")).text)
    calib = list(ids[: 128 * 512].view(128, 512))
    formats = args.formats.split(",")
    runs: dict[str, list[dict]] = {f: [] for f in formats}
    for rep in range(args.repeats):
        for name in formats:
            model = copy.deepcopy(lm.model)
            t0 = time.perf_counter()
            quantize_calibrated(model, parse_format(name), calib)
            runs[name].append({"seconds": time.perf_counter() - t0})
            print(f"run {rep + 1} {name:<28} {runs[name][-1]['seconds']:6.1f} s", flush=True)
            del model
    base = formats[0]
    med = {f: statistics.median(r["seconds"] for r in runs[f]) for f in formats}
    print(f"\nembedded model, calibration 128 x 512 WikiText-2 tokens, {args.threads} threads, "
          f"median of {args.repeats} (runs interleaved)")
    print(f"{'format':<28} {'seconds':>8} {'runs':>18} {'vs ' + base:>14}")
    for f in formats:
        each = ", ".join(f"{r['seconds']:.0f}" for r in runs[f])
        print(f"{f:<28} {med[f]:8.1f} {each:>18} {med[base] / med[f]:13.2f}x")
    out = write("gptq_speed", {"threads": args.threads, "repeats": args.repeats, "calib_tokens": 128 * 512,
                               "runs": runs, "median_seconds": med})
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
