"""lowbit.core: pure tensor math for quantization (no nn.Module, no torch.ao).

Formats (:mod:`formats`), granularity (:mod:`granularity`), ``choose_qparams`` / ``quantize`` /
``dequantize`` / ``fake_quantize`` (:mod:`quant`), k-means codebooks (:mod:`codebook`),
``pack`` / ``unpack`` (:mod:`pack`), error metrics (:mod:`metrics`) and the size accountant (:mod:`size`).
"""

from lowbit.core.codebook import fit_codebook, kmeans_format
from lowbit.core.formats import FORMATS, Format, Kind, get_format, int_format
from lowbit.core.granularity import (
    Granularity,
    PerChannel,
    PerGroup,
    PerTensor,
    granularity_from_json,
    n_pairs,
    param_shape,
    per_channel,
    per_group,
    per_tensor,
)
from lowbit.core.metrics import cosine, error_split, max_abs, mse, sqnr_db
from lowbit.core.pack import pack, packed_nbytes, unpack
from lowbit.core.quant import (
    QParams,
    choose_qparams,
    dequantize,
    fake_quantize,
    qparams_from_range,
    quantize,
    representable_range,
)
from lowbit.core.size import SizeReport, size_of

__all__ = [
    "FORMATS", "Format", "Kind", "get_format", "int_format",
    "Granularity", "PerTensor", "PerChannel", "PerGroup", "per_tensor", "per_channel", "per_group",
    "granularity_from_json", "param_shape", "n_pairs",
    "QParams", "choose_qparams", "qparams_from_range", "quantize", "dequantize", "fake_quantize",
    "representable_range", "fit_codebook", "kmeans_format",
    "pack", "unpack", "packed_nbytes",
    "mse", "sqnr_db", "cosine", "max_abs", "error_split",
    "SizeReport", "size_of",
]
