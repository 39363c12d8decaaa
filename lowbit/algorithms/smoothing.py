"""SmoothQuant's difficulty migration (Xiao et al. 2023, eq. 4), shared by every W8A8 scheme.

For a linear ``y = x W^T`` with per-input-channel activation range ``a_j = max |x_j|`` (from
calibration) and weight range ``w_j = max_i |W_ij|``:

    s_j = a_j^alpha / w_j^(1 - alpha),      y = (x / s) (W * s)^T

so outlier channels of ``x`` are scaled down before per-token quantization and the weights absorb
them. ``alpha`` is the migration strength (0 = none, 1 = all onto the weights).
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.algorithms._calib import capture_inputs, run_batches

SMOOTH_EPS = 1e-5  # floor for ranges of dead channels, so s stays finite and positive


def input_absmax(model: nn.Module, layers: dict[str, nn.Linear], batches) -> dict[str, torch.Tensor]:
    """Per-input-channel max |x| of each layer's input over the calibration batches."""
    stats: dict[str, torch.Tensor] = {}

    def record(name: str, x: torch.Tensor) -> None:
        m = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float()  # (K,)
        stats[name] = torch.maximum(stats[name], m) if name in stats else m

    with capture_inputs(layers, record):
        run_batches(model, batches, desc="smoothing stats")
    return stats


def smoothing_factors(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s_j = a_j^alpha / w_j^(1-alpha)`` for a weight (N, K); returns (K,)."""
    w = weight.detach().abs().amax(dim=0).float().clamp_min(SMOOTH_EPS)  # (K,)
    a = act_absmax.float().clamp_min(SMOOTH_EPS)
    return (a.pow(alpha) / w.pow(1 - alpha)).clamp_min(SMOOTH_EPS)
