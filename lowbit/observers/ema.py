"""Moving-average min-max: ``m <- (1 - c) m + c * batch_min`` (likewise max); the first batch initialises.

Smooths the range over batches, so one outlier batch moves it by a fraction ``c`` only (the
"moving average" observer of the Google 2018 integer-inference paper, used during QAT).
"""

from __future__ import annotations

import torch

from lowbit.errors import ConfigError
from lowbit.observers import Observer


class MovingAverageObserver(Observer):
    name = "ema"

    def __init__(self, fmt="int8", symmetric=True, axis=None, averaging_constant: float = 0.1):
        super().__init__(fmt, symmetric, axis)
        if not 0.0 < averaging_constant <= 1.0:
            raise ConfigError(f"averaging_constant must be in (0, 1], got {averaging_constant}")
        self.c = averaging_constant
        self.min_val: torch.Tensor | None = None
        self.max_val: torch.Tensor | None = None

    def _observe(self, x2: torch.Tensor) -> None:
        lo, hi = x2.amin(dim=1), x2.amax(dim=1)  # (C,)
        if self.min_val is None:
            self.min_val, self.max_val = lo, hi
        else:
            self.min_val = self.min_val + self.c * (lo - self.min_val)
            self.max_val = self.max_val + self.c * (hi - self.max_val)

    def compute_range(self):
        self._check_observed()
        return self._shape(self.min_val), self._shape(self.max_val)
