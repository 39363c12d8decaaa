"""BRECQ: block-wise reconstruction (Li et al. 2021, "BRECQ: Pushing the Limit of Post-Training
Quantization by Block Reconstruction"; MISSION G.20).

AdaRound's objective taken over a *block* instead of a layer: all rounding variables of a block
(a transformer layer; for plain CNNs two consecutive conv layers with their BN/ReLU/pool) are
fitted jointly to the block's fp32 output, so errors that cancel inside the block are allowed,
together with the LSQ step sizes of the block's activation quantizers (lr 4e-5, as the paper).
Not done: the Fisher-weighted output loss (the paper's eq. 10); the plain squared error is used.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lowbit.algorithms._ptq import run_ptq
from lowbit.algorithms._recon import ReconSettings
from lowbit.algorithms.adaround import AdaRoundConfig, reconstruction_step
from lowbit.algorithms.bias_correction import scheme_builder
from lowbit.api import register_handler
from lowbit.config import register_config, register_scheme


@register_config("brecq")
@dataclass(frozen=True)
class BrecqConfig(AdaRoundConfig):
    act_lr: float = 4e-5  # LSQ step sizes of the activation quantizers inside the block


def settings_for(config, drop_prob: float = 0.0) -> ReconSettings:
    return ReconSettings(iters=config.iters, lr=config.lr, act_lr=config.act_lr, reg_weight=config.reg_weight,
                         learn_act=config.act_bits is not None, drop_prob=drop_prob, seed=config.seed)


@register_handler(BrecqConfig)
def _brecq(model: nn.Module, config: BrecqConfig, calibration_data=None):
    return run_ptq(model, config, calibration_data, reconstruction_step("block", settings_for(config)),
                   rounding="adaround", act_learn="lsq" if config.act_bits else "none")


for _suffix, _a in (("", None), ("-a8", 8), ("-a4", 4)):
    _what = "weight-only" if _a is None else f"{_a}-bit static activations (LSQ step sizes)"
    register_scheme(f"brecq{_suffix}", f"BRECQ block-wise reconstruction, {_what}; first/last layer 8-bit",
                    options=("bits", "group_size", "symmetric", "kernel"))(scheme_builder(BrecqConfig, _a))
