"""Kernels that read quantscope's packed weights directly (x86-64 CPUs with AVX2/FMA/F16C; AVX-512 used
where the CPU has it).

A quantized layer's reference forward dequantizes its whole weight to fp32 and calls the fp32 matmul:
right for a 512-token evaluation window, where the matmul dominates, but on a one-token decode step it
moves four bytes per weight through memory twice, so a smaller format decoded *slower* than fp32.
These kernels (`cpu_kernels.cpp`) read the codes as stored — half a byte per weight for int4/NF4/FP4,
one for int8 — widen them in registers and multiply with fp32 activations, so only the order of the
sums differs from the reference (tests/test_kernels.py checks every kind against it). A decode step (one
activation row) takes four output rows at a time with two accumulators each, so eight independent
multiply-add chains are in flight, and prefetches the weights eight row blocks ahead; 4-bit codes in groups
of a multiple of 64 take a shuffle-free 64-column step (cpu_kernels.cpp says how it stays exact).

A prefill's rows (2 to GEMM_MAX_ROWS) take the tiled product (`cpu_gemm.cpp`): each thread dequantizes
16 weight rows at a time into a buffer that stays in its caches and multiplies every activation row with
them, so the fp32 weight is never written out; the reference path's extra write and read of it had made
every quantized prefill 0.90-0.99x fp32's (benchmarks/speed.py, Intel Xeon), now 1.08-1.19x.

Where the CPU has AVX-512 (F, DQ, BW, VL) the library is built with it: the product runs 16 wide, 4-bit
decode steps put two rows in one 512-bit register and 8-bit ones widen 16 codes at once (measured on one
576->1536 layer, one thread: int8 53 -> 41 us, int4-g64 92 -> 67 us, the scaled sums kept in 512-bit
registers across groups: a 64-column group is one step, so per-group work had been as large as the step). Kernel names stay "quantscope-avx2:<kind>" in records: the same
kernels, whichever build (:func:`build` says which ran).

Torch's own CPU kernels were measured first on this machine (benchmarks/kernel_speed.py, AMD EPYC, AVX2, no
AVX-512): `_weight_int8pack_mm` and `_weight_int4pack_mm_for_cpu` take fp32 activations only through
slow scalar loops (5x and 25x slower than fp32 `F.linear` at 1x576->1536), and are fast only with
bf16 activations, which changes the figures. So quantscope compiles its own: plain C++ with
intrinsics, no torch headers (a build takes seconds, not minutes), cached under
`$QUANTSCOPE_CACHE/kernels/` by a hash of source and flags, loaded with ctypes, threads from torch.

No compiler, a CPU without AVX2, or a build that fails: :func:`unavailable_reason` says why, the layers
run the reference path, and each record names the kernel it used (`kernel`: "ref" there).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..fileio import cache_root
from ..formats.codebook import block_absmax, codebook
from ..formats.integer import n_groups
from ..formats.packing import packed_row_bytes

_DIR = Path(__file__).parent
_SOURCES = ("cpu_kernels.cpp", "cpu_gemm.cpp")  # compiled together; both include cpu_codes.h
_HEADERS = ("cpu_codes.h",)
_FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC", "-std=c++17", "-ffp-contract=off")
_AVX512 = ("-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl")
_U4, _U8, _S8, _LUT4, _BF16, _F16 = 0, 1, 2, 3, 4, 5
REF = "ref"  # the reference path's name in records: dequantize the weight, then the fp32 matmul
_ABI = 5


def _isa() -> str:
    """The build to use: "avx512" where the CPU has AVX-512 F/DQ/BW/VL (the matrix product then runs
    16-wide), else "avx2"; QUANTSCOPE_KERNEL_ISA=avx2 forces the AVX2 build."""
    if os.environ.get("QUANTSCOPE_KERNEL_ISA", "").lower() == "avx2":
        return "avx2"
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return "avx2"
    return "avx512" if all(f in _cpu_flags() for f in ("avx512f", "avx512dq", "avx512bw", "avx512vl")) else "avx2"


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return frozenset(line.split(":", 1)[-1].split())


class _Layer(ctypes.Structure):
    """cpu_codes.h's QsLayer: one layer's storage arguments, filled once."""

    _fields_ = [("kind", ctypes.c_int32), ("sf32", ctypes.c_int32), ("codes", ctypes.c_void_p),
                ("scales", ctypes.c_void_p), ("zeros", ctypes.c_void_p), ("table", ctypes.c_void_p),
                ("zconst", ctypes.c_float), ("N", ctypes.c_int64), ("K", ctypes.c_int64), ("G", ctypes.c_int64),
                ("row_bytes", ctypes.c_int64)]


@functools.lru_cache(maxsize=2)
def _load(isa: str | None = None) -> tuple[ctypes.CDLL | None, str]:
    """(the library, "") or (None, why not). Built once per source/flags hash, then loaded from the cache."""
    cap = torch.backends.cpu.get_cpu_capability()
    if cap not in ("AVX2", "AVX512"):
        return None, f"this CPU's vector capability is {cap}; the kernels need AVX2 and FMA"
    if not _has_f16c():
        return None, "this CPU lacks F16C (fp16 scale conversion), which the kernels use"
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        return None, "no C++ compiler (g++) found to build quantscope's CPU kernels"
    isa = isa or _isa()
    flags = _FLAGS + (_AVX512 if isa == "avx512" else ())
    src = b"".join((_DIR / f).read_bytes() for f in _SOURCES + _HEADERS)
    tag = hashlib.sha256(src + " ".join(flags).encode()).hexdigest()[:16]
    out = cache_root() / "kernels" / f"cpu_kernels-{isa}-{tag}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".so", dir=out.parent)
        os.close(fd)
        try:
            res = subprocess.run([cxx, *flags, "-o", tmp, *(str(_DIR / f) for f in _SOURCES)],
                                 capture_output=True, text=True)
            if res.returncode != 0:
                first = (res.stderr.strip().splitlines() or ["?"])[0]
                return None, f"building quantscope's CPU kernels failed: {first}"
            os.replace(tmp, out)  # concurrent builders each rename a whole file: a reader sees one
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(out))
    if lib.qs_abi_version() != _ABI:
        return None, f"{out} is not the kernel library this quantscope expects"
    p, i64, layer = ctypes.c_void_p, ctypes.c_int64, ctypes.POINTER(_Layer)
    for f in (lib.qs_matvec, lib.qs_gemm):
        f.restype = ctypes.c_int
        f.argtypes = [layer, p, p, i64, ctypes.c_int]
    lib.qs_dequant.restype = ctypes.c_int
    lib.qs_dequant.argtypes = [layer, p, ctypes.c_int]
    return lib, ""


def _has_f16c() -> bool:
    flags = _cpu_flags()
    return not flags or "f16c" in flags  # not Linux: AVX2 processors all have F16C (Haswell, Zen and later)


def build() -> str:
    """"avx512" or "avx2": the kernel library this process builds and loads."""
    return _isa()


def available() -> bool:
    return _load()[0] is not None


def unavailable_reason() -> str:
    return _load()[1]


@dataclass(frozen=True)
class Kernel:
    """How one quantized layer's codes are read: chosen once per layer from its format and shape."""

    name: str  # reported in records: "quantscope-avx2:<kind>"
    kind: int
    group: int
    zconst: float  # the implicit zero point of symmetric formats (none stored)
    max_rows: int  # above this many activation rows, dequantize + fp32 matmul is faster (measured)


# Rows of activations up to which the matrix-vector kernel beats the tiled product (cpu_gemm.cpp), per
# kind (measured on the embedded model's 576->1536 and 1536->576 layers, 2 threads, Intel Xeon, AVX-512
# build: at one row the matrix-vector kernel takes 0.5-1.0x the product's time; at two rows 4-bit codes
# are already faster through the product, 8/16-bit ones not yet; at four rows all but bf16 1536->576
# are). Decode steps are 1 row.
_MAX_ROWS = {"int4": 1, "int8": 2, "uint8": 2, "lut4": 1, "float16": 2}
# Above max_rows and up to this many rows, the tiled product beats dequantize + fp32 matmul (same
# measurement, 576->576, 576->1536 and 1536->576: at 64 rows 0.72-0.92x its time, at 128 rows
# 0.97-1.09x with the weight in cache, where fp32 has its best case; at 256 rows 1.05-1.20x). Scored forwards never take it, at any length
# (qmodules.reference_products): their figures stay the reference path's.
GEMM_MAX_ROWS = 128


def kernel_for(spec, shape: tuple[int, int]) -> Kernel | None:
    """The kernel for a layer of this format and [out, in] shape, or None (the reference path)."""
    _, in_f = shape
    if spec.family == "float" and spec.variant in ("bf16", "fp16"):  # 16-bit storage, widened exactly
        return Kernel(f"quantscope-avx2:{spec.variant}", _BF16 if spec.variant == "bf16" else _F16, in_f, 0.0,
                      _MAX_ROWS["float16"])
    group = in_f if getattr(spec, "group_size", None) is None else spec.group_size
    if spec.family == "int" and spec.bits == 4 and group % 2 == 0:
        return Kernel("quantscope-avx2:int4", _U4, group, 0.0 if not spec.symmetric else 8.0, _MAX_ROWS["int4"])
    if spec.family == "int" and spec.bits == 8:
        if spec.symmetric:  # stored as signed int8 with the zero point removed
            return Kernel("quantscope-avx2:int8", _S8, group, 0.0, _MAX_ROWS["int8"])
        return Kernel("quantscope-avx2:uint8", _U8, group, 0.0, _MAX_ROWS["uint8"])
    if spec.family == "codebook" and group % 2 == 0:
        return Kernel(f"quantscope-avx2:{spec.variant}-lut", _LUT4, group, 0.0, _MAX_ROWS["lut4"])
    return None


@functools.lru_cache(maxsize=4)
def _table(variant: str) -> torch.Tensor:
    return codebook(variant).contiguous()


def _operands(k: Kernel, storage: dict[str, torch.Tensor], spec, shape: tuple[int, int]) -> list:
    """The C functions' storage arguments (codes, scales, fp32 flag, zeros, zconst, table), with the
    tensors they point into kept alive by the caller holding this list."""
    out_f, in_f = shape
    if k.kind in (_BF16, _F16):
        w = storage["weight"]
        if tuple(w.shape) != (out_f, in_f) or not w.is_contiguous() or w.device.type != "cpu":
            raise RuntimeError(f"storage of shape {tuple(w.shape)} does not match {k.name} for {shape}")
        return [w.view(torch.uint8), None, None, None, 2 * in_f]
    codes = storage["qweight"]
    zeros = storage.get("zeros")
    table = None
    if spec.family == "codebook":
        scales = storage["absmax"] if "absmax" in storage else block_absmax(storage)
        table = _table(spec.variant)
    else:
        scales = storage["scales"]
    if scales.dtype not in (torch.float16, torch.float32):
        scales = scales.float()
    scales = scales.contiguous()
    if zeros is not None:
        zeros = zeros.to(torch.float16).contiguous()
    row_bytes = packed_row_bytes(in_f, 4) if k.kind in (_U4, _LUT4) else in_f
    if tuple(codes.shape) != (out_f, row_bytes) or scales.numel() != out_f * n_groups(in_f, k.group) \
            or not codes.is_contiguous() or codes.device.type != "cpu":
        raise RuntimeError(f"storage of shape {tuple(codes.shape)} does not match {k.name} for {shape}")
    return [codes, scales, zeros, table, row_bytes]


def _layer(k: Kernel, ops: list, shape: tuple[int, int]) -> _Layer:
    codes, scales, zeros, table, row_bytes = ops
    return _Layer(k.kind, int(scales is not None and scales.dtype == torch.float32), codes.data_ptr(),
                  scales.data_ptr() if scales is not None else None, zeros.data_ptr() if zeros is not None else None,
                  table.data_ptr() if table is not None else None, k.zconst, shape[0], shape[1], k.group, row_bytes)


class Bound:
    """One layer's kernel call with its storage arguments worked out once: a decode step calls 210
    layers of the embedded model per token, and preparing the arguments on every call (about 10 us in
    Python) cost as much as a small layer's arithmetic. Holds the storage tensors it points into (the
    layer's own buffers, or converted copies where a buffer's dtype needs one) and is valid while the
    layer keeps those buffers (:attr:`tensors`, for the owner to check)."""

    def __init__(self, k: Kernel, storage: dict[str, torch.Tensor], spec, shape: tuple[int, int]):
        lib, why = _load()
        if lib is None:
            raise RuntimeError(why)
        self.name, self.fn, self.gemm_fn, self.out_f = k.name, lib.qs_matvec, lib.qs_gemm, shape[0]
        self.max_rows, self.gemm_rows = k.max_rows, GEMM_MAX_ROWS
        self.tensors = tuple(storage.values())
        self._ops = _operands(k, storage, spec, shape)  # keeps converted copies alive
        self._layer = _layer(k, self._ops, shape)
        self._ref = ctypes.byref(self._layer)

    def __reduce__(self):  # a copied or pickled layer binds again: its pointers would be another's
        return (_unbound, ())

    def __call__(self, x: torch.Tensor, tiled: bool = False) -> torch.Tensor:
        """y [rows, out] = x [rows, in] (fp32, CPU, contiguous) times the layer's weight: the matrix-vector
        kernel (a decode step: this call is its hot path, one frame), or with `tiled` the tiled product."""
        y = torch.empty(x.shape[0], self.out_f, dtype=torch.float32)
        rc = (self.gemm_fn if tiled else self.fn)(self._ref, x.data_ptr(), y.data_ptr(), x.shape[0], torch.get_num_threads())
        if rc != 0:
            raise RuntimeError(f"{self.name}: kernel returned {rc}")
        return y

    def gemm(self, x: torch.Tensor) -> torch.Tensor:
        """The same product for many rows (a prefill): weight tiles dequantized in cache (cpu_gemm.cpp)."""
        return self(x, tiled=True)


def _unbound() -> None:
    return None


def matvec(k: Kernel, x: torch.Tensor, storage: dict[str, torch.Tensor], spec, shape: tuple[int, int]) -> torch.Tensor:
    """y [rows, out] = x [rows, in] (fp32, CPU) times the layer's weight, read from `storage` (one call;
    a layer called repeatedly binds once: :class:`Bound`)."""
    return Bound(k, storage, spec, shape)(x.contiguous())


def gemm(k: Kernel, x: torch.Tensor, storage: dict[str, torch.Tensor], spec, shape: tuple[int, int]) -> torch.Tensor:
    """The same product through the tiled kernel (cpu_gemm.cpp), what a layer runs for a prefill's rows."""
    return Bound(k, storage, spec, shape).gemm(x.contiguous())


def dequantize(k: Kernel, storage: dict[str, torch.Tensor], spec, shape: tuple[int, int]) -> torch.Tensor:
    """The layer's fp32 weight [out, in], bit-identical to the format's own `dequantize` (same operations,
    one rounding each) and several times faster: the reference path's first half for many rows."""
    lib, why = _load()
    if lib is None:
        raise RuntimeError(why)
    ops = _operands(k, storage, spec, shape)
    w = torch.empty(*shape, dtype=torch.float32)
    rc = lib.qs_dequant(ctypes.byref(_layer(k, ops, shape)), w.data_ptr(), torch.get_num_threads())
    del ops
    if rc != 0:
        raise RuntimeError(f"{k.name}: dequantize returned {rc}")
    return w
