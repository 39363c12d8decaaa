"""QSGD (Alistarh, Grubic, Li, Tomioka, Vojnovic, "QSGD: Communication-Efficient SGD via Gradient
Quantization and Encoding", NeurIPS 2017).

With ``s`` levels, per chunk ("bucket" in the paper, ``d`` elements) ``C`` of ``x``:

    r_i    = s * |x_i| / ||x_C||_2  in [0, s],     l_i = floor(r_i)
    xi_i   = (l_i + 1) / s  with probability r_i - l_i,  else  l_i / s
    Q(x)_i = ||x_C||_2 * sign(x_i) * xi_i

``E[Q(x)] = x`` and ``Var <= min(n / s^2, sqrt(n) / s) ||x||^2``. Codes ``sign * level`` in ``[-s, s]``
are stored fixed-width in ``bits = ceil(log2(s + 1)) + 1`` (the paper's Elias coding of the levels
is not used: fixed width keeps every rank's payload the same size for one all-gather).
Payload: ``ceil(n / 8) * bits`` bytes of codes plus ``n_chunks`` float32 norms.
"""

from __future__ import annotations

import math

import torch

from lowbit.core.pack import pack, packed_nbytes, unpack
from lowbit.distributed.payload import Compressor, Payload, check_chunk, chunked, n_chunks
from lowbit.errors import ConfigError


def qsgd_bits(levels: int) -> int:
    """Signed code width for ``sign * level``, ``level`` in ``0..levels``."""
    return math.ceil(math.log2(levels + 1)) + 1


class QSGD(Compressor):
    """Stochastic rounding of ``|x| / ||x||`` to ``levels`` levels plus a sign, one L2 norm per chunk."""

    name = "qsgd"

    def __init__(self, levels: int = 7, chunk: int | None = 512, error_feedback: bool = False,
                 seed: int | None = None):
        if not isinstance(levels, int) or not 1 <= levels <= 127:
            raise ConfigError(f"{self.name}: levels must be an int in 1..127 (codes fit 8 bits), got {levels!r}")
        check_chunk(chunk, self.name)
        super().__init__(error_feedback, seed)
        self.levels = levels
        self.bits = qsgd_bits(levels)
        self.chunk = chunk

    def _chunk(self, n: int) -> int:
        return self.chunk or max(n, 1)

    def nbytes(self, numel: int) -> int:
        return packed_nbytes(numel, self.bits) + 4 * n_chunks(numel, self._chunk(numel))

    def _encode(self, x: torch.Tensor) -> Payload:
        n, s = x.numel(), self.levels
        u = torch.rand(n, generator=self.generator)  # (n,) one uniform draw per element
        xp, _ = chunked(x, self._chunk(n))  # (n_chunks, chunk)
        norm = torch.linalg.vector_norm(xp, dim=1)  # (n_chunks,)
        r = (s * xp.abs() / norm.clamp_min(torch.finfo(torch.float32).tiny)[:, None]).reshape(-1)[:n]  # (n,)
        low = torch.floor(r)
        level = (low + (u < r - low)).clamp_max(s)  # (n,) in 0..s; clamp guards |x|/||x|| rounding above 1
        codes = (torch.sign(x) * level).to(torch.int8)
        return Payload(torch.Size([n]), codes=pack(codes, self.bits, signed=True), scales=norm)

    def _decode(self, p: Payload) -> torch.Tensor:
        n = p.numel
        codes = unpack(p.codes, self.bits, (n,), signed=True).float()
        which = torch.arange(n) // self._chunk(n)  # (n,) chunk of each element
        return p.scales[which] * codes / self.levels


def qsgd_ref(x: torch.Tensor, u: torch.Tensor, levels: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain reference given the uniform draws ``u``: (codes ``sign * level`` as int8, norms per chunk)."""
    x = x.reshape(-1).float()
    codes = torch.zeros(x.numel(), dtype=torch.int8)
    norms = []
    for start in range(0, max(x.numel(), 1), chunk):
        c = x[start:start + chunk]
        norm = torch.linalg.vector_norm(c)
        norms.append(float(norm))
        for j in range(c.numel()):
            r = float(levels * c[j].abs() / norm) if float(norm) > 0 else 0.0
            level = min(math.floor(r) + (1 if float(u[start + j]) < r - math.floor(r) else 0), levels)
            codes[start + j] = int(math.copysign(level, float(c[j]))) if c[j] != 0 else 0
    return codes, torch.tensor(norms, dtype=torch.float32)
