"""Top-K sparsification with error feedback (Aji & Heafield, "Sparse Communication for Distributed
Gradient Descent", EMNLP 2017; memory as in Stich, Cordonnier, Jaggi, "Sparsified SGD with Memory",
NeurIPS 2018).

    I      = indices of the k largest |x_i|,   k = max(1, ceil(ratio * n))
    Q(x)_i = x_i if i in I else 0
    e     <- x - Q(x)                        (the unsent coordinates wait in the memory)

Payload: ``k`` int32 indices (ascending) plus ``k`` float32 values, ``8 * k`` bytes.
"""

from __future__ import annotations

import math

import torch

from lowbit.distributed.payload import Compressor, Payload
from lowbit.errors import ConfigError


def sparse_k(numel: int, ratio: float) -> int:
    """Number of coordinates kept: ``max(1, ceil(ratio * numel))`` (never more than ``numel``)."""
    return min(numel, max(1, math.ceil(ratio * numel)))


def check_ratio(ratio: float, name: str) -> None:
    if not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise ConfigError(f"{name}: ratio must be in (0, 1], the fraction of coordinates sent, got {ratio!r}")


def scatter_dense(p: Payload) -> torch.Tensor:
    """Dense flat tensor with ``values`` at ``indices`` and zeros elsewhere."""
    out = torch.zeros(p.numel, dtype=torch.float32)
    out[p.indices.long()] = p.values
    return out


class TopK(Compressor):
    """Send the ``ratio`` fraction of largest-magnitude coordinates; error feedback on by default."""

    name = "topk"

    def __init__(self, ratio: float = 0.01, error_feedback: bool = True, seed: int | None = None):
        check_ratio(ratio, self.name)
        super().__init__(error_feedback, seed)
        self.ratio = float(ratio)

    def nbytes(self, numel: int) -> int:
        return 8 * sparse_k(numel, self.ratio)

    def _encode(self, x: torch.Tensor) -> Payload:
        k = sparse_k(x.numel(), self.ratio)
        idx = torch.topk(x.abs(), k, sorted=False).indices.sort().values  # (k,) ascending
        return Payload(torch.Size([x.numel()]), indices=idx.to(torch.int32), values=x[idx].clone())

    def _decode(self, p: Payload) -> torch.Tensor:
        return scatter_dense(p)


def topk_ref(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """Plain reference: dense Q(x) keeping the k largest |x_i| found by a full sort."""
    x = x.reshape(-1).float()
    k = sparse_k(x.numel(), ratio)
    order = sorted(range(x.numel()), key=lambda i: -abs(float(x[i])))
    out = torch.zeros_like(x)
    for i in order[:k]:
        out[i] = x[i]
    return out
