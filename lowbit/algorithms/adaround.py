"""AdaRound: learned rounding, layer by layer (Nagel et al. 2020, "Up or Down? Adaptive Rounding for
Post-Training Quantization"; MISSION G.20).

Each weight is rounded down or up, ``W_hat = s * clamp(floor(W / s) + h(V), qmin, qmax)`` with the
rectified sigmoid ``h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1)``, zeta = 1.1, gamma = -0.1,
``V`` initialised so that ``h(V) = W / s - floor(W / s)``. Per layer, in forward order, ``V`` minimises

    || W x - W_hat x_hat ||^2 + lambda * sum(1 - |2 h(V) - 1|^beta)

on calibration inputs, ``x`` from the fp32 model and ``x_hat`` from the quantized one (so earlier
layers' errors are compensated), beta annealed 20 -> 2, lambda = 0.01; then ``h`` is hardened to
``V >= 0``. Activation ranges stay as calibrated. See :mod:`lowbit.algorithms._recon`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lowbit.algorithms._ptq import PTQBase, run_ptq
from lowbit.algorithms._recon import ReconSettings, find_blocks, reconstruct
from lowbit.algorithms.bias_correction import scheme_builder
from lowbit.api import register_handler
from lowbit.config import register_config, register_scheme
from lowbit.errors import ConfigError


@register_config("adaround")
@dataclass(frozen=True)
class AdaRoundConfig(PTQBase):
    iters: int = 1000  # per layer (the paper uses 10k-20k on ImageNet; digits / MiniLM converge sooner)
    lr: float = 1e-3
    reg_weight: float = 0.01
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        if self.iters < 0 or self.lr <= 0 or self.reg_weight < 0:
            raise ConfigError(f"need iters >= 0, lr > 0, reg_weight >= 0; got {self.iters}, {self.lr}, {self.reg_weight}")


def reconstruction_step(unit: str, settings: ReconSettings):
    """A ``compensate`` step for :func:`run_ptq`: reconstruct per ``unit`` ("layer" or "block")."""

    def step(model: nn.Module, fp: nn.Module, qlayers: dict, batches: list, order: list[str]) -> dict:
        blocks = find_blocks(model, list(qlayers), order, unit)
        losses = reconstruct(model, fp, blocks, batches, settings)
        return {"reconstruction": losses, "blocks": [list(b.layers) for b in blocks]}

    return step


@register_handler(AdaRoundConfig)
def _adaround(model: nn.Module, config: AdaRoundConfig, calibration_data=None):
    settings = ReconSettings(iters=config.iters, lr=config.lr, reg_weight=config.reg_weight, seed=config.seed)
    return run_ptq(model, config, calibration_data, reconstruction_step("layer", settings), rounding="adaround")


for _suffix, _a in (("", None), ("-a8", 8), ("-a4", 4)):
    _what = "weight-only" if _a is None else f"{_a}-bit static activations"
    register_scheme(f"adaround{_suffix}", f"AdaRound learned rounding layer by layer, {_what}; first/last layer "
                    "8-bit", options=("bits", "group_size", "symmetric", "kernel"))(scheme_builder(AdaRoundConfig, _a))
