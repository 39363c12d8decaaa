"""Weight-only round-to-nearest (MISSION A.3-4, B.7): int8 per channel, int4/int3/int2 per group,
symmetric or affine, or NF4; activations stay float.

``W_q = clamp(round(W / s) [+ zp])`` per channel (``group_size = 0``) or per group of
``group_size`` input columns; storage is truly packed (``WeightOnlyQLinear``).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lowbit.algorithms._swap import swap_modules
from lowbit.api import register_handler
from lowbit.config import BaseConfig, option_bool, register_config, register_scheme
from lowbit.core import get_format
from lowbit.errors import ConfigError
from lowbit.nn import QEmbedding, WeightOnlyQLinear

from lowbit.algorithms._weights import VALID_BITS  # noqa: E402


@register_config("weight-only")
@dataclass(frozen=True)
class WeightOnlyConfig(BaseConfig):
    bits: int = 4
    group_size: int = 128  # 0 = per output channel
    symmetric: bool = True
    fmt: str | None = None  # a codebook format instead of intN, e.g. "nf4"
    quantize_embeddings: bool = False  # also store embedding tables int8 per row
    kernel: str = "auto"

    def __post_init__(self):
        if self.fmt is None and self.bits not in VALID_BITS:
            raise ConfigError(f"bits must be one of {VALID_BITS}, got {self.bits}")
        if self.group_size < 0:
            raise ConfigError(f"group_size must be >= 0 (0 = per channel), got {self.group_size}")
        if self.fmt is not None:
            f = get_format(self.fmt)
            if not self.symmetric and f.kind.value != "uniform":
                raise ConfigError(f"{self.fmt} is symmetric only")

    @property
    def scheme(self) -> str:
        gran = f"g{self.group_size}" if self.group_size else "pc"
        if self.fmt:
            return f"{self.fmt}-{gran}"
        return f"w{self.bits}-{gran}-{'sym' if self.symmetric else 'asym'}"


@register_handler(WeightOnlyConfig)
def _quantize_weight_only(model: nn.Module, config: WeightOnlyConfig, calibration_data=None):
    def convert(name: str, m: nn.Linear):
        return WeightOnlyQLinear.from_float(m, config.bits, config.group_size, config.symmetric, config.fmt,
                                            config.kernel)

    report = swap_modules(model, config, (nn.Linear,), convert)
    if config.quantize_embeddings:
        swap_modules(model, config, (nn.Embedding,), lambda n, m: QEmbedding.from_float(m), report)
    return report


@register_scheme("rtn", "weight-only round-to-nearest: --bits {2,3,4,8} --group-size N (0 = per channel) "
                 "--symmetric/--affine", options=("bits", "group_size", "symmetric", "kernel"))
def _rtn(options: dict) -> WeightOnlyConfig:
    bits = int(options.get("bits", 4))
    default_group = 0 if bits == 8 else 128
    return WeightOnlyConfig(bits=bits, group_size=int(options.get("group_size", default_group)),
                            symmetric=option_bool(options.get("symmetric", True)), kernel=options.get("kernel", "auto"))


@register_scheme("nf4", "weight-only NormalFloat-4 codebook (QLoRA) per group: --group-size N",
                 options=("group_size", "kernel"))
def _nf4(options: dict) -> WeightOnlyConfig:
    return WeightOnlyConfig(bits=4, group_size=int(options.get("group_size", 64)), fmt="nf4",
                            kernel=options.get("kernel", "auto"))
