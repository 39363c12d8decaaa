"""W8A8 dynamic PTQ (MISSION B.7): int8 weights ahead of time, int8 activations per token at run time.

Better than the seed FAQ's ``torch.quantization.quantize_dynamic`` recipe on three counts: weights
are per output channel (not per tensor), activations per token (not per tensor), and the
embedding tables are stored int8 too (``QEmbedding``), so the model really shrinks ~4x.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lowbit.algorithms._swap import swap_modules
from lowbit.api import register_handler
from lowbit.config import BaseConfig, register_config, register_scheme
from lowbit.nn import DynamicQLinear, QEmbedding


@register_config("w8a8-dynamic")
@dataclass(frozen=True)
class Int8DynamicConfig(BaseConfig):
    quantize_embeddings: bool = True  # word/position embedding tables int8 per row
    kernel: str = "auto"  # auto | fast (torch._int_mm) | reference

    @property
    def scheme(self) -> str:
        return "w8a8-dynamic"


@register_handler(Int8DynamicConfig)
def _quantize_dynamic(model: nn.Module, config: Int8DynamicConfig, calibration_data=None):
    report = swap_modules(model, config, (nn.Linear,), lambda n, m: DynamicQLinear.from_float(m, config.kernel))
    if config.quantize_embeddings:
        swap_modules(model, config, (nn.Embedding,), lambda n, m: QEmbedding.from_float(m), report)
    return report


@register_scheme("w8a8-dynamic", "int8 weights per channel + int8 activations per token (torch._int_mm); "
                 "int8 embeddings", options=("kernel",))
def _scheme(options: dict) -> Int8DynamicConfig:
    return Int8DynamicConfig(kernel=options.get("kernel", "auto"))
