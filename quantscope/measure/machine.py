"""Where a measurement was made: the one description of the machine, in every run's provenance."""

from __future__ import annotations

import os
import platform
import sys
from typing import Any


def cpu_model() -> str | None:
    """The CPU's model name (/proc/cpuinfo on Linux; platform.processor() elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def machine_info() -> dict[str, Any]:
    torch = sys.modules.get("torch")  # its thread count when loaded; never imported for this
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads() if torch else None,
        "python": platform.python_version(),
    }


def available_memory_bytes() -> int | None:
    """Memory a new allocation can get without swapping: the kernel's MemAvailable, capped by this
    cgroup's limit less its usage (containers); None where neither can be read."""
    avail = None
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open("/sys/fs/cgroup/memory.max", encoding="utf-8") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current", encoding="utf-8") as f:
            used = int(f.read().strip())
        if limit != "max":
            left = int(limit) - used
            avail = left if avail is None else min(avail, left)
    except (OSError, ValueError):
        pass
    return avail

