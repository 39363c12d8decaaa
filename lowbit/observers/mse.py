"""MSE observer: the clipping range that minimises the expected squared quantization error.

``r* = argmin_r  sum_bins count_b * (v_b - fq_r(v_b))^2``, where ``fq_r`` fake-quantizes with the
range of clipping ratio ``r`` (``[0, r max|x|]`` symmetric, ``r [min, max]`` affine) and ``v_b`` are
points spread evenly inside each bin (v are taken as uniform within a bin). This balances
rounding error (large range) against clipping error (small range): Banner et al. 2019 (ACIQ),
Nagel et al. 2021 "A White Paper on Neural Network Quantization", section 3.4.
"""

from __future__ import annotations

import torch

from lowbit.core import qparams_from_range
from lowbit.observers.histogram import HistogramObserver

SUBDIVIDE = 4  # evaluation points per histogram bin


def fake_quantize_with_range(v: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, fmt, symmetric: bool) -> torch.Tensor:
    """``dequantize(quantize(v))`` for ranges lo, hi of shape (..., C) applied to v (C, n): (..., C, n)."""
    qp = qparams_from_range(lo, hi, fmt, symmetric)
    scale = qp.scale[..., None]
    zp = qp.zero_point[..., None].float() if qp.zero_point is not None else 0.0
    return (torch.round(v / scale) + zp).clamp(qp.qmin, qp.qmax).sub(zp).mul(scale)


CHUNK_ELEMENTS = 1 << 22  # candidates evaluated together: bounded memory, few large ops


class MSEObserver(HistogramObserver):
    name = "mse"

    def __init__(self, fmt="int8", symmetric=True, axis=None, bins: int = 2048, candidates: int = 100,
                 min_ratio: float = 0.05):
        super().__init__(fmt, symmetric, axis, bins)
        self.ratios = torch.linspace(min_ratio, 1.0, candidates)

    def errors(self) -> torch.Tensor:
        """Expected squared error per candidate ratio and channel: (R, C)."""
        sub = SUBDIVIDE if self.hist.shape[0] == 1 else 1
        v = self.bin_centers(sub)  # (C, B * s)
        w = self.hist.repeat_interleave(sub, dim=1) / sub  # (C, B * s)
        step = max(1, CHUNK_ELEMENTS // v.numel())
        out = []
        for i in range(0, len(self.ratios), step):
            r = self.ratios[i:i + step, None]  # (r, 1)
            lo, hi = self.ratio_range(r)  # (r, C)
            fq = fake_quantize_with_range(v, lo, hi, self.fmt, self.symmetric)  # (r, C, B * s)
            out.append(((v - fq) ** 2 * w).sum(dim=-1))  # (r, C)
        return torch.cat(out)  # (R, C)

    def best_ratio(self) -> torch.Tensor:
        return self.ratios[self.errors().argmin(dim=0)]
