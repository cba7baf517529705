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
    write_json_atomic(out, obj)
    return out
