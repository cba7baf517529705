"""Issue 4 benchmark: quantscope's own formats and the libraries people deploy, one protocol.

    python benchmarks/libraries.py [--windows 32] [--group all|8|4|3]

Same model, text and windows as benchmarks/core_formats.py (WikiText-2 test, ctx 512, 32 windows from
the start; the run directory is shared, so formats already measured there are reused, not re-run).
quantscope's calibrated formats are a separate group (`--group cal`; benchmarks/calibrated.py compares them
in full); they calibrate on 128 x 512 tokens of the Python docs text, so the evaluation windows stay the
same. llm-compressor's rows need QUANTSCOPE_LLMC_PYTHON (see README); its g128 rows are skipped on
this model with the reason (576-wide layers), the g64 rows run (they calibrate on the Python docs too).
llama.cpp rows need llama-cpp-python (pip install 'quantscope[llamacpp]'); without it they are rows
with the install hint.
Rows sorted by bits per weight. Writes benchmarks/results/libraries.json.
"""

from __future__ import annotations

import argparse
import sys

from _common import shared, write

from quantscope.report.terminal import comparison_table
from quantscope.harness import CompareConfig, compare

# gguf-py's Q8_0/Q4_0/Q4_1 rows (gguf-q8_0, ...) are left out: llama.cpp runs the same block types with
# its own kernels here, while the gguf-py path dequantizes every weight on every call (~2 s a forward)
GROUPS = {
    # llama.cpp running the baseline itself (F32): the engine's own numerical distance from torch
    "ref": "bf16,llamacpp-f32",
    "8": "int8,fp8-e4m3,bnb-int8,torchao-int8wo,torchao-int8dq,quanto-int8,quanto-fp8,llamacpp-q8_0",
    "6": "llamacpp-q6_k,llamacpp-q5_k_m",
    "4": "int4-g128,int4-g64,nf4,bnb-nf4,bnb-fp4,hqq-int4-g64,quanto-int4,"
         "torchao-int4wo-g32,gguf-q4_k_m,llamacpp-q4_k_m,llamacpp-q4_0,llamacpp-iq4_nl,"
         "llmc-gptq-int4-g64,llmc-awq-int4-g64,llmc-gptq-int4-g128,llmc-awq-int4-g128",
    "3": "int3-g128,int3-g64,hqq-int3-g64,gguf-q3_k_m,llamacpp-q3_k_m,llamacpp-q2_k",
    # quantscope's calibrated formats (pass --group cal; their full comparison is benchmarks/calibrated.py)
    "cal": "gptq-int4-g128-act,awq-int4-g128,gptq-int3-g128-act",
}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--group", default="all", choices=["all", *GROUPS])
    ap.add_argument("--out", default="benchmarks/runs/core_formats")
    args = ap.parse_args()
    names = ",".join(v for k, v in GROUPS.items() if k != "cal") if args.group == "all" else GROUPS[args.group]
    cfg = CompareConfig(formats=tuple(names.split(",")), text=shared("wikitext2/wiki.test.raw"), ctx=512,
                        windows=args.windows, threads=2, calib="python-docs")
    records, meta = compare(cfg, on_record=lambda r: print(f"done: {r['format']}", file=sys.stderr, flush=True),
                            run_dir=args.out)
    ok = sorted((r for r in records if not r.get("error")), key=lambda r: (r["bits_per_weight"], r["kld_mean"]))
    skipped = [r for r in records if r.get("error")]
    print(f"model: {meta['model']}\ntext: {meta['text']}, ctx 512, {meta['windows']} windows")
    print(comparison_table(ok + skipped))
    out = write(f"libraries-{args.group}", {"meta": meta, "records": ok + skipped})
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
