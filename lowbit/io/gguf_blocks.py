"""Byte layout of ggml's Q4_0 / Q4_1 / Q8_0 blocks, to and from lowbit's (codes, scale, min) form.

Per block of 32 weights along a row (ggml-common.h; little-endian):

- ``block_q4_0`` (18 bytes): fp16 ``d``; 16 bytes ``qs`` with ``qs[j] = u[j] | u[j + 16] << 4``
  (the low nibbles hold the first half of the block, the high nibbles the second half);
  ``x = d * (u - 8)``.
- ``block_q4_1`` (20 bytes): fp16 ``d``, fp16 ``m``, then ``qs`` as for Q4_0; ``x = d * u + m``.
- ``block_q8_0`` (34 bytes): fp16 ``d``, 32 int8 ``q``; ``x = d * q``.

A tensor of shape (N, K) is N rows of K / 32 consecutive blocks (GGUF lists its dims reversed,
``ne = [K, N]``). lowbit's own packing (``lowbit.core.pack``) puts consecutive codes in a byte,
so nibbles are re-ordered here; code values are unchanged (lowbit's signed int4 packing stores
``q + 8``, which is Q4_0's ``u``).
"""

from __future__ import annotations

import numpy as np
import torch

from lowbit.errors import ConfigError

BLOCK = 32
BLOCK_BYTES = {"q4_0": 18, "q4_1": 20, "q8_0": 34}


def _halves_to_nibbles(u: np.ndarray) -> np.ndarray:
    """u (..., 32) in 0..15 -> qs (..., 16): low nibble = u[j], high nibble = u[j + 16]."""
    return (u[..., :16] | (u[..., 16:] << 4)).astype(np.uint8)


def _nibbles_to_halves(qs: np.ndarray) -> np.ndarray:
    """qs (..., 16) -> u (..., 32)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _f16_bytes(t: torch.Tensor, n: int, g: int) -> np.ndarray:
    return t.to(torch.float16).reshape(n, g, 1).numpy().view(np.uint8)  # (N, G, 2)


def encode_blocks(qtype: str, codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None = None) -> np.ndarray:
    """ggml blocks (N, K / 32 * bytes) uint8 from codes (N, K) and fp16 ``d`` / ``m`` (N, K / 32).

    Codes: Q4_0 signed in [-8, 7]; Q4_1 unsigned in [0, 15]; Q8_0 int8.
    """
    n, k = codes.shape
    if k % BLOCK:
        raise ConfigError(f"{qtype}: row length {k} is not a multiple of {BLOCK}")
    g = k // BLOCK
    c = codes.to(torch.int16).reshape(n, g, BLOCK).numpy()  # (N, G, 32)
    if qtype == "q4_0":
        if c.min(initial=0) < -8 or c.max(initial=0) > 7:
            raise ConfigError("q4_0 codes must lie in [-8, 7]")
        parts = [_f16_bytes(d, n, g), _halves_to_nibbles((c + 8).astype(np.uint8))]
    elif qtype == "q4_1":
        if c.min(initial=0) < 0 or c.max(initial=0) > 15:
            raise ConfigError("q4_1 codes must lie in [0, 15]")
        parts = [_f16_bytes(d, n, g), _f16_bytes(m, n, g), _halves_to_nibbles(c.astype(np.uint8))]
    elif qtype == "q8_0":
        if c.min(initial=0) < -128 or c.max(initial=0) > 127:
            raise ConfigError("q8_0 codes must lie in [-128, 127]")
        parts = [_f16_bytes(d, n, g), c.astype(np.int8).view(np.uint8)]
    else:
        raise ConfigError(f"unknown block type {qtype!r}; valid: {', '.join(BLOCK_BYTES)}")
    return np.concatenate(parts, axis=-1).reshape(n, g * BLOCK_BYTES[qtype])  # (N, G * bytes)


def decode_blocks(qtype: str, raw: np.ndarray, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor,
                                                                               torch.Tensor | None]:
    """Inverse of :func:`encode_blocks`: ``(codes (N, K), d fp16 (N, K/32), m fp16 or None)``."""
    n, k = shape
    if qtype not in BLOCK_BYTES:
        raise ConfigError(f"unknown block type {qtype!r}; valid: {', '.join(BLOCK_BYTES)}")
    if k % BLOCK:
        raise ConfigError(f"{qtype}: row length {k} is not a multiple of {BLOCK}")
    g = k // BLOCK
    b = np.ascontiguousarray(raw).reshape(n, g, BLOCK_BYTES[qtype])  # (N, G, bytes)
    d = torch.from_numpy(b[..., 0:2].copy().view(np.float16).reshape(n, g))
    m = None
    if qtype == "q8_0":
        codes = torch.from_numpy(b[..., 2:].copy().view(np.int8).reshape(n, k))
    elif qtype == "q4_0":
        u = _nibbles_to_halves(b[..., 2:])  # (N, G, 32)
        codes = torch.from_numpy((u.astype(np.int8) - 8).reshape(n, k))
    else:
        m = torch.from_numpy(b[..., 2:4].copy().view(np.float16).reshape(n, g))
        codes = torch.from_numpy(_nibbles_to_halves(b[..., 4:]).reshape(n, k))
    return codes, d, m


def decode_blocks_packed(qtype: str, raw: np.ndarray, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor,
                                                                                      torch.Tensor | None]:
    """Like :func:`decode_blocks`, but the codes come back already in lowbit's packed layout
    (``lowbit.core.pack``: byte ``i`` of a 4-bit row holds codes ``2i`` (low nibble) and ``2i + 1``;
    signed codes stored with their offset, ``q + 8`` / ``q + 128``), using only uint8 operations so the
    import's peak memory stays near the file's size. Returns ``(qweight (N * K * bits / 8,), d, m)``."""
    n, k = shape
    if qtype not in BLOCK_BYTES:
        raise ConfigError(f"unknown block type {qtype!r}; valid: {', '.join(BLOCK_BYTES)}")
    if k % BLOCK:
        raise ConfigError(f"{qtype}: row length {k} is not a multiple of {BLOCK}")
    g = k // BLOCK
    b = np.asarray(raw).reshape(n, g, BLOCK_BYTES[qtype])  # (N, G, bytes), a view of the file
    d = torch.from_numpy(b[..., 0:2].copy().view(np.float16).reshape(n, g))
    m = None
    if qtype == "q8_0":  # signed 8-bit codes are packed as q + 128: flip the sign bit
        return torch.from_numpy((b[..., 2:] ^ np.uint8(0x80)).reshape(-1)), d, m
    if qtype == "q4_1":
        m = torch.from_numpy(b[..., 2:4].copy().view(np.float16).reshape(n, g))
    qs = b[..., -16:]  # (N, G, 16): low nibbles = u[0:16], high nibbles = u[16:32]
    u = np.empty((n, g, BLOCK), dtype=np.uint8)  # (N, G, 32); Q4_0's u = q + 8 is lowbit's stored value
    np.bitwise_and(qs, 0x0F, out=u[..., :16])
    np.right_shift(qs, 4, out=u[..., 16:])
    packed = u[..., 0::2] | (u[..., 1::2] << 4)  # (N, G, 16): consecutive pairs share a byte
    return torch.from_numpy(packed.reshape(-1)), d, m


def permute_qk(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's row order for Llama's q/k projections (convert_hf_to_gguf.py ``LlamaModel.permute``).

    HF stores each head's rotary dims as two halves ``[x_0..x_{h/2-1}, y_0..y_{h/2-1}]``; GGML's rope
    expects them interleaved ``[x_0, y_0, x_1, y_1, ...]``. Rows (dim 0) of ``t`` (N, ...) are
    reordered; per-row data (codes, scales) moves with its row, so quantized blocks are unchanged.
    """
    rest = t.shape[1:]
    return t.reshape(n_head, 2, t.shape[0] // n_head // 2, *rest).transpose(1, 2).reshape(t.shape)


def unpermute_qk(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of :func:`permute_qk` (GGUF row order back to HF's)."""
    rest = t.shape[1:]
    return t.reshape(n_head, t.shape[0] // n_head // 2, 2, *rest).transpose(1, 2).reshape(t.shape)
