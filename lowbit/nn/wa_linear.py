"""``WAQLinear``: weights and activations both quantized (the W8A8 / W4A8 / W4A4 / W2A8 presets).

Weights: b-bit codes per group of ``group_size`` input columns (or per channel), symmetric or
affine, stored packed like ``WeightOnlyQLinear`` and produced by any method (RTN, GPTQ). Activations:
a-bit symmetric per token at run time, after an optional SmoothQuant ``smooth_inv`` (1 / s), on a
grid of ``act_clip * max|x|`` per token (``act_clip`` < 1 clips the largest values; 1 = no clipping);
``act_per_group``: one grid per token and weight group instead of per token; ``act_symmetric=False``:
affine activation grids (zero-point corrected in int32, ``lowbit.kernels.wa_int``).
The product is integer (``lowbit.kernels.wa_int``): affine codes are centred first,
``q - zero_point``, which still fits int8 for b <= 7, so the accumulation stays exact.

Why not a ``DynamicQLinear`` option: that class stores unpacked int8 per-channel weights and does
one int32 product; b-bit packed, group-wise weights need a different buffer set and one product
per group, which would have changed its saved layout.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from lowbit import kernels
from lowbit.core import (QParams, choose_qparams, dequantize, get_format, pack, packed_nbytes, per_channel, per_group,
                         quantize, unpack)
from lowbit.errors import ConfigError
from lowbit.nn.base import register_qmodule

ACT_BITS = (4, 8)
WEIGHT_BITS = (2, 3, 4, 8)


@register_qmodule
class WAQLinear(nn.Module):
    """``y = s_x * sum_groups (Q_a(x / s) @ Q_b(W)^T) * s_W + b``; see the module docstring."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, weight_bits: int = 4,
                 group_size: int = 128, symmetric: bool = True, act_bits: int = 8, smooth: bool = False,
                 kernel: str = "auto", act_clip: float = 1.0, act_per_group: bool = False, act_symmetric: bool = True):
        super().__init__()
        if weight_bits not in WEIGHT_BITS or act_bits not in ACT_BITS:
            raise ConfigError(f"WAQLinear supports weight bits {WEIGHT_BITS} and activation bits {ACT_BITS}, "
                              f"got W{weight_bits}A{act_bits}")
        if weight_bits == 8 and not symmetric:
            raise ConfigError("8-bit weights must be symmetric for the int8 product (centred affine codes overflow)")
        if not 0 < act_clip <= 1:
            raise ConfigError(f"act_clip must be in (0, 1], got {act_clip}")
        if group_size and in_features % group_size:
            raise ConfigError(f"group_size {group_size} does not divide in_features {in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.weight_bits, self.group_size, self.symmetric = weight_bits, group_size, symmetric
        self.act_bits, self.kernel, self.act_clip = act_bits, kernel, float(act_clip)
        self.act_per_group, self.act_symmetric = bool(act_per_group), bool(act_symmetric)
        f = self.weight_format
        n_groups = in_features // group_size if group_size else 1
        self.register_buffer("qweight", torch.zeros(packed_nbytes(in_features * out_features, f.storage_bits),
                                                    dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(out_features, n_groups, dtype=torch.float16))
        self.register_buffer("zero_point", None if symmetric else torch.zeros(out_features, n_groups, dtype=torch.int8))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self.register_buffer("smooth_inv", torch.ones(in_features) if smooth else None)
        self._prepared = None

    @property
    def weight_format(self):
        return get_format(f"int{self.weight_bits}")

    @property
    def granularity(self):
        return per_group(self.group_size) if self.group_size else per_channel(0)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_quantized(cls, linear: nn.Linear, codes: torch.Tensor, qp: QParams, group_size: int, act_bits: int = 8,
                       smooth: torch.Tensor | None = None, kernel: str = "auto", act_clip: float = 1.0,
                       act_per_group: bool = False, act_symmetric: bool = True) -> "WAQLinear":
        """Wrap weight codes (N, K) of any method; ``smooth`` (K,) = SmoothQuant factors already in W. Unsigned
        affine codes (``uint4`` from GPTQ / RTN) move to the signed grid with their zero-point: ``q - 2^(b-1)``,
        ``z - 2^(b-1)``, the same ``q - z``."""
        bits = qp.fmt.bits
        if not qp.fmt.signed:
            if qp.zero_point is None:
                raise ConfigError(f"unsigned {qp.fmt.name} codes without a zero-point cannot be moved to WAQLinear's "
                                  "signed grid")
            offset = 1 << (bits - 1)
            codes = codes.to(torch.int16) - offset
            qp = dataclasses.replace(qp, zero_point=qp.zero_point - offset)
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, bits, group_size,
                qp.zero_point is None, act_bits, smooth is not None, kernel, act_clip, act_per_group, act_symmetric)
        m.qweight.copy_(pack(codes.to(torch.int8), m.weight_format.storage_bits, signed=True))
        m.scale.copy_(qp.scale.reshape(m.scale.shape).to(torch.float16))
        if m.zero_point is not None:
            m.zero_point.copy_(qp.zero_point.reshape(m.zero_point.shape).to(torch.int8))
        if smooth is not None:
            m.smooth_inv.copy_(1.0 / smooth.float())
        if linear.bias is not None:
            m.bias.copy_(linear.bias.detach().float())
        return m

    @classmethod
    def from_float(cls, linear: nn.Linear, weight_bits: int = 4, group_size: int = 128, symmetric: bool = True,
                   act_bits: int = 8, smooth: torch.Tensor | None = None, kernel: str = "auto",
                   act_clip: float = 1.0, act_per_group: bool = False, act_symmetric: bool = True) -> "WAQLinear":
        """RTN weights (of ``W * s`` when SmoothQuant factors ``smooth`` are given)."""
        w = linear.weight.detach().float()
        if smooth is not None:
            w = w * smooth.float()
        gran = per_group(group_size) if group_size else per_channel(0)
        qp = choose_qparams(w, f"int{weight_bits}", symmetric, gran)
        qp.scale = qp.scale.to(torch.float16).float()
        return cls.from_quantized(linear, quantize(w, qp), qp, group_size, act_bits, smooth, kernel, act_clip,
                                  act_per_group, act_symmetric)

    def spec(self) -> dict:
        return {"class": type(self).__name__, "in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None, "weight_bits": self.weight_bits, "group_size": self.group_size,
                "symmetric": self.symmetric, "act_bits": self.act_bits, "smooth": self.smooth_inv is not None,
                "kernel": self.kernel, **({"act_clip": self.act_clip} if self.act_clip != 1.0 else {}),
                **({"act_per_group": True} if self.act_per_group else {}),
                **({"act_symmetric": False} if not self.act_symmetric else {})}

    @classmethod
    def from_spec(cls, spec: dict) -> "WAQLinear":
        return cls(**spec)

    # ---- compute ------------------------------------------------------------------------------
    def codes(self) -> torch.Tensor:
        return unpack(self.qweight, self.weight_format.storage_bits, (self.out_features, self.in_features), signed=True)

    def qparams(self) -> QParams:
        f = self.weight_format
        qmax = f.qmax
        qmin = -qmax if self.symmetric else f.qmin
        zp = None if self.zero_point is None else self.zero_point.to(torch.int32)
        scale = self.scale.float() if self.group_size else self.scale.float()[:, 0]
        zp = zp if (zp is None or self.group_size) else zp[:, 0]
        return QParams(f, self.granularity, scale, zp, qmin, qmax)

    def dequantized_weight(self) -> torch.Tensor:
        """The effective float weight (N, K), smoothing undone."""
        w = dequantize(self.codes(), self.qparams())
        return w if self.smooth_inv is None else w * self.smooth_inv

    def _prepare(self) -> None:
        q = self.codes().to(torch.int16)  # (N, K)
        g = self.group_size or self.in_features
        if self.zero_point is not None:  # centre affine codes: (q - zp) fits int8 for <= 7 bits
            q = (q.reshape(self.out_features, -1, g) - self.zero_point.to(torch.int16)[..., None]).reshape_as(q)
        choice = kernels.resolve("wa_linear", self.kernel)
        qt = q.to(torch.int8).t().contiguous()  # (K, N)
        colsum = None if self.act_symmetric else qt.reshape(-1, g, self.out_features).to(torch.int32).sum(1)  # (G, N)
        self._prepared = (qt, self.scale.float(), g, kernels.KERNELS["wa_linear"][choice], colsum)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.release_kernel_layout()

    def release_kernel_layout(self) -> None:
        """Drop the int8 kernel layout (rebuilt from the stored codes and scales on the next forward), as
        ``WeightOnlyQLinear`` does: after its buffers change, and between layers of sequential quantization."""
        self._prepared = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._prepared is None:
            self._prepare()
        qw_t, w_scale, g, fn, colsum = self._prepared
        return fn(x, qw_t, w_scale, g, self.act_bits, self.bias, self.smooth_inv, self.act_clip, self.act_per_group,
                  self.act_symmetric, colsum)

    def fake_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Float simulation (fake-quantized activations x dequantized weights), for tests."""
        x2 = x.float() if self.smooth_inv is None else x.float() * self.smooth_inv
        g = (self.group_size or self.in_features) if self.act_per_group else 0
        xq = fake_quantize_activations(x2, self.act_bits, self.act_clip, g, self.act_symmetric)
        w = dequantize(self.codes(), self.qparams())
        return F.linear(xq, w, self.bias).to(x.dtype)

    def extra_repr(self) -> str:
        gran = f"g{self.group_size}" if self.group_size else "per-channel"
        return (f"in={self.in_features}, out={self.out_features}, W{self.weight_bits}A{self.act_bits} {gran} "
                f"{'sym' if self.symmetric else 'affine'}{', smoothed' if self.smooth_inv is not None else ''}"
                f"{f', act clip {self.act_clip:g}' if self.act_clip != 1.0 else ''}"
                f"{', act per group' if self.act_per_group else ''}{', act affine' if not self.act_symmetric else ''}")


def fake_quantize_activations(x: torch.Tensor, act_bits: int, act_clip: float = 1.0, group_size: int = 0,
                              symmetric: bool = True) -> torch.Tensor:
    """The activations a ``WAQLinear`` multiplies, in float: ``s q`` (symmetric) or ``s (q - z)`` (affine)
    per token, or per token and group of ``group_size`` inputs (0 = the whole row), with the grids of
    :mod:`lowbit.kernels.wa_int` (range ``act_clip * max|x|``)."""
    from lowbit.kernels.wa_int import quantize_tokens, quantize_tokens_affine

    x = x.float()
    xg = x.reshape(*x.shape[:-1], -1, group_size or x.shape[-1])  # (..., G, g)
    if symmetric:
        q, s = quantize_tokens(xg, act_bits, act_clip)
        return (q.float() * s).reshape_as(x)
    q, s, zp = quantize_tokens_affine(xg, act_bits, act_clip)
    return ((q.float() - zp.float()) * s).reshape_as(x)


__all__ = ["WAQLinear", "ACT_BITS", "WEIGHT_BITS", "fake_quantize_activations"]
