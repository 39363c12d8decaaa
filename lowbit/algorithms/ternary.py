"""Trained Ternary Quantization (Zhu et al. 2017; MISSION C.12): weights in {-W_n, 0, +W_p}.

Per layer, with ``Delta = t * max|w|`` (t = 0.05) recomputed from the latent float weights ``w``:
``w_t = W_p`` where ``w > Delta``, ``-W_n`` where ``w < -Delta``, else 0. ``W_p`` and ``W_n`` are
learned (their gradients are the sums of the gradients over their regions), and the latent weights
get the scaled straight-through gradient ``W_p * g`` / ``g`` / ``W_n * g`` on the positive / zero /
negative regions (TTQ eq. 7-8). As in the paper the first and last layer stay float and activations
are not quantized. Converted to :class:`lowbit.nn.binary.TernaryConv2d` / ``TernaryLinear``
(2-bit codes + the two scales).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.algorithms.qat import builtin_training_data, convert_qat, is_prepared, prepare_layers, train_qat
from lowbit.api import register_handler
from lowbit.config import BaseConfig, register_config, register_scheme
from lowbit.errors import ConfigError
from lowbit.nn.binary import TernaryConv2d, TernaryLinear


class TernaryLayer(nn.Module):
    def __init__(self, module: nn.Module, threshold: float = 0.05, name: str = ""):
        super().__init__()
        self.module, self.threshold, self.name = module, threshold, name
        w = module.weight.detach()
        pos, neg = self.masks(w)
        self.w_pos = nn.Parameter(w[pos.bool()].abs().mean() if pos.any() else w.abs().mean())
        self.w_neg = nn.Parameter(w[neg.bool()].abs().mean() if neg.any() else w.abs().mean())

    def masks(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        delta = self.threshold * w.detach().abs().max()
        return (w.detach() > delta).float(), (w.detach() < -delta).float()

    def ternary_weight(self) -> torch.Tensor:
        w = self.module.weight
        pos, neg = self.masks(w)
        grad_scale = (pos * self.w_pos + neg * self.w_neg + (1 - pos - neg)).detach()
        latent = grad_scale * w
        return self.w_pos * pos - self.w_neg * neg + (latent - latent.detach())  # value: exactly the ternary weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m, w = self.module, self.ternary_weight()
        if isinstance(m, nn.Conv2d):
            return m._conv_forward(x, w, m.bias)
        return F.linear(x, w, m.bias)

    def to_real(self, kernel: str = "auto") -> nn.Module:
        pos, neg = self.masks(self.module.weight)
        codes = (pos - neg).to(torch.int8)
        cls = TernaryConv2d if isinstance(self.module, nn.Conv2d) else TernaryLinear
        return cls.from_codes(self.module, codes, self.w_pos.detach(), self.w_neg.detach())


@register_config("ttq")
@dataclass(frozen=True)
class TTQConfig(BaseConfig):
    threshold: float = 0.05  # t: Delta = t * max|w|
    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self):
        if not 0.0 < self.threshold < 1.0:
            raise ConfigError(f"threshold must be in (0, 1), got {self.threshold}")

    @property
    def scheme(self) -> str:
        return "ttq-ternary"


def prepare_ternary(model: nn.Module, config: TTQConfig, calibration_data=None) -> nn.Module:
    prepare_layers(model, config, calibration_data, lambda n, m, b: TernaryLayer(m, config.threshold, n))
    return model


@register_handler(TTQConfig)
def _ttq(model: nn.Module, config: TTQConfig, calibration_data=None):
    if not is_prepared(model):
        x, y = builtin_training_data(model)
        prepare_ternary(model, config, calibration_data)
        model.lowbit_qat["extra"] = {"train_loss": train_qat(model, x, y, config.epochs, config.lr, config.batch_size,
                                                             config.seed)}
    return convert_qat(model, "auto")


@register_scheme("ttq", "Trained Ternary Quantization: weights {-Wn, 0, +Wp} (first/last layer float), trained with "
                 "QAT on the built-in data", options=(), models=("digits",))
def _scheme(options: dict) -> TTQConfig:
    return TTQConfig()
