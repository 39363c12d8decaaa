"""Validation and naming shared by the weight-only methods that take bits / group_size / fmt (GPTQ, AWQ)."""

from __future__ import annotations

from lowbit.errors import ConfigError

VALID_BITS = (2, 3, 4, 8)


def check_weight_fields(bits: int, group_size: int, fmt: str | None, double_quant: bool) -> None:
    """Raise ConfigError for bits outside VALID_BITS, a negative group size, or double quant without groups."""
    if fmt is None and bits not in VALID_BITS:
        raise ConfigError(f"bits must be one of {VALID_BITS}, got {bits}")
    if group_size < 0:
        raise ConfigError(f"group_size must be >= 0 (0 = per channel), got {group_size}")
    if double_quant and not group_size:
        raise ConfigError("double_quant quantizes group scales: it needs group_size > 0")


def weight_scheme_name(method: str, bits: int, group_size: int, symmetric: bool, fmt: str | None,
                       double_quant: bool) -> str:
    """``<method>-<w{bits}|fmt>-<g{size}|pc>[-sym|-asym][-dq]``, e.g. ``gptq-w4-g128-sym``."""
    gran = f"g{group_size}" if group_size else "pc"
    body = fmt if fmt else f"w{bits}"
    sym = "" if fmt else ("-sym" if symmetric else "-asym")
    return f"{method}-{body}-{gran}{sym}{'-dq' if double_quant else ''}"
