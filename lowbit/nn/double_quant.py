"""Double quantization of group scales (Dettmers et al. 2023, QLoRA sec. 3, "Double Quantization").

A weight-only layer with groups of ``g`` stores one scale per group: 16 bits / g per weight in fp16
(0.25 bit at g = 64). QLoRA quantizes those scales again. Here each block of ``DQ_BLOCK``
consecutive output rows of one group column (all positive numbers) is stored as uint8 codes on an
affine grid spanning the block's own [min, max]:

    step = (max - min) / 255,   c = round((s - min) / step),   s' = min + c * step  (> 0)

so a scale costs 8 bits plus 2 x 32 bits per ``DQ_BLOCK`` scales: 0.14 bit per weight at g = 64.
(QLoRA uses FP8 codes around the mean in blocks of 256; blocks of rows keep every group column of a
layer independent, which GPTQ needs because it fixes one group column at a time.)

:class:`DoubleQuantQLinear` is a :class:`WeightOnlyQLinear` whose ``scale`` is rebuilt from these
codes; everything else (packed codes, NF4 or intN, kernels, save/load) is inherited.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.core import QParams, packed_nbytes
from lowbit.core import get_format
from lowbit.core.formats import Kind
from lowbit.errors import ConfigError
from lowbit.nn.base import register_qmodule
from lowbit.nn.qlinear import WeightOnlyQLinear

DQ_BLOCK = 64  # scales per second-level (min, step) pair
DQ_LEVELS = 255


def dq_block_for(n_rows: int) -> int:
    """The block length used for ``n_rows`` scales: DQ_BLOCK if it divides, else the largest divisor <= it."""
    for b in range(min(DQ_BLOCK, n_rows), 0, -1):
        if n_rows % b == 0:
            return b
    return 1


def double_quantize(scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scales (N,) or (N, G) -> (uint8 codes like ``scale``, min (N/b, ...), step (N/b, ...))."""
    s = scale.float()
    col = s.dim() == 1
    s = s[:, None] if col else s  # (N, G)
    n, g = s.shape
    b = dq_block_for(n)
    blocks = s.reshape(n // b, b, g)  # (N/b, b, G)
    lo = blocks.amin(dim=1)  # (N/b, G)
    step = ((blocks.amax(dim=1) - lo) / DQ_LEVELS).clamp_min(torch.finfo(torch.float32).tiny)
    codes = torch.round((blocks - lo[:, None]) / step[:, None]).clamp(0, DQ_LEVELS).to(torch.uint8)
    codes = codes.reshape(n, g)
    return (codes[:, 0] if col else codes), (lo[:, 0] if col else lo), (step[:, 0] if col else step)


def double_dequantize(codes: torch.Tensor, lo: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`double_quantize`: ``min + c * step`` per block."""
    col = codes.dim() == 1
    c = codes[:, None] if col else codes
    lo2, st2 = (lo[:, None], step[:, None]) if col else (lo, step)
    n, g = c.shape
    b = n // lo2.shape[0]
    s = lo2[:, None] + c.reshape(n // b, b, g).float() * st2[:, None]  # (N/b, b, G)
    s = s.reshape(n, g)
    return s[:, 0] if col else s


def double_quant_roundtrip(scale: torch.Tensor) -> torch.Tensor:
    """The scales a :class:`DoubleQuantQLinear` will really use (quantize, then dequantize)."""
    return double_dequantize(*double_quantize(scale))


@register_qmodule
class DoubleQuantQLinear(WeightOnlyQLinear):
    """Weight-only linear whose group scales are stored double-quantized (uint8 + per-block min/step).

    Buffers: ``qweight`` (packed codes), ``scale_codes`` uint8 (N, G), ``scale_min`` / ``scale_step``
    fp32 (N/b, G), ``zero_point`` (affine intN only), ``bias``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, fmt: str = "nf4",
                 group_size: int = 64, symmetric: bool = True, kernel: str = "auto"):
        nn.Module.__init__(self)
        if group_size <= 0 or in_features % group_size:
            raise ConfigError(f"double quantization needs a group size dividing in_features={in_features}, "
                              f"got {group_size}")
        f = get_format(fmt)
        self.in_features, self.out_features = in_features, out_features
        self.fmt, self.group_size, self.symmetric, self.kernel = f.name, group_size, symmetric, kernel
        n_groups = in_features // group_size
        b = dq_block_for(out_features)
        self.register_buffer("qweight", torch.zeros(packed_nbytes(in_features * out_features, f.storage_bits),
                                                    dtype=torch.uint8))
        self.register_buffer("scale_codes", torch.zeros(out_features, n_groups, dtype=torch.uint8))
        self.register_buffer("scale_min", torch.zeros(out_features // b, n_groups))
        self.register_buffer("scale_step", torch.zeros(out_features // b, n_groups))
        affine = not symmetric and f.kind is Kind.UNIFORM
        self.register_buffer("zero_point", torch.zeros(out_features, n_groups, dtype=torch.int8 if f.signed else torch.uint8)
                             if affine else None)
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self.register_buffer("input_scale", None)  # WeightOnlyQLinear's per-input-channel scale: never set here
        self._fast = None
        self._choice = None

    @property
    def scale(self) -> torch.Tensor:
        """The group scales (N, G), rebuilt from their 8-bit codes."""
        return double_dequantize(self.scale_codes, self.scale_min, self.scale_step)

    @classmethod
    def from_quantized(cls, linear: nn.Linear, codes: torch.Tensor, qp: QParams, group_size: int,
                       kernel: str = "auto") -> "DoubleQuantQLinear":
        """Wrap codes (N, K) with scales that are already on the double-quant grid (or are put on it)."""
        from lowbit.core import pack

        m = cls(linear.in_features, linear.out_features, linear.bias is not None, qp.fmt.name, group_size,
                qp.zero_point is None, kernel)
        m.qweight.copy_(pack(codes, qp.fmt.storage_bits, signed=codes.dtype == torch.int8))
        c, lo, step = double_quantize(qp.scale.reshape(m.scale_codes.shape))
        m.scale_codes.copy_(c)
        m.scale_min.copy_(lo)
        m.scale_step.copy_(step)
        if m.zero_point is not None:
            m.zero_point.copy_(qp.zero_point.reshape(m.zero_point.shape).to(m.zero_point.dtype))
        if linear.bias is not None:
            m.bias.copy_(linear.bias.detach().float())
        return m

    @classmethod
    def from_float(cls, linear: nn.Linear, bits: int = 4, group_size: int = 64, symmetric: bool = True,
                   fmt: str | None = "nf4", kernel: str = "auto") -> "DoubleQuantQLinear":
        """Round-to-nearest with double-quantized scales: scales go through the 8-bit grid before the codes."""
        from lowbit.core import choose_qparams, per_group, quantize
        from lowbit.nn.qlinear import weight_format

        w = linear.weight.detach().float()
        qp = choose_qparams(w, weight_format(bits, symmetric, fmt), symmetric, per_group(group_size))
        qp.scale = double_quant_roundtrip(qp.scale)
        return cls.from_quantized(linear, quantize(w, qp), qp, group_size, kernel)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", double-quantized scales"


__all__ = ["DoubleQuantQLinear", "double_quantize", "double_dequantize", "double_quant_roundtrip", "DQ_BLOCK"]
