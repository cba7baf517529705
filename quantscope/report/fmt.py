"""Number formatting for reports and terminal tables. `MISSING` ("—") marks a value not measured."""

from __future__ import annotations

import math
from typing import Any

MISSING = "—"


def num(value: Any) -> float | None:
    """`value` as a float, or None when it is missing, a bool or not a number."""
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def fmt_num(value: Any, decimals: int = 2) -> str:
    v = num(value)
    if v is None:
        return MISSING
    if not math.isfinite(v):
        return str(v)
    return f"{v:,.{decimals}f}"


def fmt_bytes(n: float | None) -> str:
    """A byte count in steps of 1024: "512 B", "513.1 MiB", up to TiB; None or NaN -> "-"."""
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def fmt_pct(value: Any, decimals: int = 1) -> str:
    v = num(value)
    return MISSING if v is None else f"{100 * v:.{decimals}f} %"


def fmt_pm(value: Any, stderr: Any) -> str:
    """`value ± stderr`, both rounded to the stderr's second significant digit."""
    v, se = num(value), num(stderr)
    if v is None:
        return MISSING
    if not math.isfinite(v):
        return str(v)
    if se is None or not math.isfinite(se) or se <= 0:
        digits = 4 if abs(v) < 1 else 3
        return f"{v:.{digits}g}" if v != 0 else "0"
    exponent = math.floor(math.log10(se)) - 1  # decimal place of se's 2nd significant digit
    if v != 0 and abs(v) < 1e-3:  # tiny KLDs: (1.23 ± 0.05)e-5 reads better than 0.0000123
        scale = math.floor(math.log10(abs(v)))
        decimals = max(0, scale - exponent)
        return f"({v / 10**scale:.{decimals}f} ± {se / 10**scale:.{decimals}f})e{scale}"
    decimals = max(0, -exponent)
    return f"{v:.{decimals}f} ± {se:.{decimals}f}"


# beside a speed figure when the format has no kernel that reads its packed weights here (schema 4 records)
REF_NOTE = ("ref: no kernel reads this format's packed weights here; its speed is the reference path "
            "(dequantize + fp32 matmul on every call), not the format's")


def speed_mark(record: dict) -> str:
    """" ref" when every quantized layer of the record ran the reference path, " part-ref" when some did."""
    k = str(record.get("kernel") or "")
    if k == "ref":
        return " ref"
    return " part-ref" if "ref x" in k else ""
