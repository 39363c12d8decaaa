"""SmoothQuant's difficulty migration (Xiao et al. 2023, eq. 4), shared by every W8A8 scheme.

For a linear ``y = x W^T`` with per-input-channel activation range ``a_j = max |x_j|`` (from
calibration) and weight range ``w_j = max_i |W_ij|``:

    s_j = a_j^alpha / w_j^(1 - alpha),      y = (x / s) (W * s)^T

so outlier channels of ``x`` are scaled down before per-token quantization and the weights absorb
them. ``alpha`` is the migration strength (0 = none, 1 = all onto the weights).

Across ``torch.distributed`` ranks (``torchrun``) each rank runs its share of the calibration
batches and the per-channel maxima are all-reduced with ``max``: exact, so the factors are
bit-identical to one process's at any world size (``lowbit.algorithms.ranks``).
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.algorithms._calib import capture_inputs, run_batches
from lowbit.algorithms.ranks import all_max, collective_guard, ranks_active, require_batches, shard

SMOOTH_EPS = 1e-5  # floor for ranges of dead channels, so s stays finite and positive


def input_absmax(model: nn.Module, layers: dict[str, nn.Linear], batches) -> dict[str, torch.Tensor]:
    """Per-input-channel max |x| of each layer's input over the calibration batches.

    Across ranks: this rank's batches ``r, r + W, ...``, then an all-reduce ``max`` per layer (in
    ``layers``' order, the same on every rank); a layer no rank reached stays absent."""
    stats: dict[str, torch.Tensor] = {}
    distributed = ranks_active()
    if distributed:
        batches = list(batches)
        require_batches(len(batches), "SmoothQuant")
        batches = shard(batches)

    def record(name: str, x: torch.Tensor) -> None:
        m = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float()  # (K,)
        stats[name] = torch.maximum(stats[name], m) if name in stats else m

    with capture_inputs(layers, record):
        run_batches(model, batches, desc="smoothing stats")
    if distributed:
        with collective_guard("SmoothQuant statistics"):
            seen = all_max(torch.tensor([float(n in stats) for n in layers]))
            for k, n in enumerate(layers):
                if seen[k]:  # absolute values are >= 0: a rank that never reached the layer sends zeros
                    stats[n] = all_max(stats[n] if n in stats else torch.zeros(layers[n].in_features))
    return stats


def smoothing_factors(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s_j = a_j^alpha / w_j^(1-alpha)`` for a weight (N, K); returns (K,)."""
    w = weight.detach().abs().amax(dim=0).float().clamp_min(SMOOTH_EPS)  # (K,)
    a = act_absmax.float().clamp_min(SMOOTH_EPS)
    return (a.pow(alpha) / w.pow(1 - alpha)).clamp_min(SMOOTH_EPS)
