"""TernGrad (Wen, Xu, Yan, Wu, Wang, Chen, Li, "TernGrad: Ternary Gradients to Reduce Communication in
Distributed Deep Learning", NeurIPS 2017).

Per chunk ``C`` (the paper scales per layer; here per chunk of a flat bucket), with the max-norm scale:

    s_C   = max_{i in C} |x_i|
    b_i   ~ Bernoulli(|x_i| / s_C)
    Q(x)_i = s_C * sign(x_i) * b_i          (codes in {-1, 0, +1}, 2 bits each)

``E[Q(x)] = x``: unbiased, so no error feedback is needed (it is available). The paper's optional
gradient clipping, ``x <- clamp(x, -c * sigma, c * sigma)`` with ``sigma`` the tensor's standard
deviation and ``c = 2.5``, is ``clip_sigma``; it trades a little bias for much lower variance.
Payload: ``ceil(n / 8) * 2`` bytes of codes plus ``n_chunks`` float32 scales.
"""

from __future__ import annotations

import torch

from lowbit.core.pack import pack, packed_nbytes, unpack
from lowbit.distributed.payload import Compressor, Payload, check_chunk, chunked, n_chunks
from lowbit.errors import ConfigError


class TernGrad(Compressor):
    """Stochastic ternary codes with a max-norm scale per chunk."""

    name = "terngrad"

    def __init__(self, chunk: int | None = None, clip_sigma: float | None = None, error_feedback: bool = False,
                 seed: int | None = None):
        check_chunk(chunk, self.name)
        if clip_sigma is not None and not clip_sigma > 0:
            raise ConfigError(f"{self.name}: clip_sigma must be > 0 or None, got {clip_sigma!r}")
        super().__init__(error_feedback, seed)
        self.chunk = chunk
        self.clip_sigma = clip_sigma

    def _chunk(self, n: int) -> int:
        return self.chunk or max(n, 1)

    def nbytes(self, numel: int) -> int:
        return packed_nbytes(numel, 2) + 4 * n_chunks(numel, self._chunk(numel))

    def _encode(self, x: torch.Tensor) -> Payload:
        n = x.numel()
        if self.clip_sigma is not None and n > 1:
            bound = self.clip_sigma * float(x.std())
            x = x.clamp(-bound, bound)
        u = torch.rand(n, generator=self.generator)  # (n,) one uniform draw per element
        xp, _ = chunked(x, self._chunk(n))  # (n_chunks, chunk)
        s = xp.abs().amax(dim=1)  # (n_chunks,)
        prob = (xp.abs() / s.clamp_min(torch.finfo(torch.float32).tiny)[:, None]).reshape(-1)[:n]  # (n,)
        codes = torch.sign(x) * (u < prob)  # (n,) in {-1, 0, 1}
        return Payload(torch.Size([n]), codes=pack(codes.to(torch.int8), 2, signed=True), scales=s)

    def _decode(self, p: Payload) -> torch.Tensor:
        n = p.numel
        codes = unpack(p.codes, 2, (n,), signed=True).float()
        which = torch.arange(n) // self._chunk(n)  # (n,) chunk of each element
        return codes * p.scales[which]


def terngrad_ref(x: torch.Tensor, u: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain reference without clipping, given the uniform draws ``u``: (codes in {-1,0,1} as int8, scales)."""
    x = x.reshape(-1).float()
    codes = torch.zeros(x.numel(), dtype=torch.int8)
    scales = []
    for start in range(0, max(x.numel(), 1), chunk):
        c = x[start:start + chunk]
        s = c.abs().max()  # float32 scalar, so |x| / s rounds exactly as in the fast path
        scales.append(float(s))
        for j in range(c.numel()):
            keep = float(s) > 0 and float(u[start + j]) < float(c[j].abs() / s)
            codes[start + j] = (1 if c[j] > 0 else -1) if keep else 0
    return codes, torch.tensor(scales, dtype=torch.float32)
