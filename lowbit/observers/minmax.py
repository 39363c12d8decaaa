"""Min-max observer: the range is the running minimum and maximum of everything observed."""

from __future__ import annotations

import torch

from lowbit.observers import Observer


class MinMaxObserver(Observer):
    """``min_val = min x``, ``max_val = max x`` over all batches (exact; a single outlier sets the range)."""

    name = "minmax"

    def __init__(self, fmt="int8", symmetric=True, axis=None):
        super().__init__(fmt, symmetric, axis)
        self.min_val: torch.Tensor | None = None
        self.max_val: torch.Tensor | None = None

    def _observe(self, x2: torch.Tensor) -> None:
        lo, hi = x2.amin(dim=1), x2.amax(dim=1)  # (C,)
        if self.min_val is None:
            self.min_val, self.max_val = lo, hi
        else:
            self.min_val = torch.minimum(self.min_val, lo)
            self.max_val = torch.maximum(self.max_val, hi)

    def compute_range(self):
        self._check_observed()
        return self._shape(self.min_val), self._shape(self.max_val)
