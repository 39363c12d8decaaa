"""Bit-packing of 1..8-bit codes into uint8 storage.

One layout for every width: codes are taken eight at a time; the eight codes ``c_0..c_7`` of a run
form the integer ``sum_i c_i << (bits * i)`` of ``8 * bits`` bits, written as ``bits`` little-endian
bytes. So 4-bit codes give ``byte = c_0 | c_1 << 4``, 1-bit codes give one byte per 8 codes with
``c_0`` in the least significant bit, and 3-bit codes give 3 bytes per 8 codes. The code count is
padded with zeros to a multiple of 8; ``packed_nbytes(n, bits) = ceil(n / 8) * bits``.

Signed codes are stored with an offset of ``2^(bits-1)`` (``signed=True`` on both sides).
Kernels that need their own layouts (int4 for ``_weight_int4pack_mm``, 64-bit XNOR words) repack
from these codes in ``lowbit.kernels``.
"""

from __future__ import annotations

import math

import torch

from lowbit.errors import ConfigError

UNPACK_CHUNK = 1 << 16  # runs of 8 codes per step of pack() / unpack(): bounds their int64 temporaries


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes that :func:`pack` produces for ``numel`` codes of ``bits`` bits."""
    return math.ceil(numel / 8) * bits


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ConfigError(f"pack supports 1 to 8 bits per code, got {bits}")


def pack(q: torch.Tensor, bits: int, signed: bool = False) -> torch.Tensor:
    """Pack integer codes (any shape) into a flat uint8 tensor of ``packed_nbytes(q.numel(), bits)``."""
    _check_bits(bits)
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    if q.numel() and (int(q.min()) < lo or int(q.max()) > hi):  # checked before any narrowing cast
        raise ConfigError(f"codes out of range for {bits}-bit {'signed' if signed else 'unsigned'} packing [{lo}, {hi}]")
    v = q.reshape(-1).to(torch.int16)  # wide enough for a signed 8-bit code plus its offset
    if signed:
        v = v + (1 << (bits - 1))
    pad = (-v.numel()) % 8
    if pad:
        v = torch.cat([v, v.new_zeros(pad)])
    runs = v.reshape(-1, 8)  # (n/8, 8): eight codes per run
    shifts = torch.arange(8, dtype=torch.int64) * bits
    byte_shifts = torch.arange(bits, dtype=torch.int64) * 8
    out = torch.empty(runs.shape[0], bits, dtype=torch.uint8)  # (n/8, bits) little-endian bytes
    for start in range(0, runs.shape[0], UNPACK_CHUNK):  # int64 temporaries stay a few MB, whatever n
        word = (runs[start:start + UNPACK_CHUNK].to(torch.int64) << shifts).sum(dim=1)  # (chunk,) 8*bits-bit ints
        out[start:start + UNPACK_CHUNK] = (word[:, None] >> byte_shifts) & 0xFF
    return out.reshape(-1)


def unpack(packed: torch.Tensor, bits: int, shape: tuple[int, ...] | torch.Size, signed: bool = False) -> torch.Tensor:
    """Inverse of :func:`pack`: codes of ``shape`` (int8 if ``signed`` else uint8)."""
    _check_bits(bits)
    numel = math.prod(shape)
    expected = packed_nbytes(numel, bits)
    if packed.numel() != expected:
        raise ConfigError(f"packed buffer has {packed.numel()} bytes, expected {expected} for {numel} {bits}-bit codes")
    b = packed.reshape(-1, bits)  # (n/8, bits): each row holds 8 codes
    byte_shifts = torch.arange(bits, dtype=torch.int64) * 8
    shifts = torch.arange(8, dtype=torch.int64) * bits
    codes = torch.empty(b.shape[0] * 8, dtype=torch.uint8)  # (n padded to 8,)
    for start in range(0, b.shape[0], UNPACK_CHUNK):  # int64 temporaries stay a few MB, whatever n
        word = (b[start:start + UNPACK_CHUNK].to(torch.int64) << byte_shifts).sum(dim=1)  # (chunk,)
        codes[start * 8:(start + UNPACK_CHUNK) * 8] = ((word[:, None] >> shifts) & ((1 << bits) - 1)).reshape(-1)
    codes = codes[:numel]
    if signed:
        return (codes.to(torch.int16) - (1 << (bits - 1))).to(torch.int8).reshape(shape)
    return codes.reshape(shape)
