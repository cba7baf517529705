"""Microbenchmark: every candidate kernel for a quantized layer against fp32 `F.linear`, at the embedded
model's layer shapes (SmolLM2-135M: 576->576, 576->192, 576->1536, 1536->576), threads as torch has them.

Two settings:
- `layer`: one layer's weight, called repeatedly (it stays in the CPU's caches): the kernels' compute;
- `stack`: the decoder's 30 x 7 linears called in order, one token (1 row) through all of them, as a
  decode step does: the weights come from memory, which is what decoding is bound by.

Candidates: fp32 `F.linear` (the baseline), the reference path (dequantize + fp32 matmul), quantscope's
matrix-vector kernels over the packed codes and its tiled product (cpu_gemm.cpp: dequantized tiles in
cache, for a prefill's rows), torch's `_weight_int8pack_mm` and `_weight_int4pack_mm_for_cpu`
with fp32 and with bf16 activations (their fast path), and bf16 `F.linear` (bf16 weights and activations).
Run under the exclusive CPU lock:  flock -x /work/cpu.lock python benchmarks/kernel_speed.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks._common import write  # noqa: E402
from quantscope.formats.qtensor import quantize_tensor  # noqa: E402
from quantscope.formats.spec import parse_format  # noqa: E402
from quantscope.modules import cpu_kernels as ck  # noqa: E402
from quantscope.measure.machine import machine_info  # noqa: E402

SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576)]  # (in, out)
LAYER = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]  # q k v o gate up down
FORMATS = ("int8", "int4-g64", "int4-g128", "nf4")


def timed(fn, reps: int) -> float:
    """Median seconds of `reps` calls after 3 warm-up calls."""
    for _ in range(3):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def candidates(fmt: str, w: torch.Tensor, x: torch.Tensor) -> dict:
    """{name: zero-argument callable} for one format on weight w [out, in] and activations x."""
    spec = parse_format(fmt)
    qt = quantize_tensor(w, spec)
    shape = qt.shape
    out = {"ref": lambda: F.linear(x, qt.dequantize())}
    k = ck.kernel_for(spec, shape)
    if k is not None and ck.available():
        out[k.name] = lambda: ck.matvec(k, x, qt.tensors, spec, shape)
        out[f"tiled product ({ck.build()})"] = lambda: ck.gemm(k, x, qt.tensors, spec, shape)
        out["avx2 dequantize + fp32 matmul"] = lambda: F.linear(x, ck.dequantize(k, qt.tensors, spec, shape))
    xb = x.bfloat16()
    slow = x.shape[0] <= 4  # torch's fp32-activation paths are scalar loops: timed at decode shapes only
    if fmt == "int8":
        q8, s = qt.tensors["qweight"], qt.tensors["scales"].reshape(-1).float()
        if slow:
            out["torch int8pack fp32-act"] = lambda: torch._weight_int8pack_mm(x, q8, s)
        sb = s.bfloat16()
        out["torch int8pack bf16-act"] = lambda: torch._weight_int8pack_mm(xb, q8, sb)
    if fmt == "int4-g64" and x.shape[1] % 64 == 0:
        codes = torch.randint(0, 16, shape, dtype=torch.int32)  # layout cost only: torch's own packing
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        sz = torch.stack([torch.rand(shape[1] // 64, shape[0]), torch.randn(shape[1] // 64, shape[0])], -1) * 0.01
        if slow:
            out["torch int4pack fp32-act"] = lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 64, sz)
        szb = sz.bfloat16()
        out["torch int4pack bf16-act"] = lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, packed, 64, szb)
    return out


def layer_bench(rows: tuple[int, ...], reps: int) -> list[dict]:
    res = []
    for in_f, out_f in SHAPES:
        w = torch.randn(out_f, in_f) * 0.02
        wb = w.bfloat16()
        for m in rows:
            x = torch.randn(m, in_f)
            xb = x.bfloat16()
            base = timed(lambda: F.linear(x, w), reps)
            row = {"shape": f"{in_f}->{out_f}", "rows": m, "fp32_us": 1e6 * base,
                   "bf16 F.linear": 1e6 * timed(lambda: F.linear(xb, wb), reps)}
            for fmt in FORMATS:
                for name, fn in candidates(fmt, w, x).items():
                    row[f"{fmt}: {name}"] = 1e6 * timed(fn, reps)
            res.append(row)
            print(row["shape"], m, {k: round(v, 1) for k, v in row.items() if isinstance(v, float)}, flush=True)
    return res


def stack_bench(reps: int) -> dict:
    """One token through 30 layers x 7 linears (the decoder's weights, from memory): ms per token."""
    torch.manual_seed(0)
    ws = [torch.randn(o, i) * 0.02 for _ in range(30) for i, o in LAYER]
    xs = {i: torch.randn(1, i) for i in (576, 1536)}
    out = {"fp32 F.linear": 1e3 * timed(lambda: [F.linear(xs[w.shape[1]], w) for w in ws], reps)}
    wbs = [w.bfloat16() for w in ws]
    xbs = {i: x.bfloat16() for i, x in xs.items()}
    out["bf16 F.linear"] = 1e3 * timed(lambda: [F.linear(xbs[w.shape[1]], w) for w in wbs], reps)
    for fmt in FORMATS:
        spec = parse_format(fmt)
        qts = [quantize_tensor(w, spec) for w in ws]
        out[f"{fmt}: ref"] = 1e3 * timed(lambda: [F.linear(xs[q.shape[1]], q.dequantize()) for q in qts], reps)
        k0 = ck.kernel_for(spec, qts[0].shape)
        if k0 is not None and ck.available():
            ks = [ck.kernel_for(spec, q.shape) for q in qts]
            out[f"{fmt}: {k0.name}"] = 1e3 * timed(
                lambda: [ck.matvec(k, xs[q.shape[1]], q.tensors, spec, q.shape) for k, q in zip(ks, qts)], reps)
        if fmt == "int8":
            packs = [(q.tensors["qweight"], q.tensors["scales"].reshape(-1).bfloat16()) for q in qts]
            out["int8: torch int8pack bf16-act"] = 1e3 * timed(
                lambda: [torch._weight_int8pack_mm(xbs[q.shape[1]], a, b) for q, (a, b) in zip(qts, packs)], reps)
        print(fmt, {k: round(v, 2) for k, v in out.items() if k.startswith(fmt)}, flush=True)
    print("fp32/bf16", {k: round(v, 2) for k, v in out.items() if "F.linear" in k}, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,2,4,8,16,32,64,128,256")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if not ck.available():
        print("quantscope's CPU kernels are unavailable:", ck.unavailable_reason())
    rows = tuple(int(r) for r in a.rows.split(","))
    res = {"threads": a.threads, "machine": machine_info(), "torch": torch.__version__,
           "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "kernel_build": ck.build() if ck.available() else ck.unavailable_reason(),
           "stack_ms_per_token": stack_bench(a.reps), "layer_us": layer_bench(rows, a.reps)}
    print("wrote", write("kernels", res))


if __name__ == "__main__":
    main()
