"""lowbit.nn: quantized modules (see :mod:`lowbit.nn.base` for what each provides)."""

from lowbit.nn.base import QMODULES, module_from_spec, register_qmodule
from lowbit.nn.qembedding import QEmbedding
from lowbit.nn.qlinear import DynamicQLinear, WeightOnlyQLinear, weight_format
from lowbit.nn.double_quant import DoubleQuantQLinear  # noqa: E402  (registers for lowbit.load)
from lowbit.nn.static import FoldedBatchNorm, StaticQConv2d, StaticQLinear  # noqa: E402  (registers for lowbit.load)
from lowbit.nn.wa_linear import WAQLinear  # noqa: E402
from lowbit.nn.mixed_linear import MixedInt8Linear  # noqa: E402
from lowbit.nn.binary import TernaryConv2d, TernaryLinear, XnorConv2d, XnorLinear  # noqa: E402  (registers for lowbit.load)

__all__ = ["QMODULES", "module_from_spec", "register_qmodule", "DynamicQLinear", "WeightOnlyQLinear",
           "QEmbedding", "weight_format", "DoubleQuantQLinear", "WAQLinear", "MixedInt8Linear"]
from lowbit.nn.gguf_linear import BlockMinQLinear, QTableEmbedding  # noqa: E402,F401  (registers for lowbit.load)
from lowbit.nn.hadamard import HadamardMLP, RotatedRMSNorm  # noqa: E402,F401  (registers for lowbit.load)
