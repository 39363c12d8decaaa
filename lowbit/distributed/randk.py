"""Random-K sparsification (Stich, Cordonnier, Jaggi, "Sparsified SGD with Memory", NeurIPS 2018;
Wangni, Wang, Liu, Zhang, "Gradient Sparsification for Communication-Efficient Distributed
Optimization", NeurIPS 2018).

    I      = k indices drawn uniformly without replacement,   k = max(1, ceil(ratio * n))
    Q(x)_i = x_i if i in I else 0                (with error feedback: e <- x - Q(x))
    Q(x)_i = (n / k) x_i if i in I else 0        (without: the rescaling makes E[Q(x)] = x)

Indices are sent (int32, ascending) so a payload decodes on its own even when ranks draw different
sets. Payload: ``8 * k`` bytes.
"""

from __future__ import annotations

import torch

from lowbit.distributed.payload import Compressor, Payload
from lowbit.distributed.topk import check_ratio, scatter_dense, sparse_k


class RandomK(Compressor):
    """Send a uniformly random ``ratio`` fraction of coordinates; error feedback on by default."""

    name = "randomk"

    def __init__(self, ratio: float = 0.01, error_feedback: bool = True, seed: int | None = None):
        check_ratio(ratio, self.name)
        super().__init__(error_feedback, seed)
        self.ratio = float(ratio)

    def nbytes(self, numel: int) -> int:
        return 8 * sparse_k(numel, self.ratio)

    def _encode(self, x: torch.Tensor) -> Payload:
        n = x.numel()
        k = sparse_k(n, self.ratio)
        idx = torch.randperm(n, generator=self.generator)[:k].sort().values  # (k,) ascending
        values = x[idx] if self.error_feedback else x[idx] * (n / k)
        return Payload(torch.Size([n]), indices=idx.to(torch.int32), values=values.clone())

    def _decode(self, p: Payload) -> torch.Tensor:
        return scatter_dense(p)


def randomk_ref(x: torch.Tensor, perm: torch.Tensor, ratio: float, unbiased: bool) -> torch.Tensor:
    """Plain reference given the permutation ``perm`` the generator produced: dense Q(x)."""
    x = x.reshape(-1).float()
    n = x.numel()
    k = sparse_k(n, ratio)
    out = torch.zeros_like(x)
    for i in perm[:k].tolist():
        out[i] = x[i] * (n / k) if unbiased else x[i]
    return out
