"""Weight-only round-to-nearest (MISSION A.3-4, B.7): int8 per channel, int4/int3/int2 per group,
symmetric or affine, or NF4; activations stay float.

``W_q = clamp(round(W / s) [+ zp])`` per channel (``group_size = 0``) or per group of
``group_size`` input columns; storage is truly packed (``WeightOnlyQLinear``).

``gguf="q4_0" | "q4_1" | "q8_0"`` rounds on llama.cpp's grid instead (blocks of 32 along the input,
ggml's reference rounding, see :mod:`lowbit.nn.gguf_linear`), so that ``lowbit export --format gguf``
writes the layer's codes and scales unchanged; ``bits`` / ``group_size`` / ``symmetric`` then follow
the type.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lowbit.algorithms._swap import Skip, quantized_embedding, swap_modules, tie_embedding_to_head
from lowbit.api import register_handler
from lowbit.config import BaseConfig, option_bool, register_config, register_scheme
from lowbit.core import get_format
from lowbit.errors import ConfigError
from lowbit.nn import WeightOnlyQLinear
from lowbit.nn.gguf_linear import GGML_BLOCK, GGML_TYPES, linear_on_ggml_grid

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
    gguf: str | None = None  # "q4_0" | "q4_1" | "q8_0": ggml's grid and rounding (overrides the fields above)
    tie_embeddings: bool = False  # tied LM: the embedding looks its rows up in the quantized head (stored once)

    def __post_init__(self):
        if self.gguf is not None and self.gguf not in GGML_TYPES:
            raise ConfigError(f"gguf must be one of {', '.join(GGML_TYPES)}, got {self.gguf!r}")
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
        if self.gguf:
            return f"w{self.gguf[1]}-ggml-{self.gguf}"
        gran = f"g{self.group_size}" if self.group_size else "pc"
        if self.fmt:
            return f"{self.fmt}-{gran}"
        return f"w{self.bits}-{gran}-{'sym' if self.symmetric else 'asym'}"


@register_handler(WeightOnlyConfig)
def _quantize_weight_only(model: nn.Module, config: WeightOnlyConfig, calibration_data=None):
    def convert(name: str, m: nn.Linear):
        if config.gguf:
            if m.in_features % GGML_BLOCK:
                raise Skip(f"{config.gguf} needs in_features divisible by {GGML_BLOCK}, got {m.in_features}")
            return linear_on_ggml_grid(m, config.gguf, config.kernel)
        return WeightOnlyQLinear.from_float(m, config.bits, config.group_size, config.symmetric, config.fmt,
                                            config.kernel)

    report = swap_modules(model, config, (nn.Linear,), convert)
    if config.tie_embeddings:
        tied = tie_embedding_to_head(model)
        if tied:
            report.layers[tied] = model.get_submodule(tied).spec()
    if config.quantize_embeddings:
        swap_modules(model, config, (nn.Embedding,), quantized_embedding, report)
    return report


@register_scheme("rtn", "weight-only round-to-nearest: --bits {2,3,4,8} --group-size N (0 = per channel) "
                 "--symmetric/--affine; --gguf q4_0|q4_1|q8_0 rounds on llama.cpp's grid",
                 options=("bits", "group_size", "symmetric", "kernel", "gguf", "tie_embeddings"))
def _rtn(options: dict) -> WeightOnlyConfig:
    tie = option_bool(options.get("tie_embeddings", False))
    if options.get("gguf"):
        return WeightOnlyConfig(bits=8 if options["gguf"] == "q8_0" else 4, group_size=GGML_BLOCK,
                                symmetric=options["gguf"] != "q4_1", gguf=options["gguf"],
                                kernel=options.get("kernel", "auto"), tie_embeddings=tie)
    bits = int(options.get("bits", 4))
    default_group = 0 if bits == 8 else 128
    return WeightOnlyConfig(bits=bits, group_size=int(options.get("group_size", default_group)),
                            symmetric=option_bool(options.get("symmetric", True)), kernel=options.get("kernel", "auto"),
                            tie_embeddings=tie)


@register_scheme("nf4", "weight-only NormalFloat-4 codebook (QLoRA) per group: --group-size N",
                 options=("group_size", "kernel"))
def _nf4(options: dict) -> WeightOnlyConfig:
    return WeightOnlyConfig(bits=4, group_size=int(options.get("group_size", 64)), fmt="nf4",
                            kernel=options.get("kernel", "auto"))
