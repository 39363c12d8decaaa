"""Fast Walsh-Hadamard transform ``x @ H_n / sqrt(n)`` over the last dim, with its dense twin.

For ``n = m * 2^k`` (``m = 12^a``) the matrix is ``H_n = H_m ⊗ H_p`` (``lowbit.core.hadamard``); with
``x`` viewed as ``X`` (m, p) (index ``a p + b``), ``x H_n = H_m^T X H_p``: ``log2 p`` rounds of
butterflies ``(u, v) -> (u + v, u - v)`` on the p axis, then one small dense product over the m
axis, ``O(n (log n + m))`` instead of ``O(n^2)``. The reference is one dense matmul in float64.
"""

from __future__ import annotations

import math

import torch

from lowbit.core.hadamard import hadamard, small_factor, split_order


def _transform(x: torch.Tensor, transpose: bool) -> torch.Tensor:
    """``x @ H`` (or ``x @ H^T``) for ``H = (H_m ⊗ H_p) / sqrt(n)`` over the last dim; see below."""
    n = x.shape[-1]
    m, p = split_order(n)
    lead = x.shape[:-1]
    y = x.reshape(-1, m, p)  # (R, m, p): entry a p + b of x is X[a, b]
    r = y.shape[0]
    h = 1
    while h < p:  # X H_p by butterflies (Sylvester's H_p is symmetric)
        y = y.reshape(r, m, p // (2 * h), 2, h)  # (R, m, blocks, 2, h)
        u, v = y[..., 0, :], y[..., 1, :]
        y = torch.stack((u + v, u - v), dim=-2)
        h *= 2
    y = y.reshape(r, m, p)
    if m > 1:  # x H = H_m^T X H_p, x H^T = H_m X H_p
        hm = small_factor(m).to(x.dtype)
        y = torch.einsum("ma,rap->rmp" if transpose else "am,rap->rmp", hm, y)
    return (y.reshape(*lead, n) / math.sqrt(n)).to(x.dtype)


def hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """Fast ``x @ (H_n / sqrt(n))`` over the last dim for ``n = m * 2^k``: ``O(n (log n + m))``.

    With ``H_n = H_m ⊗ H_p`` and ``x`` viewed as ``X`` (m, p) (index ``a p + b``), ``x H_n`` is
    ``H_m^T X H_p``: Walsh-Hadamard butterflies ``(u, v) -> (u + v, u - v)`` on the p axis, then one
    small dense product over the m axis. Twin: :func:`hadamard_transform_ref`.
    """
    return _transform(x, transpose=False)


def hadamard_transform_t(x: torch.Tensor) -> torch.Tensor:
    """``x @ (H_n / sqrt(n))^T``, the inverse of :func:`hadamard_transform` (Paley's H_12 is not symmetric)."""
    return _transform(x, transpose=True)


def hadamard_transform_ref(x: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """Reference: ``x @ (H_n / sqrt(n))`` over the last dim, one dense matmul."""
    n = n or x.shape[-1]
    return (x.to(torch.float64) @ hadamard(n, torch.float64)).to(x.dtype)


def example_hadamard(seed: int) -> dict:
    """Registry example: SmolLM2's three orders (64 head dim, 576 hidden, 1536 MLP) on random rows."""
    g = torch.Generator().manual_seed(seed)
    n = (64, 576, 1536)[seed % 3]
    x = torch.randn(2, 5, n, generator=g)  # (B, T, n)
    return {"fast": (x,), "reference": (x,), "exact": False, "tol": 1e-5}


__all__ = ["hadamard_transform", "hadamard_transform_t", "hadamard_transform_ref", "example_hadamard"]
