"""The front door: ``lowbit.quantize(model, config, calibration_data=None)``.

A plain dict registry maps a config type to its handler, ``HANDLERS = {ConfigType: handler}``;
algorithm modules register with :func:`register_handler`. A handler swaps modules in place and
returns a :class:`QuantizeReport` listing what it did per layer, and what it left in float and why.
Module selection is by name with fnmatch patterns (``config.include`` / ``config.exclude``).
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from lowbit.config import _load_builtin_configs, config_to_json
from lowbit.errors import ConfigError

log = logging.getLogger(__name__)

HANDLERS: dict[type, Callable[..., "QuantizeReport"]] = {}


def register_handler(config_type: type):
    """Decorator: ``handler(model, config, calibration_data) -> QuantizeReport`` for ``config_type``."""

    def deco(fn):
        HANDLERS[config_type] = fn
        return fn

    return deco


@dataclass
class QuantizeReport:
    """What a handler did: per-layer choices (JSON-able) and the layers it left in float."""

    layers: dict[str, dict] = field(default_factory=dict)  # name -> module spec (see lowbit.nn)
    skipped: dict[str, str] = field(default_factory=dict)  # name -> reason it stayed in float
    extra: dict[str, Any] = field(default_factory=dict)  # method-specific results (timings, losses)


def select_modules(
    model: nn.Module,
    types: tuple[type, ...],
    include: Iterable[str] = ("*",),
    exclude: Iterable[str] = (),
) -> Iterator[tuple[str, nn.Module]]:
    """Named submodules of ``types`` whose name matches an include pattern and no exclude pattern."""
    include, exclude = tuple(include), tuple(exclude)
    for name, module in model.named_modules():
        if not name or not isinstance(module, types):
            continue
        if not any(fnmatch.fnmatchcase(name, p) for p in include):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in exclude):
            continue
        yield name, module


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted path ``name`` with ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _check_finite_weights(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        if p.is_floating_point() and not torch.isfinite(p).all():
            raise ConfigError(f"parameter {name!r} has NaN or inf values; refusing to quantize")


def quantize(model: nn.Module, config: Any, calibration_data: Iterable | None = None) -> nn.Module:
    """Quantize ``model`` in place according to ``config`` and return it.

    The model gets ``lowbit_config`` (the config), ``lowbit_scheme`` (its short name) and
    ``lowbit_report`` (a :class:`QuantizeReport`) attributes, which ``lowbit.save`` records.
    """
    _load_builtin_configs()
    handler = HANDLERS.get(type(config))
    if handler is None:
        known = ", ".join(sorted(t.__name__ for t in HANDLERS))
        raise ConfigError(f"no handler for {type(config).__name__}; known configs: {known}")
    if not isinstance(model, nn.Module):
        raise ConfigError(f"quantize expects an nn.Module, got {type(model).__name__}")
    _check_finite_weights(model)
    if not hasattr(model, "lowbit_fp32_numel"):
        model.lowbit_fp32_numel = sum(p.numel() for p in model.parameters())
    log.info("quantize: %s", config_to_json(config))
    report = handler(model, config, calibration_data)
    if not report.layers:
        raise ConfigError(
            f"{config.scheme}: no layer matched (include={list(config.include)}, exclude={list(config.exclude)}); "
            "nothing was quantized"
        )
    for name, why in report.skipped.items():
        log.info("left in float: %s (%s)", name, why)
    previous = getattr(model, "lowbit_report", None)
    if previous is not None:  # quantize twice (e.g. embeddings then linears): keep both records
        previous.layers.update(report.layers)
        previous.skipped.update(report.skipped)
        previous.extra.update(report.extra)
        report = previous
    model.lowbit_config = config
    model.lowbit_scheme = config.scheme
    model.lowbit_report = report
    return model


def is_quantized(model: nn.Module) -> bool:
    return getattr(model, "lowbit_report", None) is not None
