"""Common accelerator memory sizes, and parsing of memory sizes such as ``24GB`` or ``24GiB``.

Sizes are the vendors' nominal capacities. GPU vendors' "GB" are binary: an "RTX 4090 24 GB" has
24 GiB (nvidia-smi: 24564 MiB), an "A100 80GB" 80 GiB, so GPU entries are stored as GiB x 2**30.
What a process can actually use is a little less (driver and CUDA context); the planner charges
that to its stated runtime overhead, not to the device.

Apple M-series machines share one memory between CPU and GPU, and macOS by default lets the GPU
wire only part of it (Metal's ``recommendedMaxWorkingSetSize``, commonly reported as about 2/3 of
RAM on machines up to 36 GB and 3/4 above; raised with ``sysctl iogpu.wired_limit_mb``). Those
entries list the full RAM as ``memory_bytes`` and that default fraction as ``usable_bytes``.

User input: ``--device 24GB`` means 24 x 10**9 bytes (SI), ``24GiB`` 24 x 2**30; ``MB``/``MiB``,
``TB``/``TiB`` and plain byte counts work too, as does a device name from the table (``rtx-4090``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from quantscope.errors import QuantscopeError
from quantscope.units import SIZE_RE, parse_memory  # noqa: F401  (re-exported: sizes such as --device 24GB)

GiB = 2**30



@dataclass(frozen=True)
class Device:
    name: str  # shown in plan tables; also accepted by --device (case, spaces, dashes ignored)
    memory_bytes: int  # nominal capacity
    usable_bytes: int  # what one model may occupy (= memory_bytes except unified-memory Macs)
    kind: str  # "gpu", "unified" (Apple M-series) or "custom" (from --device SIZE)


def _gpu(name: str, gib: int) -> Device:
    return Device(name, gib * GiB, gib * GiB, "gpu")


def _mac(name: str, gib: int) -> Device:
    fraction = (2, 3) if gib <= 36 else (3, 4)  # macOS default GPU working-set limit (see docstring)
    return Device(name, gib * GiB, gib * GiB * fraction[0] // fraction[1], "unified")


# Ordered by capacity so plan tables read from small to large.
DEVICES: tuple[Device, ...] = (
    _gpu("8GB GPU (RTX 4060)", 8),
    _gpu("12GB GPU (RTX 3060)", 12),
    _mac("Apple M 16GB", 16),
    _gpu("T4 16GB", 16),
    _gpu("16GB GPU (RTX 4080)", 16),
    _gpu("L4 24GB", 24),
    _gpu("A10G 24GB", 24),
    _gpu("RTX 3090 24GB", 24),
    _gpu("RTX 4090 24GB", 24),
    _mac("Apple M 32GB", 32),
    _gpu("A100 40GB", 40),
    _gpu("L40S 48GB", 48),
    _gpu("RTX 6000 Ada 48GB", 48),
    _mac("Apple M 64GB", 64),
    _gpu("A100 80GB", 80),
    _gpu("H100 80GB", 80),
)


def _norm(name: str) -> str:
    return re.sub(r"[\s_\-()]", "", name).lower()


def find_device(name: str) -> Device | None:
    """The table entry whose name matches (ignoring case, spaces, dashes), or one unique prefix match."""
    key = _norm(name)
    exact = [d for d in DEVICES if _norm(d.name) == key]
    if exact:
        return exact[0]
    # "rtx4090" matches "RTX 4090 24GB"; "a100" alone is ambiguous (40GB / 80GB) and matches nothing.
    partial = [d for d in DEVICES if _norm(d.name).startswith(key) or key in _norm(d.name)]
    return partial[0] if len(partial) == 1 else None


def parse_device(text: str) -> Device:
    """``--device``: a size (``24GB``, ``24GiB``) or a device name from :data:`DEVICES`."""
    device = find_device(text) if not SIZE_RE.match(str(text)) else None
    if device is not None:
        return device
    if SIZE_RE.match(str(text)):
        size = parse_memory(text)
        return Device(str(text).strip(), size, size, "custom")
    names = ", ".join(d.name for d in DEVICES)
    raise QuantscopeError(f"unknown device {text!r}: give a size like 24GB or 24GiB, or one of: {names}")
