"""Quantized linear layers.

- :class:`DynamicQLinear` (W8A8 dynamic): int8 weights per output channel, activations quantized
  per token at run time, int8 x int8 -> int32 products (``lowbit.kernels.int8_dynamic``).
- :class:`WeightOnlyQLinear`: b-bit weights (uniform int2/3/4/8 or a codebook such as NF4) per
  channel or per group, stored truly packed; activations stay float.
"""

from __future__ import annotations

import math

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
from lowbit.errors import ConfigError
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
        self._fn = self._resolve()  # now, not in the first forward: under torch.compile that would break the graph

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

    def _resolve(self):
        return kernels.KERNELS["int8_dynamic_linear"][kernels.resolve("int8_dynamic_linear", self.kernel)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fn is None:
            self._fn = self._resolve()
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

    ``group_size = 0`` means per output channel. When ``K`` is not a multiple of ``group_size`` the
    last group is shorter (SmolLM2's K = 576 at g128: four groups of 128 and one of 64); this is
    computed exactly as zero-padding ``W`` to a multiple of g, since a zero never changes a group's
    absmax nor its [min(x, 0), max(x, 0)] range. Persistent buffers: ``qweight`` (packed uint8 codes
    of the (N, K) weight), ``scale`` (fp16, (N,) or (N, ceil(K/g))), ``zero_point`` (int8/uint8,
    affine only). Fast kernels use a derived layout built on first use and never saved.

    ``float_zero_point=True`` (affine only) stores ``zero_point`` as fp16 instead: the grid
    ``s (q - z)`` may then sit at any offset, not only whole steps (HQQ's zero-points,
    ``lowbit.algorithms.hqq``). Dequantization and the int4 kernel (``W = (u - 8) s + m``) take it
    as is; the spec records the flag, so save/load rebuild the same buffer.

    ``input_scale=True`` adds a per-input-channel scale ``t`` (fp16, (K,)): the layer computes
    ``y = (t * x) @ dequant(codes)^T + b``, i.e. its weight is ``dequant(codes) diag(t)`` (SINQ's column scales,
    ``lowbit.algorithms.sinkhorn``). ``dequantized_weight`` includes ``t``; code that reads the codes directly
    (exporters, the fast decoder) must check ``input_scale``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, fmt: str = "int4",
                 group_size: int = 128, symmetric: bool = True, kernel: str = "auto", float_zero_point: bool = False,
                 input_scale: bool = False):
        super().__init__()
        f = get_format(fmt)
        self.in_features, self.out_features = in_features, out_features
        self.fmt, self.group_size, self.symmetric, self.kernel = f.name, group_size, symmetric, kernel
        n_groups = -(-in_features // group_size) if group_size else None  # ceil: a ragged last group
        pshape = (out_features,) if not group_size else (out_features, n_groups)
        self.register_buffer("qweight", torch.zeros(packed_nbytes(in_features * out_features, f.storage_bits),
                                                    dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(pshape, dtype=torch.float16))
        affine = not symmetric and f.kind is Kind.UNIFORM
        if float_zero_point and not affine:
            raise ConfigError("float_zero_point needs an affine uniform format (symmetric=False)")
        zp_dtype = torch.float16 if float_zero_point else (torch.int8 if f.signed else torch.uint8)
        self.register_buffer("zero_point", torch.zeros(pshape, dtype=zp_dtype) if affine else None)
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self.register_buffer("input_scale", torch.ones(in_features, dtype=torch.float16) if input_scale else None)
        self._fast = None  # kernel-layout tensors, built on first use (not saved)
        self._choice = None

    # ---- construction -------------------------------------------------------------------------
    @property
    def granularity(self):
        return per_group(self.group_size) if self.group_size else per_channel(0)

    @property
    def padded_in_features(self) -> int:
        """K rounded up to a whole number of groups (the shape the group math runs on)."""
        g = self.group_size
        return -(-self.in_features // g) * g if g else self.in_features

    def qparams(self) -> QParams:
        f = get_format(self.fmt)
        scale = self.scale.float()
        if f.kind is Kind.UNIFORM:
            qmax = f.qmax
            qmin = f.qmin if (not self.symmetric or f.name == "ternary") else -qmax
            zp = None
            if self.zero_point is not None:
                zp = self.zero_point.float() if self.zero_point.is_floating_point() else self.zero_point.to(torch.int32)
            return QParams(f, self.granularity, scale, zp, qmin, qmax)
        cb = f.codebook_tensor() if f.kind is Kind.CODEBOOK else None
        return QParams(f, self.granularity, scale, codebook=cb)

    @classmethod
    def from_quantized(cls, linear: nn.Linear, codes: torch.Tensor, qp: QParams, group_size: int,
                       kernel: str = "auto", input_scale: torch.Tensor | None = None) -> "WeightOnlyQLinear":
        """Wrap codes (N, K) and qparams computed by any method (RTN, GPTQ, AWQ).

        ``qp.scale`` (and ``qp.zero_point``) have shape (N,) per channel or (N, ceil(K / group_size)); a
        floating-point ``qp.zero_point`` gives a ``float_zero_point`` module (stored in fp16). ``input_scale``
        (K,): the codes quantize ``W / input_scale`` (stored in fp16; see the class docstring).
        """
        float_zp = qp.zero_point is not None and qp.zero_point.is_floating_point()
        extra = {"float_zero_point": True} if float_zp else {}
        if input_scale is not None:
            if input_scale.shape != (linear.in_features,):
                raise ConfigError(f"input_scale must have shape ({linear.in_features},), got {tuple(input_scale.shape)}")
            extra["input_scale"] = True
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, qp.fmt.name, group_size,
                qp.zero_point is None, kernel, **extra)
        if input_scale is not None:
            m.input_scale.copy_(input_scale.detach().to(torch.float16))
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
        k = w.shape[1]
        gran = per_group(group_size) if group_size else per_channel(0)
        wp = F.pad(w, (0, (-k) % group_size)) if group_size else w  # (N, ceil(K/g) * g), zeros appended
        qp = choose_qparams(wp, name, symmetric, gran)
        qp.scale = qp.scale.to(torch.float16).float()
        return cls.from_quantized(linear, quantize(wp, qp)[:, :k], qp, group_size, kernel)

    def spec(self) -> dict:
        spec = {"class": type(self).__name__, "in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None, "fmt": self.fmt, "group_size": self.group_size,
                "symmetric": self.symmetric, "kernel": self.kernel}
        if self.zero_point is not None and self.zero_point.is_floating_point():
            spec["float_zero_point"] = True  # only when set: specs of integer zero-points are unchanged
        if self.input_scale is not None:
            spec["input_scale"] = True  # only when set, likewise
        return spec

    @classmethod
    def from_spec(cls, spec: dict) -> "WeightOnlyQLinear":
        return cls(**spec)

    # ---- compute ------------------------------------------------------------------------------
    def codes(self) -> torch.Tensor:
        f = get_format(self.fmt)
        signed = f.kind is Kind.UNIFORM and f.signed
        return unpack(self.qweight, f.storage_bits, (self.out_features, self.in_features), signed=signed)

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight (N, K) the codes represent (padded to whole groups, then cut back to K)."""
        codes = self.codes()
        pad = self.padded_in_features - self.in_features
        if pad:
            codes = F.pad(codes, (0, pad))  # (N, ceil(K/g) * g); the pad columns are discarded below
        w = dequantize(codes, self.qparams())[:, : self.in_features]
        return w if self.input_scale is None else w * self.input_scale.float()  # (N, K) * (K,): W diag(t)

    def _kernel_group(self) -> int:
        """The int4 kernel's group: the largest supported size dividing both K and our group size."""
        span = math.gcd(self.group_size, self.in_features) if self.group_size else self.in_features
        return next((g for g in reversed(weight_only.INT4_GROUP_SIZES) if span % g == 0), 0)

    def _fast_support(self) -> tuple[str | None, str]:
        """Which fast kernel applies to this layer, or why none does."""
        f = get_format(self.fmt)
        if f.kind is not Kind.UNIFORM:
            return None, f"{self.fmt} is a codebook format"
        if f.bits == 8:
            if not self.symmetric or self.group_size:
                return None, "int8 fast kernel needs symmetric per-channel weights"
            if self.in_features % weight_only.INT8_K_MULTIPLE:
                return None, f"int8 kernel needs in_features divisible by {weight_only.INT8_K_MULTIPLE}"
            return "int8_weight_only_linear", ""
        if self.out_features % weight_only.INT4_N_MULTIPLE:
            return None, f"int4 kernel needs out_features divisible by {weight_only.INT4_N_MULTIPLE}"
        if not self._kernel_group():
            return None, f"int4 kernel needs K and the group size divisible by one of {weight_only.INT4_GROUP_SIZES}"
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
        g = self._kernel_group()
        n_kernel_groups = self.in_features // g
        scale, zp = self.scale.float(), self.zero_point
        if not self.group_size:  # per channel: one scale for every kernel group of the row
            scale = scale[:, None]
            zp = None if zp is None else zp[:, None]
        # Each of our groups spans group_size / g kernel groups; the ragged tail is cut off.
        reps = (self.group_size // g) if self.group_size else n_kernel_groups
        scale = scale.repeat_interleave(reps, dim=1)[:, :n_kernel_groups]  # (N, K / g)
        zp = None if zp is None else zp.repeat_interleave(reps, dim=1)[:, :n_kernel_groups]
        self._fast = (*weight_only.int4_kernel_params(codes, scale, zp, g), g)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.release_kernel_layout()  # the kernel layout derives from the loaded codes

    def release_kernel_layout(self) -> None:
        """Drop the fast kernel's copy of the weights (rebuilt on the next forward). Sequential
        quantization calls this on each processed layer, so memory holds only the stored form."""
        self._choice = self._fast = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._choice is None:
            self._prepare()
        if self.input_scale is not None and self._op != "reference":  # the reference weight already holds t
            x = x * self.input_scale.to(x.dtype)
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
                f"{'sym' if self.symmetric else 'affine'}"
                f"{' (float zero-point)' if self.zero_point is not None and self.zero_point.is_floating_point() else ''}"
                f"{' (input scale)' if self.input_scale is not None else ''}"
                f", kernel={self.kernel}")


__all__ = ["DynamicQLinear", "WeightOnlyQLinear", "weight_format", "int8_dynamic"]
