"""Percentile observer: clip at the ``percentile``-th percentile of ``|x|`` (symmetric) or at the
``100 - p`` / ``p`` percentiles of ``x`` (affine), read off the histogram's interpolated CDF.

Discards the rare outliers that set a min-max range (Wu et al. 2020, "Integer Quantization for
Deep Learning Inference", section 4.2; 99.9 - 99.999 are the usual choices).
"""

from __future__ import annotations

import torch

from lowbit.errors import ConfigError
from lowbit.observers.histogram import RANGE_EPS, HistogramObserver


def _quantile_from_hist(hist: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, q: float) -> torch.Tensor:
    """Per channel: the value below which a fraction ``q`` of the counts lies (linear within bins)."""
    c, b = hist.shape
    cdf = torch.cat([torch.zeros(c, 1), hist.cumsum(dim=1)], dim=1)  # (C, B + 1)
    target = q * cdf[:, -1:]  # (C, 1)
    idx = torch.searchsorted(cdf.contiguous(), target.contiguous()).clamp(1, b)  # (C, 1)
    c0, c1 = cdf.gather(1, idx - 1), cdf.gather(1, idx)
    t = ((target - c0) / (c1 - c0).clamp_min(RANGE_EPS)).clamp(0.0, 1.0)
    pos = (idx - 1 + t).squeeze(1) / b  # fraction of the range (C,)
    return lo + (hi - lo) * pos


class PercentileObserver(HistogramObserver):
    name = "percentile"

    def __init__(self, fmt="int8", symmetric=True, axis=None, percentile: float = 99.99, bins: int = 2048):
        super().__init__(fmt, symmetric, axis, bins)
        if not 50.0 < percentile <= 100.0:
            raise ConfigError(f"percentile must be in (50, 100], got {percentile}")
        self.percentile = percentile

    def compute_range(self):
        self._check_observed()
        p = self.percentile / 100.0
        hi = _quantile_from_hist(self.hist, self.lo, self.hi, p)
        if self.symmetric:
            return self._shape(-hi), self._shape(hi)
        lo = _quantile_from_hist(self.hist, self.lo, self.hi, 1.0 - p).clamp(max=0.0)
        return self._shape(lo), self._shape(hi.clamp(min=0.0))

    def best_ratio(self) -> torch.Tensor:
        lo, hi = self.compute_range()
        return (hi.reshape(-1) / self.hi).clamp(0.0, 1.0)
