"""Quantized linear layers.

- :class:`DynamicQLinear` (W8A8 dynamic): int8 weights per output channel, activations quantized
  per token at run time, int8 x int8 -> int32 products (``lowbit.kernels.int8_dynamic``).
- :class:`WeightOnlyQLinear`: b-bit weights (uniform int2/3/4/8 or a codebook such as NF4) per
  channel or per group, stored truly packed; activations stay float.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit import kernels
from lowbit.core import (
    Kind,
    QParams,
    choose_qparams,
    dequantize,
    get_format,
    pack,
    packed_nbytes,
    per_channel,
    per_group,
    quantize,
    unpack,
)
from lowbit.kernels import int8_dynamic, weight_only
from lowbit.nn.base import register_qmodule


@register_qmodule
class DynamicQLinear(nn.Module):
    """``y = (Q(x / s) @ Q(W * s)^T) * s_x * s_W + b`` with per-token ``s_x``, per-channel ``s_W`` and
    optional SmoothQuant factors ``s`` (stored as ``smooth_inv = 1 / s``)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, kernel: str = "auto",
                 smooth: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.kernel = in_features, out_features, kernel
        self.register_buffer("qweight_t", torch.zeros(in_features, out_features, dtype=torch.int8))  # (K, N)
        self.register_buffer("w_scale", torch.ones(out_features))  # (N,)
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self.register_buffer("smooth_inv", torch.ones(in_features) if smooth else None)  # (K,)
        self._fn = None

    @classmethod
    def from_float(cls, linear: nn.Linear, kernel: str = "auto", smooth: torch.Tensor | None = None) -> "DynamicQLinear":
        """Quantize ``linear``; with SmoothQuant factors ``smooth`` (K,) the weight becomes ``W * s``."""
        w = linear.weight.detach().float()
        if smooth is not None:
            w = w * smooth.float()
        qp = choose_qparams(w, "int8", symmetric=True, granularity=per_channel(0))
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, kernel, smooth is not None)
        m.qweight_t.copy_(quantize(w, qp).t())
        m.w_scale.copy_(qp.scale)
        if smooth is not None:
            m.smooth_inv.copy_(1.0 / smooth.float())
        if linear.bias is not None:
            m.bias.copy_(linear.bias.detach().float())
        return m

    def spec(self) -> dict:
        return {"class": type(self).__name__, "in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None, "kernel": self.kernel, "smooth": self.smooth_inv is not None}

    @classmethod
    def from_spec(cls, spec: dict) -> "DynamicQLinear":
        return cls(**spec)

    def dequantized_weight(self) -> torch.Tensor:
        """The effective float weight (N, K), smoothing undone."""
        w = self.qweight_t.t().float() * self.w_scale[:, None]
        return w if self.smooth_inv is None else w * self.smooth_inv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fn is None:
            choice = kernels.resolve("int8_dynamic_linear", self.kernel)
            self._fn = kernels.KERNELS["int8_dynamic_linear"][choice]
        return self._fn(x, self.qweight_t, self.w_scale, self.bias, self.smooth_inv)

    def extra_repr(self) -> str:
        smooth = ", smoothed" if self.smooth_inv is not None else ""
        return f"in={self.in_features}, out={self.out_features}, w8a8-dynamic{smooth}, kernel={self.kernel}"


def weight_format(bits: int, symmetric: bool, fmt: str | None = None) -> str:
    """The format name for a weight-only scheme: int{b} (symmetric), uint4/uint8 or int{b} (affine), or ``fmt``."""
    if fmt:
        return get_format(fmt).name
    if bits in (4, 8) and not symmetric:
        return f"uint{bits}"
    return get_format(f"int{bits}").name


@register_qmodule
class WeightOnlyQLinear(nn.Module):
    """``y = x @ dequant(W)^T + b`` with ``W`` stored packed at its format's bit width.

    ``group_size = 0`` means per output channel. Persistent buffers: ``qweight`` (packed uint8),
    ``scale`` (fp16, (N,) or (N, K/g)), ``zero_point`` (int8/uint8, affine only). Fast kernels use
    a derived layout built on first use and never saved.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, fmt: str = "int4",
                 group_size: int = 128, symmetric: bool = True, kernel: str = "auto"):
        super().__init__()
        f = get_format(fmt)
        self.in_features, self.out_features = in_features, out_features
        self.fmt, self.group_size, self.symmetric, self.kernel = f.name, group_size, symmetric, kernel
        n_groups = in_features // group_size if group_size else None
        pshape = (out_features,) if not group_size else (out_features, n_groups)
        self.register_buffer("qweight", torch.zeros(packed_nbytes(in_features * out_features, f.storage_bits),
                                                    dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(pshape, dtype=torch.float16))
        affine = not symmetric and f.kind is Kind.UNIFORM
        self.register_buffer("zero_point", torch.zeros(pshape, dtype=torch.int8 if f.signed else torch.uint8)
                             if affine else None)
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self._fast = None  # kernel-layout tensors, built on first use (not saved)
        self._choice = None

    # ---- construction -------------------------------------------------------------------------
    @property
    def granularity(self):
        return per_group(self.group_size) if self.group_size else per_channel(0)

    def qparams(self) -> QParams:
        f = get_format(self.fmt)
        scale = self.scale.float()
        if f.kind is Kind.UNIFORM:
            qmax = f.qmax
            qmin = f.qmin if (not self.symmetric or f.name == "ternary") else -qmax
            zp = self.zero_point.to(torch.int32) if self.zero_point is not None else None
            return QParams(f, self.granularity, scale, zp, qmin, qmax)
        cb = f.codebook_tensor() if f.kind is Kind.CODEBOOK else None
        return QParams(f, self.granularity, scale, codebook=cb)

    @classmethod
    def from_quantized(cls, linear: nn.Linear, codes: torch.Tensor, qp: QParams, group_size: int,
                       kernel: str = "auto") -> "WeightOnlyQLinear":
        """Wrap codes (N, K) and qparams computed by any method (RTN, GPTQ, AWQ)."""
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, qp.fmt.name, group_size,
                qp.zero_point is None, kernel)
        f = qp.fmt
        m.qweight.copy_(pack(codes, f.storage_bits, signed=codes.dtype == torch.int8))
        m.scale.copy_(qp.scale.reshape(m.scale.shape).to(torch.float16))
        if m.zero_point is not None:
            m.zero_point.copy_(qp.zero_point.reshape(m.zero_point.shape).to(m.zero_point.dtype))
        if linear.bias is not None:
            m.bias.copy_(linear.bias.detach().float())
        return m

    @classmethod
    def from_float(cls, linear: nn.Linear, bits: int = 4, group_size: int = 128, symmetric: bool = True,
                   fmt: str | None = None, kernel: str = "auto") -> "WeightOnlyQLinear":
        """Round-to-nearest. Scales are stored in fp16, so they are rounded to fp16 before the codes."""
        name = weight_format(bits, symmetric, fmt)
        w = linear.weight.detach().float()
        gran = per_group(group_size) if group_size else per_channel(0)
        qp = choose_qparams(w, name, symmetric, gran)
        qp.scale = qp.scale.to(torch.float16).float()
        return cls.from_quantized(linear, quantize(w, qp), qp, group_size, kernel)

    def spec(self) -> dict:
        return {"class": type(self).__name__, "in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None, "fmt": self.fmt, "group_size": self.group_size,
                "symmetric": self.symmetric, "kernel": self.kernel}

    @classmethod
    def from_spec(cls, spec: dict) -> "WeightOnlyQLinear":
        return cls(**spec)

    # ---- compute ------------------------------------------------------------------------------
    def codes(self) -> torch.Tensor:
        f = get_format(self.fmt)
        signed = f.kind is Kind.UNIFORM and f.signed
        return unpack(self.qweight, f.storage_bits, (self.out_features, self.in_features), signed=signed)

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize(self.codes(), self.qparams())

    def _fast_support(self) -> tuple[str | None, str]:
        """Which fast kernel applies to this layer, or why none does."""
        f = get_format(self.fmt)
        if f.kind is not Kind.UNIFORM:
            return None, f"{self.fmt} is a codebook format"
        if f.bits == 8:
            if self.symmetric and not self.group_size:
                return "int8_weight_only_linear", ""
            return None, "int8 fast kernel needs symmetric per-channel weights"
        g = self.group_size or next((g for g in reversed(weight_only.INT4_GROUP_SIZES)
                                     if self.in_features % g == 0), 0)
        if g not in weight_only.INT4_GROUP_SIZES or self.in_features % g:
            return None, f"int4 kernel needs group size in {weight_only.INT4_GROUP_SIZES}"
        return "int4_weight_only_linear", ""

    def _prepare(self) -> None:
        op, why = self._fast_support()
        self._choice = kernels.resolve(op or "int4_weight_only_linear", self.kernel, supported=op is not None,
                                       why_not=why)
        if self._choice == "reference":
            self._op = "reference"
            return
        self._op = op
        codes = self.codes()
        if op == "int8_weight_only_linear":
            self._fast = (codes.contiguous(), self.scale.to(torch.bfloat16))
            return
        g = self.group_size or next(g for g in reversed(weight_only.INT4_GROUP_SIZES) if self.in_features % g == 0)
        scale, zp = self.scale.float(), self.zero_point
        if not self.group_size:  # per channel: repeat the channel's scale over every kernel group
            reps = self.in_features // g
            scale = scale[:, None].expand(-1, reps)
            zp = None if zp is None else zp[:, None].expand(-1, reps)
        self._fast = (*weight_only.int4_kernel_params(codes, scale, zp, g), g)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._choice = self._fast = None  # the kernel layout derives from the loaded codes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._choice is None:
            self._prepare()
        if self._op == "int8_weight_only_linear":
            qw, s = self._fast
            return weight_only.int8_weight_only_linear(x, qw, s, self.bias)
        if self._op == "int4_weight_only_linear":
            packed, sz, g = self._fast
            return weight_only.int4_weight_only_linear(x, packed, sz, g, self.bias)
        return F.linear(x, self.dequantized_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        gran = f"g{self.group_size}" if self.group_size else "per-channel"
        return (f"in={self.in_features}, out={self.out_features}, {self.fmt} {gran} "
                f"{'sym' if self.symmetric else 'affine'}, kernel={self.kernel}")


__all__ = ["DynamicQLinear", "WeightOnlyQLinear", "weight_format", "int8_dynamic"]
