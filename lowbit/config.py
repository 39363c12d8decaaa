"""Quantization configs: one frozen dataclass per scheme, JSON round-trip with a ``version`` field.

A CLI flag set, an HTTP payload and a saved model's ``metadata.json`` all hold the same object:
``config_to_json(cfg)`` gives ``{"version": 1, "kind": "<kind>", ...fields}`` and
``config_from_json`` rebuilds it. Config classes register themselves with :func:`register_config`
(algorithm modules may define their own). Every config carries ``include`` / ``exclude``: fnmatch
patterns over module names (``"bert.encoder.layer.*.attention.*"``) selecting which layers it
touches; ``exclude`` wins.

Named *schemes* (what ``lowbit quantize --scheme NAME`` accepts) map to builders that turn CLI-style
options into a config: see :func:`register_scheme` and :data:`SCHEMES`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable

from lowbit.errors import ConfigError

CONFIG_VERSION = 1

CONFIGS: dict[str, type] = {}


def register_config(kind: str):
    """Class decorator: make a config dataclass JSON-round-trippable under ``kind``."""

    def deco(cls):
        if kind in CONFIGS and CONFIGS[kind] is not cls:
            raise ConfigError(f"config kind {kind!r} registered twice")
        cls.kind = kind
        CONFIGS[kind] = cls
        return cls

    return deco


class Kernel(str, Enum):
    """Which implementation runs a quantized op; ``auto`` is resolved by ``lowbit.kernels.resolve``."""

    AUTO = "auto"
    REFERENCE = "reference"
    FAST = "fast"


@dataclass(frozen=True)
class BaseConfig:
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()

    kind = "base"

    @property
    def scheme(self) -> str:
        """A short human name for tables and metadata (overridden by configs with options)."""
        return self.kind


def _encode(v: Any) -> Any:
    if isinstance(v, Enum):
        return v.value
    if isinstance(v, tuple):
        return [_encode(x) for x in v]
    if isinstance(v, dict):
        return {k: _encode(x) for k, x in v.items()}
    if dataclasses.is_dataclass(v):
        return config_to_json(v)
    return v


def config_to_json(cfg: Any) -> dict:
    """``{"version", "kind", <fields>}`` for a registered config."""
    out = {"version": CONFIG_VERSION, "kind": type(cfg).kind}
    for f in dataclasses.fields(cfg):
        out[f.name] = _encode(getattr(cfg, f.name))
    return out


def config_from_json(d: dict | str) -> Any:
    """Rebuild a config from :func:`config_to_json` output; unknown kinds or fields are clear errors."""
    if isinstance(d, str):
        d = json.loads(d)
    if not isinstance(d, dict):
        raise ConfigError(f"a config must be a JSON object, got {type(d).__name__}")
    version = d.get("version")
    if version != CONFIG_VERSION:
        raise ConfigError(f"config version {version!r} not supported (this lowbit reads version {CONFIG_VERSION})")
    kind = d.get("kind")
    cls = CONFIGS.get(kind)
    if cls is None:
        _load_builtin_configs()
        cls = CONFIGS.get(kind)
    if cls is None:
        raise ConfigError(f"unknown config kind {kind!r}; known: {', '.join(sorted(CONFIGS))}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(d) - set(fields) - {"version", "kind"}
    if unknown:
        raise ConfigError(f"unknown field(s) for {kind}: {', '.join(sorted(unknown))}; valid: {', '.join(fields)}")
    kwargs = {}
    for name, value in d.items():
        if name in ("version", "kind"):
            continue
        if isinstance(value, list):
            value = tuple(value)
        if isinstance(value, dict) and "kind" in value and "version" in value:
            value = config_from_json(value)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid {kind} config: {exc}") from None


# --------------------------------------------------------------------------------------------
# Named schemes for the CLI and the service.


@dataclass(frozen=True)
class Scheme:
    name: str
    help: str
    build: Callable[[dict], Any]  # options (CLI flags that were given) -> config
    options: tuple[str, ...] = ()  # the option names this scheme accepts
    models: tuple[str, ...] = ()  # models it applies to; empty = all


SCHEMES: dict[str, Scheme] = {}


def register_scheme(name: str, help: str, options: tuple[str, ...] = (), models: tuple[str, ...] = ()):
    """Decorator for ``build(options) -> config``, registered as scheme ``name``."""

    def deco(fn):
        SCHEMES[name] = Scheme(name, help, fn, options, models)
        return fn

    return deco


def _load_builtin_configs() -> None:
    """Import the modules that register configs and schemes (algorithms are plugins of the registry)."""
    import lowbit.algorithms  # noqa: F401  (registers on import)


def build_config(scheme: str, options: dict | None = None) -> Any:
    """The config of scheme ``scheme`` with CLI-style ``options``; errors list the valid names."""
    _load_builtin_configs()
    options = {k: v for k, v in (options or {}).items() if v is not None}
    spec = SCHEMES.get(scheme)
    if spec is None:
        raise ConfigError(f"unknown scheme {scheme!r}; valid schemes: {', '.join(sorted(SCHEMES))}")
    extra = set(options) - set(spec.options)
    if extra:
        accepted = ", ".join(spec.options) or "none"
        raise ConfigError(f"scheme {scheme!r} does not take {', '.join(sorted(extra))}; it accepts: {accepted}")
    return spec.build(options)


def list_schemes() -> list[Scheme]:
    _load_builtin_configs()
    return [SCHEMES[k] for k in sorted(SCHEMES)]


def override(cfg, **changes):
    """A copy of a frozen config with some fields changed (validation re-runs)."""
    return dataclasses.replace(cfg, **changes)


def option_bool(v) -> bool:
    """A scheme option as a bool: bools from the CLI, strings ("1", "true", "yes") from JSON or HTTP."""
    return v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes")


__all__ = [
    "BaseConfig", "Kernel", "CONFIGS", "SCHEMES", "Scheme", "register_config", "register_scheme",
    "config_to_json", "config_from_json", "build_config", "list_schemes", "override", "field", "option_bool",
]
