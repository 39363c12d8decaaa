"""SmoothQuant's difficulty migration (Xiao et al. 2023, eq. 4), shared by every W8A8 scheme.

For a linear ``y = x W^T`` with per-input-channel activation range ``a_j = max |x_j|`` (from
calibration) and weight range ``w_j = max_i |W_ij|``:

    s_j = a_j^alpha / w_j^(1 - alpha),      y = (x / s) (W * s)^T

so outlier channels of ``x`` are scaled down before per-token quantization and the weights absorb
them. ``alpha`` is the migration strength (0 = none, 1 = all onto the weights). Linears that read the
same activation (BERT's query / key / value, a Llama MLP's gate / up) share one ``s``, computed with
``w_j`` over their stacked weights (the paper's per-activation factor, :func:`layer_smoothing_factors`):
the activation is then scaled and quantized once for all of them, which is what lets an exported graph
quantize it once (``lowbit.io.onnx_bert``).

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


def layer_smoothing_factors(stats: dict[str, torch.Tensor], layers: dict[str, nn.Linear],
                            alpha: float, shared: bool = True) -> dict[str, torch.Tensor]:
    """SmoothQuant factors per layer name, one shared ``s`` for siblings that read the same activation.

    Siblings: layers under the same parent module whose input statistics are identical (the same tensor
    fed them all, e.g. ``attention.self.{query,key,value}``); their ``s`` takes ``w_j`` over the stacked
    weights. ``shared=False``: every layer its own ``s``. A layer without statistics (never reached) gets none."""
    groups: dict[tuple, list[str]] = {}
    for name in layers:
        if name not in stats:
            continue
        if not shared:
            groups[("", name)] = [name]
            continue
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        for key, members in groups.items():
            first = members[0]
            if key[0] == parent and torch.equal(stats[first], stats[name]):
                members.append(name)
                break
        else:
            groups[(parent, name)] = [name]
    out = {}
    for members in groups.values():
        weight = torch.cat([layers[n].weight.detach() for n in members])  # (sum of N, K): the stacked siblings
        s = smoothing_factors(stats[members[0]], weight, alpha)
        out.update({n: s for n in members})
    return out
