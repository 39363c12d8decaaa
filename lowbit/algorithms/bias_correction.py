"""Bias correction (MISSION G.20): remove the mean shift quantization puts on each layer's output.

Quantizing weights shifts a layer's expected output by ``E[Q(W) x] - E[W x] = (Q(W) - W) E[x]``
(Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization and Bias Correction",
sec. 4.2). Per output channel:

- ``mode="empirical"``: ``bias += E[W x] - E[Q(W) x_hat]`` measured on calibration data, layer by
  layer in forward order, the fp32 model giving ``E[W x]`` and the quantized model (already
  corrected before this layer, activations quantized) giving ``E[Q(W) x_hat]``;
- ``mode="data-free"``: ``bias -= (Q(W) - W) E[x]`` with ``E[x]`` from the preceding BatchNorm:
  ``x = ReLU(z)``, ``z ~ N(beta, gamma^2)`` gives ``E[x] = beta Phi(beta/|gamma|) + |gamma| phi(beta/|gamma|)``
  (``E[x] = beta`` without the ReLU); average pooling keeps the mean, max pooling is approximated by
  it (a lower bound, logged). Layers with no BatchNorm before them are left uncorrected (reported).
  Calibration data is still used to find the layer order and, with ``act_bits``, activation ranges;
- ``mode="none"``: no correction: round-to-nearest with the same quantizers (the table's RTN row).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from lowbit.algorithms._learned import QuantLayer
from lowbit.algorithms._ptq import PTQBase, run_ptq
from lowbit.algorithms._recon import _run_until
from lowbit.api import register_handler
from lowbit.config import option_bool, register_config, register_scheme
from lowbit.errors import ConfigError

log = logging.getLogger(__name__)

MODES = ("empirical", "data-free", "none")
_PASS = (nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.Flatten, nn.Identity, nn.Dropout)


@register_config("bias-correction")
@dataclass(frozen=True)
class BiasCorrectionConfig(PTQBase):
    mode: str = "empirical"

    def __post_init__(self):
        super().__post_init__()
        if self.mode not in MODES:
            raise ConfigError(f"bias correction mode must be one of {MODES}, got {self.mode!r}")

    @property
    def scheme(self) -> str:
        name = {"empirical": "biascorr", "data-free": "biascorr-df", "none": "rtn"}[self.mode]
        a = f"a{self.act_bits}" if self.act_bits else ""
        return f"{name}-w{self.bits}{a}"


def _channel_mean(y: torch.Tensor, conv: bool) -> tuple[torch.Tensor, int]:
    """Sum over everything but the channel dim, and the count: (C,), n."""
    y = y.detach().float()
    if conv:
        return y.sum(dim=(0, 2, 3)), y.numel() // y.shape[1]
    y2 = y.reshape(-1, y.shape[-1])  # (M, N)
    return y2.sum(0), y2.shape[0]


def _ensure_bias(module: nn.Module) -> nn.Parameter:
    if module.bias is None:
        n = module.out_channels if isinstance(module, nn.Conv2d) else module.out_features
        module.bias = nn.Parameter(torch.zeros(n))
    return module.bias


def empirical_correction(model: nn.Module, fp: nn.Module, qlayers: dict[str, QuantLayer], batches: list,
                         order: list[str]) -> dict:
    """``bias += E[y_fp] - E[y_q]`` per layer, in forward order (the quantized model includes earlier fixes)."""
    shifts = {}
    for name, q in qlayers.items():
        conv = isinstance(q.module, nn.Conv2d)
        s_fp, s_q, n = 0.0, 0.0, 0
        for b in batches:
            sf, k = _channel_mean(_run_until(fp, name, b, inputs=False), conv)
            sq, _ = _channel_mean(_run_until(model, name, b, inputs=False), conv)
            s_fp, s_q, n = s_fp + sf, s_q + sq, n + k
        delta = (s_fp - s_q) / n
        with torch.no_grad():
            _ensure_bias(q.module).add_(delta)
        shifts[name] = float(delta.abs().mean())
        log.debug("bias correction %s: mean |shift| %.3g", name, shifts[name])
    return {"bias_shift_mean_abs": shifts}


def expected_input(fp: nn.Module, name: str, order: list[str]) -> tuple[torch.Tensor | None, str]:
    """Per input channel ``E[x]`` of layer ``name`` from the BatchNorm before it, or (None, why)."""
    relu, notes = False, []
    i = order.index(name) - 1
    while i >= 0:
        m = fp.get_submodule(order[i])
        if isinstance(m, nn.ReLU):
            relu = True
        elif isinstance(m, nn.MaxPool2d):
            notes.append("max pooling approximated by the mean")
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            if not m.affine:
                return None, "BatchNorm without affine parameters"
            mu, sigma = m.bias.detach().float(), m.weight.detach().float().abs().clamp_min(1e-8)
            if not relu:
                return mu, "; ".join(notes)
            t = mu / sigma
            phi = torch.exp(-0.5 * t * t) / math.sqrt(2 * math.pi)
            cdf = 0.5 * (1 + torch.erf(t / math.sqrt(2)))
            return mu * cdf + sigma * phi, "; ".join(notes)
        elif not isinstance(m, _PASS):
            return None, f"{type(m).__name__} {order[i]!r} between the layer and a BatchNorm"
        i -= 1
    return None, "no BatchNorm before this layer"


def data_free_correction(model: nn.Module, fp: nn.Module, qlayers: dict[str, QuantLayer], batches: list,
                         order: list[str]) -> dict:
    """``bias -= (Q(W) - W) E[x]`` with ``E[x]`` from BatchNorm statistics (no data)."""
    corrected, uncorrected = {}, {}
    for name, q in qlayers.items():
        ex, why = expected_input(fp, name, order)
        w = q.module.weight.detach()
        eps = q.quantized_weight().detach() - w  # (O, C, kh, kw) or (N, K)
        if ex is None or eps.shape[1] != ex.numel():
            uncorrected[name] = why if ex is None else f"input features {eps.shape[1]} != BatchNorm channels {ex.numel()}"
            continue
        shift = eps.reshape(eps.shape[0], eps.shape[1], -1).sum(-1) @ ex  # (O,)
        with torch.no_grad():
            _ensure_bias(q.module).sub_(shift)
        corrected[name] = float(shift.abs().mean())
        if why:
            log.info("data-free bias correction %s: %s", name, why)
    if not corrected:
        log.warning("data-free bias correction corrected no layer: %s", uncorrected)
    return {"bias_shift_mean_abs": corrected, "uncorrected": uncorrected}


@register_handler(BiasCorrectionConfig)
def _bias_correction(model: nn.Module, config: BiasCorrectionConfig, calibration_data=None):
    fn = {"empirical": empirical_correction, "data-free": data_free_correction, "none": None}[config.mode]
    return run_ptq(model, config, calibration_data, fn)


def scheme_builder(cls, act_bits: int | None, **fixed):
    """A CLI scheme builder: ``--bits`` (and ``--group-size`` / ``--symmetric`` weight-only) into ``cls``."""

    def build(options: dict):
        kw = dict(bits=int(options.get("bits", 4)), act_bits=act_bits, **fixed)
        if "group_size" in options:
            kw["group_size"] = int(options["group_size"])
        if "symmetric" in options:
            kw["symmetric"] = option_bool(options["symmetric"])
        if "kernel" in options:
            kw["kernel"] = options["kernel"]
        return cls(**kw)

    return build


for _suffix, _a in (("", None), ("-a8", 8), ("-a4", 4)):
    _what = "weight-only" if _a is None else f"{_a}-bit static activations"
    register_scheme(f"bias-correction{_suffix}", f"round-to-nearest + empirical bias correction, {_what}; "
                    "first/last layer 8-bit", options=("bits", "group_size", "symmetric", "kernel"))(
        scheme_builder(BiasCorrectionConfig, _a))
