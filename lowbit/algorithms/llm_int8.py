"""LLM.int8() (Dettmers et al. 2022): int8 weights per row, int8 activations per token, and the
outlier feature dimensions (``|x| >= threshold``, found per forward) multiplied in float
(``lowbit.nn.mixed_linear.MixedInt8Linear``). No calibration needed. Decoder / encoder linears
only; the LM head stays float.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lowbit.algorithms._swap import Skip, swap_modules
from lowbit.api import register_handler
from lowbit.config import BaseConfig, register_config, register_scheme
from lowbit.errors import ConfigError
from lowbit.nn.mixed_linear import DEFAULT_THRESHOLD, MixedInt8Linear


@register_config("llm-int8")
@dataclass(frozen=True)
class LLMInt8Config(BaseConfig):
    threshold: float = DEFAULT_THRESHOLD
    kernel: str = "auto"

    def __post_init__(self):
        if not self.threshold > 0:
            raise ConfigError(f"threshold must be > 0, got {self.threshold}")

    @property
    def scheme(self) -> str:
        return f"llm-int8-t{self.threshold:g}"


@register_handler(LLMInt8Config)
def _quantize_llm_int8(model: nn.Module, config: LLMInt8Config, calibration_data=None):
    def convert(name: str, m: nn.Linear):
        if name.endswith("lm_head"):
            raise Skip("LM head kept in float")
        return MixedInt8Linear.from_float(m, config.threshold, config.kernel)

    return swap_modules(model, config, (nn.Linear,), convert)


@register_scheme("llm-int8", "LLM.int8(): int8 x int8 with outlier feature columns (|x| >= 6) in float",
                 options=("kernel",))
def _scheme(options: dict) -> LLMInt8Config:
    return LLMInt8Config(kernel=options.get("kernel", "auto"))
