"""KL / entropy observer: TensorRT's INT8 entropy calibration (Migacz 2017, "8-bit Inference with TensorRT").

For each candidate window of the first ``i`` histogram bins (symmetric: of ``|x|``; affine: a window
shrinking towards 0): the reference distribution ``P`` is the window with everything outside it
added to its edge bins; ``Q`` merges the window into ``L`` quantization levels (``qmax + 1`` for
symmetric, ``qmax - qmin + 1`` for affine) and spreads each level's mass evenly over its non-empty
bins. The threshold minimising ``KL(P || Q) = sum P log(P / Q)`` wins.
"""

from __future__ import annotations

import torch

from lowbit.observers.histogram import HistogramObserver

Q_EPS = 1e-4  # mass given to bins where P > 0 but Q = 0 (clipped mass landing on an empty edge bin)


def kl_of_window(hist: torch.Tensor, a: int, b: int, levels: int) -> torch.Tensor:
    """KL(P || Q) per channel (C,) for the bin window [a, b) of hist (C, B), b - a >= levels."""
    sliced = hist[:, a:b]  # (C, n)
    n = b - a
    p = sliced.clone()
    p[:, 0] += hist[:, :a].sum(dim=1)
    p[:, -1] += hist[:, b:].sum(dim=1)
    level = torch.arange(n) * levels // n  # (n,) level of each bin
    c = hist.shape[0]
    mass = torch.zeros(c, levels).index_add_(1, level, sliced)  # (C, L)
    nonempty = (sliced > 0).float()
    count = torch.zeros(c, levels).index_add_(1, level, nonempty)  # (C, L)
    q = nonempty * (mass / count.clamp_min(1.0))[:, level]  # (C, n)
    p = p / p.sum(dim=1, keepdim=True).clamp_min(1e-12)
    q = q / q.sum(dim=1, keepdim=True).clamp_min(1e-12)
    q = torch.where((p > 0) & (q <= 0), torch.full_like(q, Q_EPS), q)
    terms = torch.where(p > 0, p * (p.clamp_min(1e-30).log() - q.clamp_min(1e-30).log()), torch.zeros_like(p))
    return terms.sum(dim=1)


class KLObserver(HistogramObserver):
    name = "kl"

    def __init__(self, fmt="int8", symmetric=True, axis=None, bins: int = 2048, stride: int = 16):
        super().__init__(fmt, symmetric, axis, bins)
        self.stride = stride

    @property
    def levels(self) -> int:
        f = self.fmt
        return f.qmax + 1 if self.symmetric else f.qmax - f.qmin + 1

    def best_ratio(self) -> torch.Tensor:
        b = self.bins
        levels = min(self.levels, b)
        ends = list(range(levels, b + 1, self.stride))
        if ends[-1] != b:
            ends.append(b)
        if self.symmetric:
            windows = [(0, e) for e in ends]
            ratios = [e / b for e in ends]
        else:
            # zero sits at bin z (per channel in general; use the mean position, windows shrink towards it)
            z = float(((-self.lo) / (self.hi - self.lo)).mean()) * b
            windows, ratios = [], []
            for e in ends:
                r = e / b
                a0, b0 = int(round(z * (1 - r))), int(round(z + r * (b - z)))
                if b0 - a0 >= levels:
                    windows.append((a0, b0))
                    ratios.append(r)
        kl = torch.stack([kl_of_window(self.hist, a, e, levels) for a, e in windows])  # (R, C)
        return torch.tensor(ratios)[kl.argmin(dim=0)]
