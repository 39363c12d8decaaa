"""QDrop: block reconstruction with activation quantization randomly dropped (Wei et al. 2022,
"QDrop: Randomly Dropping Quantization for Extremely Low-bit Post-Training Quantization";
MISSION G.20).

BRECQ's block reconstruction, but while it runs each element of each activation quantizer's
output is kept in float with probability ``drop_prob`` (0.5 in the paper):
``x_out = where(u < p, x, fq(x))``, ``u ~ U(0, 1)`` per element. The weights then learn to
tolerate activation noise around a flatter optimum instead of fitting one fixed activation error;
at inference every activation is quantized. With weight-only configs there is nothing to drop and
QDrop equals BRECQ.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lowbit.algorithms._ptq import run_ptq
from lowbit.algorithms.adaround import reconstruction_step
from lowbit.algorithms.bias_correction import scheme_builder
from lowbit.algorithms.brecq import BrecqConfig, settings_for
from lowbit.api import register_handler
from lowbit.config import register_config, register_scheme
from lowbit.errors import ConfigError


@register_config("qdrop")
@dataclass(frozen=True)
class QDropConfig(BrecqConfig):
    drop_prob: float = 0.5

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.drop_prob < 1.0:
            raise ConfigError(f"drop_prob must be in [0, 1), got {self.drop_prob}")


@register_handler(QDropConfig)
def _qdrop(model: nn.Module, config: QDropConfig, calibration_data=None):
    step = reconstruction_step("block", settings_for(config, config.drop_prob))
    return run_ptq(model, config, calibration_data, step, rounding="adaround",
                   act_learn="lsq" if config.act_bits else "none")


for _suffix, _a in (("", None), ("-a8", 8), ("-a4", 4)):
    _what = "weight-only (= BRECQ)" if _a is None else f"{_a}-bit static activations, dropped with p=0.5"
    register_scheme(f"qdrop{_suffix}", f"QDrop block reconstruction, {_what}; first/last layer 8-bit",
                    options=("bits", "group_size", "symmetric", "kernel"))(scheme_builder(QDropConfig, _a))
