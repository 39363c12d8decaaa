"""Shared base of the percentile, MSE and KL observers: a per-channel histogram whose range grows.

Symmetric quantizers histogram ``|x|`` over ``[0, max|x|]``; affine ones histogram ``x`` over
``[min(x, 0), max(x, 0)]`` (the range always holds 0, as :func:`qparams_from_range` requires).
When a batch falls outside the current range the range grows and the old counts are re-binned by
linear interpolation of their cumulative distribution (bounded memory: ``C x bins`` counts).

A *candidate range* is a clipping ratio ``r`` in (0, 1]: ``[0, r * hi]`` when symmetric,
``[r * lo, r * hi]`` when affine (shrinking towards 0, where the zero-point sits).
"""

from __future__ import annotations

import torch

from lowbit.errors import ConfigError
from lowbit.observers import Observer

RANGE_EPS = 1e-8  # width floor of an all-constant histogram


def _rebin(counts: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, new_lo: torch.Tensor,
           new_hi: torch.Tensor) -> torch.Tensor:
    """Counts (C, B) over [lo, hi] redistributed onto B bins over [new_lo, new_hi] ⊇ [lo, hi]."""
    c, b = counts.shape
    steps = torch.arange(b + 1, dtype=torch.float32) / b  # (B + 1,)
    old_edges = lo[:, None] + (hi - lo)[:, None] * steps  # (C, B + 1)
    new_edges = new_lo[:, None] + (new_hi - new_lo)[:, None] * steps  # (C, B + 1)
    cdf = torch.cat([torch.zeros(c, 1), counts.cumsum(dim=1)], dim=1)  # (C, B + 1)
    idx = torch.searchsorted(old_edges.contiguous(), new_edges.contiguous()).clamp(1, b)  # (C, B + 1)
    x0, x1 = old_edges.gather(1, idx - 1), old_edges.gather(1, idx)
    c0, c1 = cdf.gather(1, idx - 1), cdf.gather(1, idx)
    t = ((new_edges - x0) / (x1 - x0).clamp_min(RANGE_EPS)).clamp(0.0, 1.0)
    new_cdf = c0 + t * (c1 - c0)
    new_cdf = torch.where(new_edges >= hi[:, None], cdf[:, -1:], new_cdf)
    new_cdf = torch.where(new_edges <= lo[:, None], torch.zeros_like(new_cdf), new_cdf)
    return new_cdf.diff(dim=1).clamp_min(0.0)


class HistogramObserver(Observer):
    """Histogram accumulation; subclasses pick the clipping ratio in :meth:`best_ratio`."""

    name = "histogram"

    def __init__(self, fmt="int8", symmetric=True, axis=None, bins: int = 2048):
        super().__init__(fmt, symmetric, axis)
        if bins < 16:
            raise ConfigError(f"bins must be at least 16, got {bins}")
        self.bins = bins
        self.hist: torch.Tensor | None = None  # (C, bins)
        self.lo: torch.Tensor | None = None  # (C,)
        self.hi: torch.Tensor | None = None  # (C,)

    def _observe(self, x2: torch.Tensor) -> None:
        v = x2.abs() if self.symmetric else x2  # (C, n)
        lo = torch.zeros(v.shape[0]) if self.symmetric else v.amin(dim=1).clamp(max=0.0)
        hi = v.amax(dim=1).clamp(min=0.0)
        hi = torch.maximum(hi, lo + RANGE_EPS)
        if self.hist is None:
            self.hist, self.lo, self.hi = torch.zeros(v.shape[0], self.bins), lo, hi
        elif bool((lo < self.lo).any() or (hi > self.hi).any()):
            new_lo, new_hi = torch.minimum(lo, self.lo), torch.maximum(hi, self.hi)
            self.hist = _rebin(self.hist, self.lo, self.hi, new_lo, new_hi)
            self.lo, self.hi = new_lo, new_hi
        width = (self.hi - self.lo)[:, None]
        idx = ((v - self.lo[:, None]) / width * self.bins).floor().clamp(0, self.bins - 1).long()  # (C, n)
        self.hist.scatter_add_(1, idx, torch.ones_like(v))

    # ---- candidate ranges ---------------------------------------------------------------------
    def bin_centers(self, subdivide: int = 1) -> torch.Tensor:
        """(C, bins * subdivide) points, ``subdivide`` evenly spaced per bin (uniform within a bin)."""
        k = torch.arange(self.bins * subdivide, dtype=torch.float32)
        frac = (k + 0.5) / (self.bins * subdivide)  # (B * s,)
        return self.lo[:, None] + (self.hi - self.lo)[:, None] * frac

    def ratio_range(self, r: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        """(min_val, max_val) of clipping ratio ``r`` (scalar or (C,)), per channel."""
        if self.symmetric:
            t = self.hi * r
            return -t, t
        return self.lo * r, self.hi * r

    def best_ratio(self) -> torch.Tensor:
        """Clipping ratio per channel (C,); 1.0 = the full observed range."""
        raise NotImplementedError

    def compute_range(self):
        self._check_observed()
        lo, hi = self.ratio_range(self.best_ratio())
        return self._shape(lo), self._shape(hi)
