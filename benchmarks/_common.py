"""Shared bits of the benchmark scripts: where the shared data lives, and printing/writing results."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"


def shared(path: str) -> str:
    p = SHARED_DATA / path
    if not p.exists():
        sys.exit(f"benchmark data not found: {p} (the benchmarks read ../shared/data beside the repo)")
    return str(p)


def write(name: str, obj) -> Path:
    from quantscope.fileio import write_json_atomic

    out = RESULTS / f"{name}.json"
    if isinstance(obj, dict) and not {"machine", "machine_info"} & set(obj):  # timings mean little without it
        from quantscope.measure.machine import machine_info
        from quantscope.placement import cpu_flags

        wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8")
        obj = {**obj, "machine_info": {**machine_info(), "cpu_flags": sorted(cpu_flags() & set(wanted))}}
    write_json_atomic(out, obj)
    return out
