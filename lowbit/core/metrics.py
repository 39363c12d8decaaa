"""Error metrics between a reference ``x`` and its approximation ``y``.

- MSE ``mean((x - y)^2)``;
- SQNR ``10 log10(sum x^2 / sum (x - y)^2)`` in dB (inf when exact);
- cosine ``<x, y> / (|x| |y|)`` over the flattened tensors, or per row along ``dim``;
- max-abs ``max |x - y|``.
Quantization error = rounding error (inside the range, at most scale/2 per element) + clipping
error (outside it); :func:`error_split` reports the two parts separately.
"""

from __future__ import annotations

import math

import torch


def mse(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.detach(), y.detach()
    return float(((x.float() - y.float()) ** 2).mean())


def sqnr_db(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.detach(), y.detach()
    signal = float((x.double() ** 2).sum())
    noise = float(((x.double() - y.double()) ** 2).sum())
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def cosine(x: torch.Tensor, y: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Cosine similarity: a 0-d tensor over the flattened inputs, or one value per row along ``dim``."""
    if dim is None:
        x, y, dim = x.reshape(-1), y.reshape(-1), 0
    return torch.nn.functional.cosine_similarity(x.double(), y.double(), dim=dim, eps=1e-30).float()


def max_abs(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.detach(), y.detach()
    return float((x.float() - y.float()).abs().max()) if x.numel() else 0.0


def error_split(x: torch.Tensor, y: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> dict[str, float]:
    """Sum of squared error split into rounding (``lo <= x <= hi``) and clipping (outside) parts."""
    inside = (x >= lo) & (x <= hi)
    err = (x.double() - y.double()) ** 2
    return {"rounding_sse": float(err[inside].sum()), "clipping_sse": float(err[~inside].sum())}
