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

    def summary(self, model: nn.Module | None = None) -> str:
        """One line: what was quantized, by kind, and what stayed in float, grouped by reason.

        e.g. ``36 linears and 3 embeddings quantized; 13 LayerNorms kept in float: normalisation is
        range-sensitive``. ``model`` (the quantized one) supplies the type names of skipped layers.
        """
        kinds: dict[str, int] = {}
        for spec in self.layers.values():
            cls = str(spec.get("class", "layer"))
            kind = "embedding" if "Embedding" in cls else "conv" if "Conv" in cls else "linear"
            kinds[kind] = kinds.get(kind, 0) + 1
        done = _join([_plural(n, k) for k, n in sorted(kinds.items(), key=lambda kv: -kv[1])]) or "nothing"
        groups: dict[tuple[str, str], int] = {}
        for name, why in self.skipped.items():
            tname = _type_name(model, name)
            key = (tname, _reason(why, tname))
            groups[key] = groups.get(key, 0) + 1
        kept = [f"{_plural(n, t)} kept in float" + (f": {why}" if why else "")
                for (t, why), n in sorted(groups.items(), key=lambda kv: -kv[1])]
        return "; ".join([f"{done} quantized", *kept])


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "es" if noun.endswith("s") else "s")


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1] if parts else ""


def _type_name(model: nn.Module | None, name: str) -> str:
    try:
        return type(model.get_submodule(name)).__name__ if model is not None else "layer"
    except AttributeError:
        return "layer"


def _reason(why: str, type_name: str) -> str:
    """The reason without the type name and 'kept in float' that per-layer reasons repeat."""
    r = why[len(type_name):].lstrip(": ") if why.startswith(type_name) else why
    r = r.replace("kept in float", "").strip(" ,;")
    if r.startswith("(") and r.endswith(")"):
        r = r[1:-1]
    return r.strip()


def select_modules(
    model: nn.Module,
    types: tuple[type, ...],
    include: Iterable[str] = ("*",),
    exclude: Iterable[str] = (),
) -> Iterator[tuple[str, nn.Module]]:
    """Named submodules of ``types`` whose name matches an include pattern and no exclude pattern."""
    include, exclude = tuple(include), tuple(exclude)
    for name, module in model.named_modules():
        if name and isinstance(module, types) and name_selected(name, include, exclude):
            yield name, module


def name_selected(name: str, include: Iterable[str], exclude: Iterable[str]) -> bool:
    """Whether a module name matches an include pattern (fnmatch) and no exclude pattern: a config's selection."""
    return (any(fnmatch.fnmatchcase(name, p) for p in include)
            and not any(fnmatch.fnmatchcase(name, p) for p in exclude))


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
        log.debug("left in float: %s (%s)", name, why)
    log.info("%s: %s", config.scheme, report.summary(model))
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
