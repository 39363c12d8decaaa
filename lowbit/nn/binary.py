"""Binary (XNOR-Net) and ternary (TTQ) layers for inference, built from trained fake-quant layers.

- :class:`XnorLinear`, :class:`XnorConv2d`: binary weights and activations. Weights are stored as
  packed signs (64 per int64 word) with one scale per output channel ``alpha = mean|W|``; the input
  is shifted by a learned per-channel threshold ``tau`` (ReActNet's RSign, Liu et al. 2020: post-ReLU
  inputs would otherwise all be +1), binarised, and scaled by ``beta = mean|x - tau|`` over each
  receptive field (XNOR-Net's K, Rastegari et al. 2016):

      y = (sign(x - tau) (*) sign(W)) * beta * alpha + b,

  where ``(*)`` is the XNOR-popcount product of :mod:`lowbit.kernels.xnor`. Convolutions run as
  im2col + that GEMM; padded taps are 0 after the shift, i.e. sign +1 (the training layer pads
  the binarised input with +1 the same way).
- :class:`TernaryLinear`, :class:`TernaryConv2d`: ternary weights ``{-W_n, 0, +W_p}`` (TTQ, Zhu et
  al. 2017) stored as 2-bit codes with the two learned scales; activations stay float, and the
  compute dequantizes the weight (there is no ternary kernel: the gain is storage, 16x).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit import kernels
from lowbit.core import pack, packed_nbytes, unpack
from lowbit.errors import ConfigError
from lowbit.kernels import xnor
from lowbit.nn.base import register_qmodule

_pair = nn.modules.utils._pair


class _XnorBase(nn.Module):
    def _init_buffers(self, k: int, n: int, channels: int, bias: bool) -> None:
        self.k = k
        self.register_buffer("qweight", torch.zeros(n, xnor.n_words(k), dtype=torch.int64))  # (N, K/64) signs
        self.register_buffer("alpha", torch.ones(n))  # (N,) mean|W| per output channel
        self.register_buffer("tau", torch.zeros(channels))  # (C,) activation threshold per input channel
        self.register_buffer("bias", torch.zeros(n) if bias else None)
        self._fns = None

    def _kernel(self):
        if self._fns is None:
            lib, why = xnor.native_library()
            choice = kernels.resolve("xnor_linear", self.kernel, supported=lib is not None, why_not=why)
            self._fns = kernels.KERNELS["xnor_linear"][choice]
        return self._fns

    def binary_product(self, rows: torch.Tensor, tau: torch.Tensor | None) -> torch.Tensor:
        """rows (M, K) -> (M, N) ``sign(rows - tau) (*) sign(W) * beta * alpha + b``, beta = mean|rows - tau|."""
        return self._kernel()(rows, tau, self.qweight, self.alpha, self.bias)

    def _fill(self, weight: torch.Tensor, alpha: torch.Tensor, tau: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.qweight.copy_(xnor.pack_signs_ref(weight.detach().float().reshape(weight.shape[0], -1)))
        self.alpha.copy_(alpha.detach().float().reshape(-1))
        self.tau.copy_(tau.detach().float().reshape(-1))
        if bias is not None:
            self.bias.copy_(bias.detach().float())


@register_qmodule
class XnorLinear(_XnorBase):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, kernel: str = "auto"):
        super().__init__()
        self.in_features, self.out_features, self.kernel = in_features, out_features, kernel
        self._init_buffers(in_features, out_features, in_features, bias)

    @classmethod
    def from_float(cls, linear: nn.Linear, alpha: torch.Tensor, tau: torch.Tensor, kernel: str = "auto") -> "XnorLinear":
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, kernel)
        m._fill(linear.weight, alpha, tau, linear.bias)
        return m

    def spec(self) -> dict:
        return {"class": type(self).__name__, "in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None, "kernel": self.kernel}

    @classmethod
    def from_spec(cls, spec: dict) -> "XnorLinear":
        return cls(**spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1])  # (M, K)
        return self.binary_product(rows, self.tau).to(x.dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, xnor-popcount, kernel={self.kernel}"


@register_qmodule
class XnorConv2d(_XnorBase):
    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, bias: bool = True,
                 kernel: str = "auto"):
        super().__init__()
        self.in_channels, self.out_channels, self.kernel = in_channels, out_channels, kernel
        self.kernel_size, self.stride, self.padding = _pair(kernel_size), _pair(stride), _pair(padding)
        k = in_channels * self.kernel_size[0] * self.kernel_size[1]
        self._init_buffers(k, out_channels, in_channels, bias)

    @staticmethod
    def unsupported(conv: nn.Conv2d) -> str | None:
        if conv.groups != 1 or tuple(conv.dilation) != (1, 1) or isinstance(conv.padding, str) \
                or conv.padding_mode != "zeros":
            return "XNOR convolution supports groups=1, dilation=1, numeric zero padding only"
        return None

    @classmethod
    def from_float(cls, conv: nn.Conv2d, alpha: torch.Tensor, tau: torch.Tensor, kernel: str = "auto") -> "XnorConv2d":
        why = cls.unsupported(conv)
        if why:
            raise ConfigError(why)
        m = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                conv.bias is not None, kernel)
        m._fill(conv.weight, alpha, tau, conv.bias)
        return m

    def spec(self) -> dict:
        return {"class": type(self).__name__, "in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride), "padding": list(self.padding),
                "bias": self.bias is not None, "kernel": self.kernel}

    @classmethod
    def from_spec(cls, spec: dict) -> "XnorConv2d":
        return cls(**spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ConfigError(f"XnorConv2d expects (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        b, _, h, w = x.shape
        xs = x.float() - self.tau.reshape(1, -1, 1, 1)  # (B, C, H, W)
        cols = F.unfold(xs, self.kernel_size, padding=self.padding, stride=self.stride)  # (B, C*kh*kw, L)
        ho = (h + 2 * self.padding[0] - self.kernel_size[0]) // self.stride[0] + 1
        wo = (w + 2 * self.padding[1] - self.kernel_size[1]) // self.stride[1] + 1
        y = self.binary_product(cols.transpose(1, 2).reshape(-1, self.k), None)  # (B*L, O)
        return y.reshape(b, ho, wo, self.out_channels).permute(0, 3, 1, 2).to(x.dtype)  # (B, O, Ho, Wo)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}->{self.out_channels}, k={self.kernel_size}, s={self.stride}, p={self.padding}, "
                f"xnor-popcount, kernel={self.kernel}")


# ------------------------------------------------------------------------------------ ternary

class _TernaryBase(nn.Module):
    def _init_buffers(self, shape: tuple[int, ...], bias: bool) -> None:
        self.wshape = tuple(shape)
        n = 1
        for s in shape:
            n *= s
        self.register_buffer("qweight", torch.zeros(packed_nbytes(n, 2), dtype=torch.uint8))  # 2-bit codes
        self.register_buffer("w_pos", torch.ones(()))  # W_p
        self.register_buffer("w_neg", torch.ones(()))  # W_n
        self.register_buffer("bias", torch.zeros(shape[0]) if bias else None)

    def codes(self) -> torch.Tensor:
        return unpack(self.qweight, 2, self.wshape, signed=True)  # int8 in {-1, 0, 1}

    def dequantized_weight(self) -> torch.Tensor:
        c = self.codes()
        return (c == 1).float() * self.w_pos - (c == -1).float() * self.w_neg

    def _fill(self, codes: torch.Tensor, w_pos: torch.Tensor, w_neg: torch.Tensor, bias: torch.Tensor | None) -> None:
        if codes.min() < -1 or codes.max() > 1:
            raise ConfigError("ternary codes must be in {-1, 0, 1}")
        self.qweight.copy_(pack(codes.to(torch.int8), 2, signed=True))
        self.w_pos.copy_(w_pos.detach().float().reshape(()))
        self.w_neg.copy_(w_neg.detach().float().reshape(()))
        if bias is not None:
            self.bias.copy_(bias.detach().float())


@register_qmodule
class TernaryLinear(_TernaryBase):
    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_buffers((out_features, in_features), bias)

    @classmethod
    def from_codes(cls, linear: nn.Linear, codes, w_pos, w_neg) -> "TernaryLinear":
        m = cls(linear.in_features, linear.out_features, linear.bias is not None)
        m._fill(codes, w_pos, w_neg, linear.bias)
        return m

    def spec(self) -> dict:
        return {"class": type(self).__name__, "in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None}

    @classmethod
    def from_spec(cls, spec: dict) -> "TernaryLinear":
        return cls(**spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


@register_qmodule
class TernaryConv2d(_TernaryBase):
    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, bias: bool = True):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = _pair(kernel_size), _pair(stride), _pair(padding)
        self._init_buffers((out_channels, in_channels, *self.kernel_size), bias)

    @classmethod
    def from_codes(cls, conv: nn.Conv2d, codes, w_pos, w_neg) -> "TernaryConv2d":
        if XnorConv2d.unsupported(conv):
            raise ConfigError("ternary convolution supports groups=1, dilation=1, numeric zero padding only")
        m = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.bias is not None)
        m._fill(codes, w_pos, w_neg, conv.bias)
        return m

    def spec(self) -> dict:
        return {"class": type(self).__name__, "in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride), "padding": list(self.padding),
                "bias": self.bias is not None}

    @classmethod
    def from_spec(cls, spec: dict) -> "TernaryConv2d":
        return cls(**spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.dequantized_weight().to(x.dtype), self.bias, self.stride, self.padding)


__all__ = ["XnorLinear", "XnorConv2d", "TernaryLinear", "TernaryConv2d"]
