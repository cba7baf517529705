"""Memory, measured: the bytes of the tensors that hold a model, and the process's peak RSS.

`weight_bytes` walks every parameter and persistent buffer of every module once, de-duplicating tensors
that share storage (tied embeddings), and sums `numel * element_size`. For quantized modules those are
the packed codes, scales and zero points. Nothing here knows about formats: any nn.Module works.
Tensor subclasses whose storage lives in inner tensors can be handled by passing `tensors` explicitly.
"""

from __future__ import annotations

import resource
import sys
from typing import Iterable

import torch
from torch import nn


def model_tensors(model: nn.Module) -> Iterable[torch.Tensor]:
    """Parameters and persistent buffers of every module (non-persistent buffers such as rotary
    frequency tables are derived data, not weights)."""
    for mod in model.modules():
        for p in mod._parameters.values():
            if p is not None:
                yield p
        for name, b in mod._buffers.items():
            if b is not None and name not in mod._non_persistent_buffers_set:
                yield b


def _key(t: torch.Tensor):
    try:
        st = t.untyped_storage()
        return (st.data_ptr(), st.nbytes())
    except (RuntimeError, NotImplementedError):
        return ("id", id(t))


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Total bytes of the distinct storages behind `tensors` (a view counts its whole storage once)."""
    seen: dict = {}
    for t in tensors:
        k = _key(t)
        if k not in seen:
            seen[k] = k[1] if k[0] != "id" else t.numel() * t.element_size()
    return int(sum(seen.values()))


def weight_bytes(model: nn.Module, tensors: Iterable[torch.Tensor] | None = None) -> int:
    return tensor_bytes(model_tensors(model) if tensors is None else tensors)


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_rss_bytes() -> int:
    """Peak resident set size of this process's own address space so far.

    Linux: `VmHWM` from /proc/self/status. Not `ru_maxrss`: the kernel folds the pre-exec address
    space's high-water mark into ru_maxrss, so a worker started with the "spawn" method (fork + exec)
    would report its parent's peak at fork time whenever that is larger: a parent holding the baseline's
    log-probabilities made every quantized worker look gigabytes bigger. Elsewhere: ru_maxrss (KiB on
    Linux, bytes on macOS)."""
    kib = _proc_status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


def reset_peak_rss() -> bool:
    """Restart this process's peak-RSS count from its current RSS (Linux: "5" to /proc/self/clear_refs),
    so the peak of one phase (quantization) can be read on its own. False where unsupported; callers
    keep the earlier peak themselves (max of before and after) if they still need the whole process's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def heap_trimmer():
    """A function that hands the heap's freed pages back to the system (glibc's ``malloc_trim(0)``).

    glibc keeps freed temporaries (logits, dequantized weights, a streamed block's activations) in
    fragmented per-thread heaps, so without it RSS creeps up with every window or block and the peak
    becomes a property of the run's length and of CPU contention (contended threads open more heaps),
    not of the format. Nothing in torch or the standard library does this; a no-op where glibc is absent."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return lambda: libc.malloc_trim(0)
    except (OSError, AttributeError):
        return lambda: None


def current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return peak_rss_bytes()


def peak_device_bytes(device) -> int | None:
    """Peak bytes torch's caching allocator has held on a CUDA device since the last reset (the GPU
    side of a format's peak, next to peak RSS); None on the CPU and on devices without the counter."""
    if torch.device(device).type != "cuda":
        return None
    return int(torch.cuda.max_memory_allocated(device))


def reset_peak_device(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
