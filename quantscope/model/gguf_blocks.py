"""quantscope's integer codes and scales as GGUF blocks (Q8_0, Q4_0, Q4_1), and back. Pure: torch/numpy.

A GGUF block covers 32 consecutive inputs of one row (ggml's ``block_q8_0`` / ``block_q4_0`` /
``block_q4_1``), so a quantscope integer format maps onto a GGUF type when its grid is the type's
grid and its groups are made of whole blocks:

- symmetric int8 (zero 128, codes stored as q - 128): ``Q8_0`` — fp16 ``d``, 32 int8 codes; w = q * d;
- symmetric int4 (zero 8): ``Q4_0`` — fp16 ``d``, 16 bytes of nibbles; w = (q - 8) * d;
- asymmetric int4 (codes q, integer zero z): ``Q4_1`` — fp16 ``d``, fp16 ``m``, nibbles; w = q * d + m.

Groups of any multiple of 32 (and one group per row) repeat their scale in each of their blocks, so
`int4-g128-sym` is as exact as `int4-g32-sym`; the row width must be a multiple of 32. Q8_0 and Q4_0
are bit-exact: codes and the fp16 scale are stored as quantscope holds them, and ggml dequantizes to
the same float32 numbers. Q4_1 stores the minimum ``m = -z * s`` in fp16, which rounds when z * s
needs more than fp16's 11 significant bits: codes and ``d`` are exact, ``m`` is within half an fp16
ulp, and the weight delta is measured (:func:`weight_delta`), never assumed.

Nibble order is ggml's: byte j of a 4-bit block holds element j in its low nibble and element j + 16
in its high nibble (gguf-py's `quants.dequantize` is the independent reference in the tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..formats.packing import unpack_bits

BLOCK = 32
# GGUF type -> bytes per block of 32 (the size table of gguf-py's GGML_QUANT_SIZES)
BLOCK_BYTES = {"Q8_0": 2 + 32, "Q4_0": 2 + 16, "Q4_1": 2 + 2 + 16}


@dataclass
class Blocks:
    """One weight matrix [out, in] in block terms: every field per block of 32 inputs."""

    qtype: str  # Q8_0 | Q4_0 | Q4_1
    codes: np.ndarray  # uint8 [out, in]: quantscope's unsigned codes (Q8_0: q + 128 of the signed int8)
    d: np.ndarray  # float16 [out, in / 32]
    m: np.ndarray | None = None  # float16 [out, in / 32], Q4_1 only


def gguf_type(spec) -> str | None:
    """The GGUF block type whose grid is `spec`'s (whole blocks of 32), or None."""
    if spec.family != "int" or (spec.group_size is not None and spec.group_size % BLOCK):
        return None
    if spec.bits == 8 and spec.symmetric:
        return "Q8_0"
    if spec.bits == 4:
        return "Q4_0" if spec.symmetric else "Q4_1"
    return None


def _per_block(t: torch.Tensor, in_f: int, group: int | None) -> torch.Tensor:
    """[out, n_groups] -> [out, in / 32]: each block takes the parameter of the group it lies in."""
    nb = in_f // BLOCK
    if group is None:
        return t[:, :1].expand(-1, nb)
    return t[:, (torch.arange(nb) * BLOCK) // group]


def from_storage(storage: dict[str, torch.Tensor], spec, shape: tuple[int, int]) -> Blocks:
    """quantscope's storage of one linear (qweight, scales[, zeros]) as GGUF blocks of its type."""
    qtype = gguf_type(spec)
    out_f, in_f = shape
    if qtype is None or in_f % BLOCK:
        raise ValueError(f"{spec.name} on {in_f} inputs is not a GGUF block type")
    q = storage["qweight"]
    if q.dtype == torch.int8:  # symmetric 8-bit is stored signed
        codes = (q.to(torch.int16) + 128).to(torch.uint8)
    else:
        codes = unpack_bits(q, spec.bits, in_f)
    s = _per_block(storage["scales"].half(), in_f, spec.group_size)
    m = None
    if qtype == "Q4_1":
        z = _per_block(storage["zeros"].float(), in_f, spec.group_size)
        m = (-z * s.float()).half().numpy()
    return Blocks(qtype, codes.numpy().astype(np.uint8), s.numpy().astype(np.float16), m)


def to_bytes(b: Blocks) -> np.ndarray:
    """The blocks as a GGUF tensor holds them: uint8 [out, in / 32 * bytes per block]."""
    out_f, in_f = b.codes.shape
    nb = in_f // BLOCK
    codes = b.codes.reshape(out_f, nb, BLOCK)
    d = b.d.reshape(out_f, nb, 1).view(np.uint8)  # [out, nb, 2]
    if b.qtype == "Q8_0":
        body = (codes.astype(np.int16) - 128).astype(np.int8).view(np.uint8)
        parts = [d, body]
    else:
        nib = codes[..., :16] | (codes[..., 16:] << np.uint8(4))
        parts = [d, nib] if b.qtype == "Q4_0" else [d, b.m.reshape(out_f, nb, 1).view(np.uint8), nib]
    return np.ascontiguousarray(np.concatenate(parts, axis=-1).reshape(out_f, nb * BLOCK_BYTES[b.qtype]))


def from_bytes(raw: np.ndarray, qtype: str, shape: tuple[int, int]) -> Blocks:
    """Inverse of :func:`to_bytes`: GGUF block bytes of a [out, in] tensor back to codes and scales."""
    out_f, in_f = shape
    nb = in_f // BLOCK
    r = np.ascontiguousarray(raw).reshape(out_f, nb, BLOCK_BYTES[qtype])
    d = np.ascontiguousarray(r[..., :2]).view(np.float16).reshape(out_f, nb)
    m = None
    if qtype == "Q8_0":
        codes = (np.ascontiguousarray(r[..., 2:]).view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    else:
        start = 2
        if qtype == "Q4_1":
            m = np.ascontiguousarray(r[..., 2:4]).view(np.float16).reshape(out_f, nb)
            start = 4
        nib = r[..., start:]
        codes = np.concatenate([nib & np.uint8(0x0F), nib >> np.uint8(4)], axis=-1)
    return Blocks(qtype, codes.reshape(out_f, in_f), d, m)


def same(a: Blocks, b: Blocks) -> bool:
    """Identical codes and identical fp16 parameters, bit for bit."""
    eq = a.qtype == b.qtype and np.array_equal(a.codes, b.codes) and np.array_equal(a.d.view(np.uint16), b.d.view(np.uint16))
    if a.m is not None or b.m is not None:
        eq = eq and a.m is not None and b.m is not None and np.array_equal(a.m.view(np.uint16), b.m.view(np.uint16))
    return bool(eq)


def dequantize(b: Blocks) -> torch.Tensor:
    """The float32 weight ggml computes from the blocks."""
    out_f, in_f = b.codes.shape
    nb = in_f // BLOCK
    q = torch.from_numpy(b.codes.astype(np.float32)).view(out_f, nb, BLOCK)
    d = torch.from_numpy(b.d.astype(np.float32)).view(out_f, nb, 1)
    if b.qtype == "Q8_0":
        w = (q - 128) * d
    elif b.qtype == "Q4_0":
        w = (q - 8) * d
    else:
        w = q * d + torch.from_numpy(b.m.astype(np.float32)).view(out_f, nb, 1)
    return w.reshape(out_f, in_f)


def permute_rows(b: Blocks, perm: np.ndarray) -> Blocks:
    """The same blocks with rows reordered (llama's q/k head permutation moves whole rows)."""
    return Blocks(b.qtype, b.codes[perm], b.d[perm], None if b.m is None else b.m[perm])


def weight_delta(b: Blocks, want: torch.Tensor) -> float:
    """max |GGUF weight - quantscope's dequantized weight|: 0 for Q8_0/Q4_0, fp16 rounding of m for Q4_1."""
    return float((dequantize(b) - want.float()).abs().max())
