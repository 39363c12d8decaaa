"""Quantization-aware training (MISSION C.11): prepare -> train -> convert through ``lowbit.quantize``.

``prepare_qat(model, QATConfig(...))`` swaps each Conv2d / Linear for a fake-quant layer (weights
and, with ``act_bits``, the input activation), calibrates the activation ranges, and leaves the
model trainable; ``train_qat`` (or any training loop) fine-tunes it; ``lowbit.quantize(model,
config)`` on a prepared model converts it to the same real modules PTQ produces (weight-only
linears: ``WeightOnlyQLinear``; with activations: ``StaticQLinear`` / ``StaticQConv2d``), holding
exactly the codes and scales the fake quantizers used. On an unprepared classifier with built-in
data (digits), ``lowbit.quantize`` runs all three steps.

Gradient estimators (``weight_quant`` / ``act_quant``):

- ``ste``: ``round`` passes the gradient straight through, zero outside the clipping range
  (Bengio et al. 2013; Jacob et al. 2018); weight scales follow ``absmax / qmax`` of the current
  weights, activation ranges stay as calibrated;
- ``lsq``: the step size ``s`` is learned, ``d x_hat / d s = round(x/s) - x/s`` inside the range and
  ``qmin`` / ``qmax`` outside, its gradient scaled by ``1 / sqrt(n * qmax)`` (Esser et al. 2020);
- ``pact`` (activations): ``y = clip(x, 0, alpha)`` with ``alpha`` learned, ``d y / d alpha = 1`` where
  ``x >= alpha`` (Choi et al. 2018), plus an L2 penalty on ``alpha`` (``pact_decay``).

A training step whose loss is NaN/inf stops training with a :class:`TrainingError` naming the
first layer whose output is not finite; the parameters are restored to the last finite step.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.algorithms._learned import QuantLayer
from lowbit.algorithms._ptq import (
    PTQBase,
    calibrate_acts,
    convert_layers,
    forward_order,
    plan_layers,
    resolve_batches,
    wrap_layers,
)
from lowbit.algorithms._recon import StepGuard, TrainingError
from lowbit.api import QuantizeReport, register_handler, select_modules, set_submodule
from lowbit.config import register_config, register_scheme
from lowbit.errors import ConfigError

log = logging.getLogger(__name__)

WEIGHT_ESTIMATORS = ("ste", "lsq")
ACT_ESTIMATORS = ("ste", "lsq", "pact")


@register_config("qat")
@dataclass(frozen=True)
class QATConfig(PTQBase):
    weight_quant: str = "lsq"  # ste | lsq
    act_quant: str = "lsq"  # ste | lsq | pact
    epochs: int = 8  # built-in training (classifiers)
    lr: float = 5e-4  # AdamW on weights; step sizes / PACT alpha use the same rate
    batch_size: int = 64
    pact_decay: float = 1e-4  # L2 on PACT's alpha
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        if self.weight_quant not in WEIGHT_ESTIMATORS:
            raise ConfigError(f"weight_quant must be one of {WEIGHT_ESTIMATORS}, got {self.weight_quant!r}")
        if self.act_quant not in ACT_ESTIMATORS:
            raise ConfigError(f"act_quant must be one of {ACT_ESTIMATORS}, got {self.act_quant!r}")
        if self.epochs < 0 or self.lr <= 0 or self.batch_size < 1:
            raise ConfigError(f"need epochs >= 0, lr > 0, batch_size >= 1; got {self.epochs}, {self.lr}, {self.batch_size}")

    @property
    def scheme(self) -> str:
        a = f"a{self.act_bits}" if self.act_bits else ""
        est = self.weight_quant if not self.act_bits else f"{self.weight_quant}-{self.act_quant}"
        return f"qat-{est}-w{self.bits}{a}"


def is_prepared(model: nn.Module) -> bool:
    return getattr(model, "lowbit_qat", None) is not None


def qat_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The fake-quant layers a prepared model holds, by name (anything with ``to_real`` or a QuantLayer)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLayer) or hasattr(m, "to_real")}


def prepare_qat(model: nn.Module, config: QATConfig, calibration_data=None) -> nn.Module:
    """Swap in fake-quant layers (in place), calibrate activation ranges; the model stays trainable."""
    if is_prepared(model):
        raise ConfigError("model is already prepared for QAT: train it, then lowbit.quantize(model, config)")
    batches, source = resolve_batches(model, calibration_data)
    model.eval()
    order = forward_order(model, batches[0])
    plan = plan_layers(model, config, order)
    scale_mode = "lsq" if config.weight_quant == "lsq" else "absmax"
    act_learn = {"ste": "none", "lsq": "lsq", "pact": "pact"}[config.act_quant]
    qlayers = wrap_layers(model, plan, config, "nearest", scale_mode, act_learn)
    calibrate_acts(model, qlayers, batches)
    model.lowbit_qat = {"config": config, "bits": {n: [w, a] for n, _, w, a in plan}, "calibration": source}
    log.info("prepared %d layers for QAT (%s)", len(qlayers), config.scheme)
    return model


def prepare_layers(model: nn.Module, config, calibration_data, wrap, edges: str = "float") -> dict[str, nn.Module]:
    """Wrap each selected Conv2d / Linear with ``wrap(name, module)``; the first and last layer stay
    float (``edges="float"``, as XNOR-Net and TTQ) or are wrapped too (``edges="wrap"``).

    ``wrap`` may return None to leave a layer alone. Returns the wrappers by name.
    """
    if is_prepared(model):
        raise ConfigError("model is already prepared for QAT: train it, then lowbit.quantize(model, config)")
    batches, source = resolve_batches(model, calibration_data)
    model.eval()
    order = forward_order(model, batches[0])
    found = [(n, m) for n, m in select_modules(model, (nn.Conv2d, nn.Linear), config.include, config.exclude)
             if n in order]
    if not found:
        raise ConfigError(f"{config.scheme}: the model has no quantizable layer (Conv2d / Linear)")
    found.sort(key=lambda nm: order.index(nm[0]))
    kept = {}
    if edges == "float" and len(found) > 2:
        kept = {found[0][0]: "first layer kept in float (higher precision, as XNOR-Net / TTQ)",
                found[-1][0]: "last layer kept in float (higher precision, as XNOR-Net / TTQ)"}
        found = found[1:-1]
    wrapped = {}
    for n, m in found:
        w = wrap(n, m, batches)
        if w is not None:
            set_submodule(model, n, w)
            wrapped[n] = w
    model.lowbit_qat = {"config": config, "bits": {n: type(w).__name__ for n, w in wrapped.items()},
                        "calibration": source, "kept_float": kept}
    return wrapped


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    """Every trainable parameter: the float ones, the fake-quant layers' weights and biases, LSQ step
    sizes and PACT clips (fixed / absmax weight scales and unused activation parameters are frozen)."""
    for m in qat_layers(model).values():
        for p in m.parameters():
            p.requires_grad_(True)
        wq = getattr(m, "wq", None)
        if wq is not None and getattr(wq, "scale_mode", "lsq") != "lsq":
            wq.scale.requires_grad_(False)
        aq = getattr(m, "aq", None)
        if aq is not None:
            aq.scale.requires_grad_(aq.learn == "lsq")
            aq.alpha.requires_grad_(aq.learn == "pact")
    return [p for p in model.parameters() if p.requires_grad]


def train_qat(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 8, lr: float = 5e-4,
              batch_size: int = 64, seed: int = 0, pact_decay: float = 1e-4,
              loss_fn=F.cross_entropy) -> list[float]:
    """Fine-tune a prepared (or any) model on ``(x, y)`` with AdamW + cosine decay; returns mean loss per epoch.

    BatchNorm layers train (their statistics follow the quantized network). A NaN/inf loss raises
    :class:`TrainingError` naming the layer, with the parameters of the last finite step restored.
    """
    if len(x) != len(y) or len(x) == 0:
        raise ConfigError(f"training data: {len(x)} inputs for {len(y)} targets")
    params = _trainable(model)
    if not params:
        raise ConfigError("nothing to train: the model has no trainable parameters")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    steps = max(1, epochs * math.ceil(len(x) / batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    gen = torch.Generator().manual_seed(seed)
    alphas = [m.aq.alpha for m in qat_layers(model).values()
              if getattr(m, "aq", None) is not None and m.aq.learn == "pact"]
    guard = StepGuard(params)
    history = []
    model.train()
    try:
        for epoch in range(epochs):
            order = torch.randperm(len(x), generator=gen)
            total, n = 0.0, 0
            for i in range(0, len(x), batch_size):
                idx = order[i:i + batch_size]
                loss = loss_fn(model(x[idx]), y[idx])
                if alphas and pact_decay:
                    loss = loss + pact_decay * sum(a.pow(2) for a in alphas)
                guard.check(loss, model, lambda: model(x[idx]), f"QAT epoch {epoch} step {i // batch_size}")
                guard.mark_good()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total, n = total + float(loss.detach()) * len(idx), n + len(idx)
            history.append(total / n)
            log.info("QAT epoch %d: loss %.4f", epoch, history[-1])
    finally:
        model.eval()
    return history


def convert_qat(model: nn.Module, kernel: str = "auto") -> QuantizeReport:
    """Replace every fake-quant layer by its real module (exact codes and scales); returns the report."""
    if not is_prepared(model):
        raise ConfigError("model is not prepared for QAT: call prepare_qat(model, config) first")
    state = model.lowbit_qat
    layers = qat_layers(model)
    for p in model.parameters():
        p.requires_grad_(False)
    report = QuantizeReport(skipped=dict(state.get("kept_float", {})),
                            extra={"method": state["config"].kind, "bits": state["bits"], **state.get("extra", {})})
    convert_layers(model, layers, kernel, report)
    del model.lowbit_qat
    return report


def builtin_training_data(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    if getattr(model, "task", None) != "classifier":
        raise ConfigError(f"{type(model).__name__} has no built-in QAT training data: call prepare_qat(model, config), "
                          "train (train_qat or your loop), then lowbit.quantize(model, config) to convert")
    from lowbit.models.digits import digits_data

    x_train, y_train, _, _ = digits_data()
    return x_train, y_train


@register_handler(QATConfig)
def _qat(model: nn.Module, config: QATConfig, calibration_data=None):
    if not is_prepared(model):
        x, y = builtin_training_data(model)
        prepare_qat(model, config, calibration_data)
        model.lowbit_qat["extra"] = {"train_loss": train_qat(model, x, y, config.epochs, config.lr, config.batch_size,
                                                             config.seed, config.pact_decay)}
    return convert_qat(model, config.kernel)


def _scheme(act_bits, act_quant):
    def build(options: dict) -> QATConfig:
        kw = dict(bits=int(options.get("bits", 4)), act_bits=act_bits, act_quant=act_quant)
        if "kernel" in options:
            kw["kernel"] = options["kernel"]
        return QATConfig(**kw)

    return build


for _name, _a, _aq in (("qat-a8", 8, "lsq"), ("qat-a4", 4, "lsq"), ("qat-pact-a4", 4, "pact")):
    register_scheme(_name, f"QAT (LSQ weights, {_aq.upper()} {_a}-bit activations) trained on the built-in data "
                    "(digits), converted to static int modules", options=("bits", "kernel"), models=("digits",))(
        _scheme(_a, _aq))
