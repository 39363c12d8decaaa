"""The pipeline shared by the error-compensation PTQ methods (bias correction, AdaRound, BRECQ, QDrop).

1. take calibration batches (given, or the model's built-in set) and check they agree;
2. keep a frozen fp32 copy for targets; record the forward order of the leaf modules;
3. wrap each selected Conv2d / Linear in a :class:`~lowbit.algorithms._learned.QuantLayer`
   (first and last layer at ``first_last_bits``, as in AdaRound / BRECQ / QDrop);
4. calibrate the input activation quantizers (an observer from ``lowbit.observers``);
5. run the method (``compensate``): bias correction or reconstruction;
6. convert to the same real modules PTQ produces: ``WeightOnlyQLinear.from_quantized`` (weight-only
   linears) or ``StaticQLinear`` / ``StaticQConv2d`` (int8-held codes, integer products) when the
   activations are quantized. Codes and scales are exactly the fake quantizers' ones.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from lowbit.algorithms._calib import calibration_info, default_calibration, run_batches
from lowbit.algorithms._learned import ActQuantizer, QuantLayer, WeightQuantizer
from lowbit.algorithms._recon import execution_order, fp_copy
from lowbit.algorithms._swap import FLOAT_ONLY, Skip
from lowbit.api import QuantizeReport, select_modules, set_submodule
from lowbit.config import BaseConfig
from lowbit.errors import CalibrationError, ConfigError

log = logging.getLogger(__name__)

WEIGHT_BITS = (2, 3, 4, 8)
ACT_BITS = (2, 3, 4, 8)


@dataclass(frozen=True)
class PTQBase(BaseConfig):
    """Fields shared by the error-compensation configs (not registered itself)."""

    bits: int = 4  # weight bits
    act_bits: int | None = None  # input activation bits; None = weight-only (activations stay float)
    group_size: int = 0  # 0 = per output channel; > 0 = groups along the input dim (weight-only linears)
    symmetric: bool = True  # weights; the static int modules need symmetric weights
    first_last_bits: int | None = 8  # first and last quantized layer (None = same as ``bits``)
    observer: str = "mse"  # activation range observer (lowbit.observers)
    kernel: str = "auto"

    def __post_init__(self):
        if self.bits not in WEIGHT_BITS:
            raise ConfigError(f"bits must be one of {WEIGHT_BITS}, got {self.bits}")
        if self.act_bits is not None and self.act_bits not in ACT_BITS:
            raise ConfigError(f"act_bits must be one of {ACT_BITS} or None (weight-only), got {self.act_bits}")
        if self.first_last_bits is not None and self.first_last_bits not in WEIGHT_BITS:
            raise ConfigError(f"first_last_bits must be one of {WEIGHT_BITS} or None, got {self.first_last_bits}")
        if self.group_size < 0:
            raise ConfigError(f"group_size must be >= 0 (0 = per channel), got {self.group_size}")
        if self.act_bits is not None and (self.group_size or not self.symmetric):
            raise ConfigError("with quantized activations weights are symmetric per channel (the integer modules "
                              "store no weight zero-point): use group_size=0, symmetric=True")

    @property
    def scheme(self) -> str:
        a = f"a{self.act_bits}" if self.act_bits else ""
        g = f"-g{self.group_size}" if self.group_size else ""
        return f"{self.kind}-w{self.bits}{a}{g}"


# ------------------------------------------------------------------------------- steps

def check_batches(batches) -> list:
    """Calibration batches as a list; mixed kinds or shapes are a :class:`CalibrationError`."""
    batches = list(batches)
    if not batches:
        raise CalibrationError("calibration data is empty: give at least one batch")
    kinds = {type(b).__name__ for b in batches}
    if len(kinds) > 1:
        raise CalibrationError(f"calibration batches mix kinds ({', '.join(sorted(kinds))}): give one kind")
    if isinstance(batches[0], torch.Tensor):
        shapes = {tuple(b.shape[1:]) for b in batches}
        if len(shapes) > 1:
            raise CalibrationError(f"calibration batches disagree on the per-sample shape: {sorted(shapes)}; "
                                   "every batch must be (B, *same shape)")
        if any(b.shape[0] == 0 for b in batches):
            raise CalibrationError("a calibration batch is empty (batch dimension 0)")
    return batches


def resolve_batches(model: nn.Module, calibration_data) -> tuple[list, str]:
    if calibration_data is None:
        try:
            return check_batches(default_calibration(model)), f"lowbit.data default for {model.model_name}"
        except AttributeError:
            raise CalibrationError(f"{type(model).__name__} has no built-in calibration data; "
                                   "pass calibration_data") from None
    return check_batches(calibration_data), "user"


def forward_order(fp: nn.Module, batch) -> list[str]:
    try:
        return execution_order(fp, batch)
    except CalibrationError:
        raise
    except (RuntimeError, ValueError, TypeError) as exc:
        shape = tuple(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__
        raise CalibrationError(f"calibration batch {shape} does not fit the model: {exc}") from None


def plan_layers(model: nn.Module, config: PTQBase, order: list[str]) -> list[tuple[str, nn.Module, int, int | None]]:
    """(name, module, weight bits, act bits) for each selected Conv2d / Linear, in forward order."""
    found = [(n, m) for n, m in select_modules(model, (nn.Conv2d, nn.Linear), config.include, config.exclude)
             if n in order]
    if not found:
        raise ConfigError(f"{config.scheme}: the model has no quantizable layer (Conv2d / Linear reached by the "
                          f"forward pass and matching include={list(config.include)} exclude={list(config.exclude)})")
    found.sort(key=lambda nm: order.index(nm[0]))
    edge = {found[0][0], found[-1][0]} if config.first_last_bits and len(found) > 2 else set()
    plan = []
    for n, m in found:
        wbits = config.first_last_bits if n in edge else config.bits
        abits = None if config.act_bits is None else (max(config.act_bits, config.first_last_bits) if n in edge
                                                      else config.act_bits)
        plan.append((n, m, wbits, abits))
    return plan


def wrap_layers(model: nn.Module, plan, config: PTQBase, rounding: str = "nearest", scale_mode: str = "fixed",
                act_learn: str = "none", group_size: int | None = None) -> dict[str, QuantLayer]:
    """Swap each planned layer for a QuantLayer (in place); returns them by name."""
    out = {}
    for name, module, wbits, abits in plan:
        g = config.group_size if group_size is None else group_size
        if g and (not isinstance(module, nn.Linear) or module.in_features % g):
            g = 0  # convolutions and indivisible linears: per channel
        wq = WeightQuantizer(module.weight, wbits, config.symmetric, g, rounding, scale_mode)
        aq = ActQuantizer(abits, act_learn, config.observer, name) if abits else None
        q = QuantLayer(module, wq, aq, name)
        set_submodule(model, name, q)
        out[name] = q
    return out


def calibrate_acts(model: nn.Module, qlayers: dict[str, QuantLayer], batches: list) -> None:
    """One pass in observe mode (float activations, fake-quantized weights), then fix every range."""
    aqs = [q.aq for q in qlayers.values() if q.aq is not None]
    if not aqs:
        return
    for aq in aqs:
        aq.mode = "observe"
    run_batches(model, batches, "observing activations")
    for aq in aqs:
        aq.init_from_observer()


def to_real(q: QuantLayer, kernel: str = "auto") -> nn.Module:
    """The real quantized module holding ``q``'s exact codes and scales."""
    m, wq = q.module, q.wq
    codes, qp = wq.codes(m.weight), wq.qparams()
    if q.aq is None:
        if isinstance(m, nn.Linear):
            from lowbit.nn import WeightOnlyQLinear

            return WeightOnlyQLinear.from_quantized(m, codes, qp, wq.group_size, kernel)
        raise Skip("weight-only Conv2d: no packed convolution module; left in float")
    from lowbit.nn.static import StaticQConv2d, StaticQLinear

    aq = q.aq
    if isinstance(m, nn.Linear):
        real = StaticQLinear(m.in_features, m.out_features, m.bias is not None, aq.bits, False, True, False, kernel)
        real.qweight_t.copy_(codes.t())  # (N, K) -> (K, N)
    else:
        why = StaticQConv2d.unsupported(m)
        if why:
            raise Skip(why)
        real = StaticQConv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.bias is not None,
                             aq.bits, False, True, kernel)
        real.qweight_t.copy_(codes.reshape(codes.shape[0], -1).t())  # (O, C, kh, kw) -> (C*kh*kw, O)
    real.w_scale.copy_(qp.scale.reshape(-1))
    aqp = aq.qparams()
    real.act_scale.copy_(aqp.scale)
    real.act_zero_point.copy_(aqp.zero_point)
    if m.bias is not None:
        real.bias.copy_(m.bias.detach().float())
    return real


def convert_layers(model: nn.Module, qlayers: dict[str, QuantLayer], kernel: str, report: QuantizeReport) -> None:
    for name, q in qlayers.items():
        try:
            real = q.to_real(kernel) if hasattr(q, "to_real") else to_real(q, kernel)
        except Skip as why:
            set_submodule(model, name, q.module)
            report.skipped[name] = str(why)
            continue
        set_submodule(model, name, real)
        report.layers[name] = real.spec()
    for name, module in model.named_modules():
        for t, why in FLOAT_ONLY.items():
            if type(module) is t and name not in report.skipped and name not in report.layers:
                report.skipped[name] = why


Compensate = Callable[[nn.Module, nn.Module, dict, list, list], dict]


def run_ptq(model: nn.Module, config: PTQBase, calibration_data, compensate: Compensate | None, *,
            rounding: str = "nearest", act_learn: str = "none") -> QuantizeReport:
    """Steps 1-6 of the module docstring; ``compensate(model, fp, qlayers, batches, order) -> extra``."""
    batches, source = resolve_batches(model, calibration_data)
    model.eval()
    fp = fp_copy(model)
    order = forward_order(fp, batches[0])
    plan = plan_layers(model, config, order)
    qlayers = wrap_layers(model, plan, config, rounding, "fixed", act_learn)
    try:
        calibrate_acts(model, qlayers, batches)
        extra = compensate(model, fp, qlayers, batches, order) if compensate else {}
    except BaseException:
        for name, q in qlayers.items():  # leave the caller's model as it was
            set_submodule(model, name, q.module)
        raise
    report = QuantizeReport(extra={"method": config.kind, "bits": {n: [w, a] for n, _, w, a in plan}, **extra})
    convert_layers(model, qlayers, config.kernel, report)
    model.lowbit_calibration = calibration_info(batches, source)
    return report
