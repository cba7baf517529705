"""Bit packing of integer codes into bytes: the storage that makes a quantized model really small.

Codes are packed densely *per row*: a row of `n` codes of `bits` bits takes
`ceil(n / k) * (k * bits / 8)` bytes, where `k = 8 / gcd(8, bits)` codes fill a whole number of bytes
(4-bit: 2 codes in 1 byte; 3-bit: 8 codes in 3 bytes; 2-bit: 4 codes in 1 byte). Rows stay byte-aligned
so a single row (an embedding lookup) can be unpacked without touching the others. Ternary codes are
packed base-3, five trits to a byte (3^5 = 243 <= 256): 1.6 bits per weight instead of 2.

Written by hand because it is the storage layer of quantscope's own formats (torch has no sub-byte
dtypes for 3-bit or base-3 packing); it is pure torch, no I/O.
"""

from __future__ import annotations

import math

import torch


def chunk_shape(bits: int) -> tuple[int, int]:
    """(codes per chunk, bytes per chunk) for `bits`-bit codes."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    k = 8 // math.gcd(8, bits)
    return k, k * bits // 8


def packed_row_bytes(n: int, bits: int) -> int:
    """Bytes one packed row of `n` codes takes."""
    k, nb = chunk_shape(bits)
    return -(-n // k) * nb


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a 2-D tensor of codes in [0, 2**bits) row by row into a uint8 tensor [rows, row_bytes]."""
    if codes.dim() != 2:
        raise ValueError("pack_bits expects a 2-D [rows, n] tensor")
    rows, n = codes.shape
    k, nb = chunk_shape(bits)
    if bits == 8:
        return codes.to(torch.uint8).contiguous()
    pad = (-n) % k
    c = codes.to(torch.int32)
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    c = c.view(rows, -1, k)
    if nb == 1:  # 1, 2, 4 bits: k codes in one byte
        shifts = torch.arange(k, dtype=torch.int32, device=c.device) * bits
        return (c << shifts).sum(-1).to(torch.uint8).contiguous()
    # 3, 5, 6, 7 bits: k codes in nb bytes; nb * 8 <= 56 bits, so int64 holds a chunk
    c = c.to(torch.int64)
    shifts = torch.arange(k, dtype=torch.int64, device=c.device) * bits
    val = (c << shifts).sum(-1)  # [rows, chunks]
    bshift = torch.arange(nb, dtype=torch.int64, device=c.device) * 8
    return ((val.unsqueeze(-1) >> bshift) & 0xFF).to(torch.uint8).reshape(rows, -1).contiguous()


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: uint8 [rows, row_bytes] -> uint8 codes [rows, n]."""
    rows = packed.shape[0]
    k, nb = chunk_shape(bits)
    if bits == 8:
        return packed[:, :n]
    if nb == 1:
        mask = (1 << bits) - 1
        parts = [(packed >> (bits * j)) & mask for j in range(k)]
        return torch.stack(parts, dim=-1).reshape(rows, -1)[:, :n]
    p = packed.view(rows, -1, nb).to(torch.int64)
    bshift = torch.arange(nb, dtype=torch.int64, device=p.device) * 8
    val = (p << bshift).sum(-1)  # [rows, chunks]
    shifts = torch.arange(k, dtype=torch.int64, device=p.device) * bits
    codes = (val.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(rows, -1)[:, :n].to(torch.uint8)


_POW3 = (1, 3, 9, 27, 81)


def _pow3(device) -> torch.Tensor:
    return torch.tensor(_POW3, dtype=torch.int32, device=device)


def ternary_row_bytes(n: int) -> int:
    return -(-n // 5)


def pack_ternary(trits: torch.Tensor) -> torch.Tensor:
    """Pack codes in {0, 1, 2} five to a byte, row by row: [rows, n] -> uint8 [rows, ceil(n/5)]."""
    rows, n = trits.shape
    pad = (-n) % 5
    t = trits.to(torch.int32)
    if pad:
        t = torch.nn.functional.pad(t, (0, pad))
    return (t.view(rows, -1, 5) * _pow3(t.device)).sum(-1).to(torch.uint8).contiguous()


def unpack_ternary(packed: torch.Tensor, n: int) -> torch.Tensor:
    rows = packed.shape[0]
    v = packed.to(torch.int32).unsqueeze(-1)
    trits = (v // _pow3(v.device)) % 3
    return trits.reshape(rows, -1)[:, :n].to(torch.uint8)
