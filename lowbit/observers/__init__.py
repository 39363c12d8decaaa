"""Range estimation for calibration: one interface, one small file per method, a registry.

An observer watches the tensors a quantization point sees during calibration and then proposes a
clipping range ``[min_val, max_val]``; :meth:`Observer.qparams` turns it into ``(scale,
zero_point)`` with :func:`lowbit.core.qparams_from_range`. The quantizer it serves is data: ``fmt``
(any uniform format: int8, int4, ... so the same observers serve W8A8 and W4A4) and ``symmetric``.
``axis=None`` observes per tensor, ``axis=k`` one range per index of dimension ``k``.

================  ===========================================================================
``minmax``        running min / max (exact, outlier-driven)
``ema``           moving average of per-batch min / max (``averaging_constant``)
``percentile``    the ``percentile``-th percentile of the values (|x| when symmetric), histogram
``mse``           the clipping range minimising the quantization MSE over the histogram
``kl``            TensorRT's entropy calibration: the range minimising KL(P || Q) of histograms
``output``        model-level: each layer's range chosen to minimise the KL / cosine loss of the
                  model's final outputs vs fp32 (:mod:`lowbit.observers.output`)
================  ===========================================================================
"""

from __future__ import annotations

import torch

from lowbit.core import QParams, get_format, per_channel, per_tensor, qparams_from_range
from lowbit.core.formats import Format, Kind
from lowbit.errors import CalibrationError, ConfigError


class Observer:
    """Accumulate statistics with :meth:`observe`, then :meth:`compute_range` / :meth:`qparams`."""

    name = "base"

    def __init__(self, fmt: str | Format = "int8", symmetric: bool = True, axis: int | None = None):
        self.fmt = get_format(fmt)
        if self.fmt.kind is not Kind.UNIFORM:
            raise ConfigError(f"observers serve uniform integer formats, got {self.fmt.name!r}")
        self.symmetric = symmetric
        self.axis = axis
        self.n_batches = 0

    # ---- to implement -------------------------------------------------------------------------
    def _observe(self, x2: torch.Tensor) -> None:
        """Accumulate ``x2`` of shape (C, n): one row per channel (C = 1 per tensor)."""
        raise NotImplementedError

    def compute_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(min_val, max_val), each of shape () per tensor or (C,) per channel."""
        raise NotImplementedError

    # ---- shared -------------------------------------------------------------------------------
    def observe(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        if x.numel() == 0:
            return
        if self.axis is None:
            x2 = x.reshape(1, -1)  # (1, numel)
        else:
            axis = self.axis % x.dim()
            x2 = x.movedim(axis, 0).reshape(x.shape[axis], -1)  # (C, numel / C)
        self._observe(x2)
        self.n_batches += 1

    def _shape(self, v: torch.Tensor) -> torch.Tensor:
        return v.reshape(()) if self.axis is None else v

    def _check_observed(self) -> None:
        if self.n_batches == 0:
            raise CalibrationError(f"{self.name} observer saw no data: run calibration batches through the model first")

    @property
    def granularity(self):
        return per_tensor() if self.axis is None else per_channel(self.axis)

    def qparams(self) -> QParams:
        lo, hi = self.compute_range()
        return qparams_from_range(lo, hi, self.fmt, self.symmetric, self.granularity)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(fmt={self.fmt.name}, symmetric={self.symmetric}, axis={self.axis})"


from lowbit.observers.ema import MovingAverageObserver  # noqa: E402
from lowbit.observers.histogram import HistogramObserver  # noqa: E402
from lowbit.observers.kl import KLObserver  # noqa: E402
from lowbit.observers.minmax import MinMaxObserver  # noqa: E402
from lowbit.observers.mse import MSEObserver  # noqa: E402
from lowbit.observers.output import OutputObserver, search_output_ranges  # noqa: E402
from lowbit.observers.percentile import PercentileObserver  # noqa: E402

OBSERVERS: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "ema": MovingAverageObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
    "kl": KLObserver,
    "output": OutputObserver,
}


def make_observer(name: str, fmt: str | Format = "int8", symmetric: bool = True, axis: int | None = None,
                  **options) -> Observer:
    """An observer by registry name; ``options`` go to its constructor (e.g. ``percentile=99.9``)."""
    cls = OBSERVERS.get(name)
    if cls is None:
        raise ConfigError(f"unknown observer {name!r}; valid observers: {', '.join(OBSERVERS)}")
    try:
        return cls(fmt, symmetric, axis, **options)
    except TypeError as exc:
        raise ConfigError(f"bad options for observer {name!r}: {exc}") from None


__all__ = ["Observer", "OBSERVERS", "make_observer", "MinMaxObserver", "MovingAverageObserver",
           "PercentileObserver", "MSEObserver", "KLObserver", "HistogramObserver", "OutputObserver",
           "search_output_ranges"]
