"""Where a model runs and in which dtype: `--device auto|cpu|cuda|cuda:N|mps` and
`--dtype auto|fp32|bf16|fp16`, resolved once, checked before any work (a device that is not there,
or a dtype it cannot compute, is one line), and small helpers that keep the rest of the package
device-agnostic (inputs go where the model's weights are; timings wait for the device).

`auto` device: the first CUDA GPU, else Apple's MPS, else the CPU. `auto` dtype: the checkpoint's
own dtype (config.json's `dtype` / `torch_dtype`) on an accelerator, float32 on the CPU, where
bf16/fp16 matmuls are slower than fp32 on most processors and float32 is the reference.
"""

from __future__ import annotations

from .dtypes import short_name
from .errors import QuantscopeError

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"
DTYPE_CHOICES = "auto, fp32, bf16 or fp16"


def resolve_device(name: str = "auto") -> str:
    """'auto', 'cpu', 'cuda', 'cuda:N' or 'mps' -> a device that is here ('cuda' -> 'cuda:0')."""
    import torch

    key = str(name or "auto").strip().lower()
    if key == "auto":
        if torch.cuda.is_available():
            return "cuda:0"
        mps = getattr(torch.backends, "mps", None)
        return "mps" if mps is not None and mps.is_available() else "cpu"
    if key == "cpu":
        return "cpu"
    if key == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise QuantscopeError("--device mps: Apple's MPS backend is not available on this machine")
        return "mps"
    if key == "cuda" or key.startswith("cuda:"):
        index = key.partition(":")[2] or "0"
        if not index.isdigit():
            raise QuantscopeError(f"--device {name}: the GPU index must be a number (cuda:0, cuda:1 ...)")
        if not torch.cuda.is_available():
            why = ("this torch is a CPU build" if torch.version.cuda is None
                   else "torch sees no GPU (driver, CUDA_VISIBLE_DEVICES?)")
            raise QuantscopeError(f"--device {name}: no CUDA device here ({why}); use --device cpu")
        count = torch.cuda.device_count()
        if int(index) >= count:
            raise QuantscopeError(f"--device {name}: this machine has {count} CUDA device(s) (cuda:0"
                                  f"{f'..cuda:{count - 1}' if count > 1 else ''})")
        return f"cuda:{int(index)}"
    raise QuantscopeError(f"unknown --device '{name}' (use {DEVICE_CHOICES})")


def resolve_dtype(name: str, device: str, checkpoint_dtype: str | None = None) -> str:
    """'auto' or a dtype name -> 'float32', 'bfloat16' or 'float16' for the baseline on `device`
    (already resolved); refuses a dtype the device cannot compute."""
    from .dtypes import torch_name

    key = str(name or "auto").strip().lower()
    if key == "auto":
        if device == "cpu" or not checkpoint_dtype:
            return "float32"
        try:
            key = short_name(checkpoint_dtype)
        except QuantscopeError:  # a checkpoint dtype we do not measure in (int8 ...): the reference
            return "float32"
    else:
        try:
            key = short_name(key)
        except QuantscopeError:
            raise QuantscopeError(f"unknown --dtype '{name}' (use {DTYPE_CHOICES})") from None
    if key == "bf16" and device.startswith("cuda"):
        import torch

        if not torch.cuda.is_bf16_supported():
            raise QuantscopeError(f"--dtype bf16: {torch.cuda.get_device_name(device)} cannot compute in "
                                  "bfloat16 (compute capability < 8.0); use --dtype fp16 or fp32")
    return torch_name(key)


def module_device(module):
    """The device of a module's first parameter (or buffer): where its inputs must go; the CPU for a
    module that holds no tensor."""
    import torch

    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def synchronize(device) -> None:
    """Wait for the device's queued work (a timer read before this measures the launch, not the work)."""
    import torch

    kind = torch.device(device).type
    if kind == "cuda":
        torch.cuda.synchronize(device)
    elif kind == "mps":
        torch.mps.synchronize()


def compute_dtype(dtype: str, device: str) -> str:
    """The dtype the streamed path computes a block in when its weights are stored in `dtype`: `dtype`
    itself, except half precision on a CPU without native bfloat16/float16 matrix units (AVX512-BF16,
    AMX, AVX512-FP16), where torch's half-precision matmuls are several times slower than float32 (8.6 vs
    60 GFLOPS measured on a 2-core AVX2 EPYC): there the weights keep their half-precision values and the
    arithmetic is done in float32."""
    import torch

    if dtype == "float32" or torch.device(device).type != "cpu":
        return dtype
    native = {"bfloat16": ("avx512_bf16", "amx_bf16"), "float16": ("avx512_fp16", "amx_fp16")}.get(dtype, ())
    return dtype if cpu_flags() & set(native) else "float32"


def cpu_flags() -> set[str]:
    """The CPU's feature flags (/proc/cpuinfo on Linux; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()
