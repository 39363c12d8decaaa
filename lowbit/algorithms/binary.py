"""Binary networks, XNOR-Net style (Rastegari et al. 2016; MISSION C.12), trained on the digits with QAT.

Every Conv2d / Linear except the first and the last (kept in float, as in XNOR-Net) becomes

    y = (sign(x - tau) (*) sign(W)) * beta * alpha + b,   alpha = mean|W| per output channel,
    beta = mean|x - tau| over the receptive field (XNOR-Net's K),

with ``tau`` a learned per-input-channel threshold (ReActNet's RSign, Liu et al. 2020): these
layers read post-ReLU activations, which ``sign`` alone would map to all +1. Gradients: the sign
passes them straight through where ``|.| <= 1`` (BinaryNet's hardtanh STE); alpha and beta are
differentiated exactly. Padding is +1 after binarisation (0 is not a binary value), matching the
inference kernel. ``lowbit.quantize(model, XnorConfig())`` prepares, trains (digits) and converts
to :class:`lowbit.nn.binary.XnorConv2d` / ``XnorLinear``, which run the XNOR-popcount kernel.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.algorithms._recon import _run_until
from lowbit.algorithms.qat import builtin_training_data, convert_qat, is_prepared, prepare_layers, train_qat
from lowbit.api import register_handler
from lowbit.config import BaseConfig, register_config, register_scheme
from lowbit.errors import ConfigError
from lowbit.nn.binary import XnorConv2d, XnorLinear

log = logging.getLogger(__name__)


class _SignSTE(torch.autograd.Function):
    """``+1 if x >= 0 else -1``; backward: the gradient where ``|x| <= 1``, else 0."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (x.abs() <= 1).to(g.dtype)


def sign_ste(x: torch.Tensor) -> torch.Tensor:
    return _SignSTE.apply(x)


class BinaryLayer(nn.Module):
    """The training (fake) form of an XNOR layer; :meth:`to_real` gives the packed inference module."""

    def __init__(self, module: nn.Module, tau: torch.Tensor, name: str = ""):
        super().__init__()
        if isinstance(module, nn.Conv2d) and XnorConv2d.unsupported(module):
            raise ConfigError(f"{name}: {XnorConv2d.unsupported(module)}")
        self.module, self.name = module, name
        self.tau = nn.Parameter(tau.detach().float().clone())  # (C,)

    def alpha(self) -> torch.Tensor:
        w = self.module.weight
        return w.abs().reshape(w.shape[0], -1).mean(1)  # (O,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        bias = m.bias
        if isinstance(m, nn.Conv2d):
            xs = x - self.tau.reshape(1, -1, 1, 1)  # (B, C, H, W)
            (ph, pw), (kh, kw) = m.padding, m.kernel_size
            beta = F.avg_pool2d(xs.abs().mean(1, keepdim=True), (kh, kw), m.stride, (ph, pw),
                                count_include_pad=True)  # (B, 1, Ho, Wo): mean |x - tau| per receptive field
            sx = F.pad(sign_ste(xs), (pw, pw, ph, ph), value=1.0)
            acc = F.conv2d(sx, sign_ste(m.weight), None, m.stride, 0)  # (B, O, Ho, Wo) integer-valued
            y = acc * beta * self.alpha().reshape(1, -1, 1, 1)
            return y if bias is None else y + bias.reshape(1, -1, 1, 1)
        xs = x - self.tau  # (..., K)
        beta = xs.abs().mean(-1, keepdim=True)
        y = F.linear(sign_ste(xs), sign_ste(m.weight)) * beta * self.alpha()
        return y if bias is None else y + bias

    def to_real(self, kernel: str = "auto") -> nn.Module:
        cls = XnorConv2d if isinstance(self.module, nn.Conv2d) else XnorLinear
        return cls.from_float(self.module, self.alpha().detach(), self.tau.detach(), kernel)


@register_config("xnor")
@dataclass(frozen=True)
class XnorConfig(BaseConfig):
    epochs: int = 20  # digits: 96.0% at lr 1e-3, 97.1% at 3e-3 (5 epochs: 92%)
    lr: float = 3e-3
    batch_size: int = 64
    seed: int = 0
    kernel: str = "auto"

    @property
    def scheme(self) -> str:
        return "xnor-binary"


def input_channel_means(model: nn.Module, name: str, batches: list, conv: bool) -> torch.Tensor:
    """Per input channel mean of what layer ``name`` reads: the initial threshold tau."""
    total, n = 0.0, 0
    for b in batches:
        args, _ = _run_until(model, name, b, inputs=True)
        x = args[0].float()
        if conv:
            total, n = total + x.sum(dim=(0, 2, 3)), n + x.numel() // x.shape[1]
        else:
            x2 = x.reshape(-1, x.shape[-1])
            total, n = total + x2.sum(0), n + x2.shape[0]
    return total / n


def prepare_binary(model: nn.Module, config: XnorConfig, calibration_data=None) -> nn.Module:
    def wrap(name, module, batches):
        tau = input_channel_means(model, name, batches, isinstance(module, nn.Conv2d))
        return BinaryLayer(module, tau, name)

    prepare_layers(model, config, calibration_data, wrap)
    return model


@register_handler(XnorConfig)
def _xnor(model: nn.Module, config: XnorConfig, calibration_data=None):
    if not is_prepared(model):
        x, y = builtin_training_data(model)
        prepare_binary(model, config, calibration_data)
        model.lowbit_qat["extra"] = {"train_loss": train_qat(model, x, y, config.epochs, config.lr, config.batch_size,
                                                             config.seed)}
    return convert_qat(model, config.kernel)


@register_scheme("xnor", "XNOR-Net binary weights + activations (first/last layer float), trained with QAT on the "
                 "built-in data; XNOR-popcount kernel", options=("kernel",), models=("digits",))
def _scheme(options: dict) -> XnorConfig:
    return XnorConfig(kernel=options.get("kernel", "auto"))
