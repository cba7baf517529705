"""Memory sizes as users type them: ``24GB`` = 24 x 10**9 bytes (SI), ``24GiB`` = 24 x 2**30.

A floor below formats, methods and plan: mixed precision's byte budgets and the planner's device
sizes read sizes the same way.
"""

from __future__ import annotations

import re

from .errors import QuantscopeError

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_memory(text: str) -> int:
    """``"24GB"`` -> 24_000_000_000, ``"24GiB"`` -> 25_769_803_776, ``"512MiB"``, ``"1e9"`` is rejected."""
    m = SIZE_RE.match(str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise QuantscopeError(
            f"cannot read memory size {text!r}: use a number with a unit, e.g. 24GB (10^9 bytes) or 24GiB (2^30)"
        )
    value = float(m.group(1)) * _UNITS[unit]
    if value <= 0:
        raise QuantscopeError(f"memory size {text!r} must be positive")
    return int(value)
