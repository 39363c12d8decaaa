"""1-bit SGD with error feedback (Seide, Fu, Droppo, Li, Yu, "1-Bit Stochastic Gradient Descent and its
Application to Data-Parallel Distributed Training of Speech DNNs", Interspeech 2014).

Per chunk ``C`` of ``x = g + e`` (the gradient plus the carried quantization error):

    bit_i   = [x_i >= 0]
    a_C^+   = mean{x_i : i in C, x_i >= 0},   a_C^- = mean{x_i : i in C, x_i < 0}
    Q(x)_i  = a_C^+ if bit_i else a_C^-
    e      <- x - Q(x)

The two reconstruction values per chunk (the mean of each sign class) minimise the squared error of
the chunk given the signs, as in the paper (which used one pair per matrix column). Payload:
``ceil(n / 8)`` bytes of packed bits plus ``2 * n_chunks`` float32 scales.
"""

from __future__ import annotations

import torch

from lowbit.core.pack import pack, packed_nbytes, unpack
from lowbit.distributed.payload import Compressor, Payload, check_chunk, chunked, n_chunks


class OneBit(Compressor):
    """Sign bits plus two scales per chunk, with error feedback on by default (the method needs it)."""

    name = "onebit"

    def __init__(self, chunk: int | None = 2048, error_feedback: bool = True, seed: int | None = None):
        check_chunk(chunk, self.name)
        super().__init__(error_feedback, seed)
        self.chunk = chunk

    def _chunk(self, n: int) -> int:
        return self.chunk or max(n, 1)

    def nbytes(self, numel: int) -> int:
        return packed_nbytes(numel, 1) + 4 * 2 * n_chunks(numel, self._chunk(numel))

    def _encode(self, x: torch.Tensor) -> Payload:
        n = x.numel()
        xp, valid = chunked(x, self._chunk(n))  # (n_chunks, chunk)
        pos = (xp >= 0) & valid
        neg = xp < 0  # padding is 0, never negative
        a_pos = torch.where(pos, xp, 0).sum(1) / pos.sum(1).clamp_min(1)  # (n_chunks,)
        a_neg = torch.where(neg, xp, 0).sum(1) / neg.sum(1).clamp_min(1)  # (n_chunks,)
        scales = torch.stack([a_pos, a_neg], dim=1).reshape(-1)  # (2 * n_chunks,) as [+, -] pairs
        codes = pack((x >= 0).to(torch.uint8), 1)
        return Payload(torch.Size([n]), codes=codes, scales=scales.float())

    def _decode(self, p: Payload) -> torch.Tensor:
        n = p.numel
        chunk = self._chunk(n)
        bits = unpack(p.codes, 1, (n,)).bool()
        ab = p.scales.reshape(-1, 2)  # (n_chunks, 2): [a+, a-]
        which = torch.arange(n) // chunk  # (n,) chunk of each element
        return torch.where(bits, ab[which, 0], ab[which, 1])


def onebit_ref(x: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain reference for one step without memory: (bits as uint8, scales [a+, a-] per chunk, Q(x))."""
    x = x.reshape(-1).float()
    bits = torch.zeros(x.numel(), dtype=torch.uint8)
    scales, out = [], torch.zeros_like(x)
    for start in range(0, max(x.numel(), 1), chunk):
        c = x[start:start + chunk]
        nonneg, negative = c[c >= 0], c[c < 0]
        a_pos = float(nonneg.mean()) if nonneg.numel() else 0.0
        a_neg = float(negative.mean()) if negative.numel() else 0.0
        scales += [a_pos, a_neg]
        for j in range(c.numel()):
            bits[start + j] = 1 if c[j] >= 0 else 0
            out[start + j] = a_pos if c[j] >= 0 else a_neg
    return bits, torch.tensor(scales, dtype=torch.float32), out
