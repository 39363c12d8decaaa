"""Static quantization modules: fake-quant wrappers for calibration / QAT, and real int8 modules.

Static PTQ (MISSION B.8) fixes the activation ``(scale, zero_point)`` from calibration data instead
of measuring it per batch at run time. Activations are quantized *per tensor* (a per-input-channel
activation scale cannot be factored out of an integer dot product; SmoothQuant factors, folded
into the weights, give the per-channel effect for free); weights are symmetric, per output channel
or per tensor (the hardware-friendly choice of Jacob et al. 2018 and the TensorRT recipe: zero
weight zero-points keep the integer GEMM free of a row-sum correction).

- :class:`ActQuantizer`: observe (calibration) -> ``calibrate()`` -> fake-quantize with frozen
  qparams; bits / symmetric / observer are data, so it serves W8A8 as well as W4A4.
- :class:`FakeQuantLinear`, :class:`FakeQuantConv2d`: float module + input ``ActQuantizer`` +
  fake-quantized weights (straight-through gradients: usable for QAT).
- :class:`StaticQLinear`, :class:`StaticQConv2d`: int8 codes, ``int8 x int8 -> int32`` products
  (``lowbit.kernels`` op ``int8_mm``: ``torch._int_mm`` or its int64 twin), dequantized output
  ``y = (acc - zp_x * sum_k q_w) * s_x * s_w + b`` (floats between layers; see ``lowbit.integer``
  for the integer-only pipeline).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit import kernels
from lowbit.core import QParams, choose_qparams, fake_quantize, int_format, per_channel, per_tensor, qparams_from_range, quantize
from lowbit.errors import CalibrationError, ConfigError
from lowbit.nn.base import register_qmodule
from lowbit.observers import make_observer

MODES = ("observe", "quantize", "float")


@register_qmodule
class FoldedBatchNorm(nn.Identity):
    """Identity left where a BatchNorm was folded into the preceding layer (so ``lowbit.load`` rebuilds it)."""

    def spec(self) -> dict:
        return {"class": type(self).__name__}

    @classmethod
    def from_spec(cls, spec: dict) -> "FoldedBatchNorm":
        return cls()


def act_qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """Code range of an activation: ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` symmetric, ``[-2^(b-1), 2^(b-1) - 1]`` affine."""
    f = int_format(bits)
    return (-f.qmax if symmetric else f.qmin), f.qmax


class ActQuantizer(nn.Module):
    """A static activation quantization point.

    ``mode``: ``observe`` passes ``x`` through and feeds the observer (non-finite values raise a
    :class:`CalibrationError` naming ``name``); ``quantize`` returns ``fake_quantize(x)`` with the
    calibrated ``(scale, zero_point)``; ``float`` is the identity. The range ``[min_val, max_val]``
    is kept so model-level searches can rescale it (:meth:`get_range` / :meth:`set_range`).
    """

    def __init__(self, bits: int = 8, symmetric: bool = True, observer: str = "minmax", axis: int | None = None,
                 name: str = "", observer_options: dict | None = None):
        super().__init__()
        self.bits, self.symmetric, self.axis, self.name = bits, symmetric, axis, name
        self.fmt = int_format(bits)
        self.observer_name = observer
        self.observer = make_observer(observer, self.fmt, symmetric, axis, **(observer_options or {}))
        self.mode = "observe"
        self.register_buffer("min_val", torch.zeros(()))
        self.register_buffer("max_val", torch.zeros(()))
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("zero_point", torch.zeros((), dtype=torch.int32))

    @property
    def granularity(self):
        return per_tensor() if self.axis is None else per_channel(self.axis)

    @property
    def model_level(self) -> bool:
        """True when the observer's range is refined by a model-level search (the ``output`` observer)."""
        return getattr(self.observer, "model_level", False)

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ConfigError(f"unknown quantizer mode {mode!r}; valid: {', '.join(MODES)}")
        self.mode = mode

    def qparams(self) -> QParams:
        qmin, qmax = act_qrange(self.bits, self.symmetric)
        return QParams(self.fmt, self.granularity, self.scale, None if self.symmetric else self.zero_point, qmin, qmax)

    def get_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.min_val.clone(), self.max_val.clone()

    def set_range(self, min_val: torch.Tensor, max_val: torch.Tensor) -> None:
        """Fix the quantization range; scale / zero_point follow with :func:`qparams_from_range`."""
        qp = qparams_from_range(min_val, max_val, self.fmt, self.symmetric, self.granularity)
        self.min_val, self.max_val = min_val.detach().clone().float(), max_val.detach().clone().float()
        self.scale = qp.scale.detach().clone()
        self.zero_point = (qp.zero_point if qp.zero_point is not None else torch.zeros_like(qp.scale)).to(torch.int32)

    def calibrate(self) -> None:
        """Range from the observer, then switch to ``quantize``."""
        if self.observer.n_batches == 0:
            raise CalibrationError(f"layer {self.name!r} saw no calibration data (is it reached by the forward pass?)")
        self.set_range(*self.observer.compute_range())
        self.mode = "quantize"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "float":
            return x
        if self.mode == "observe":
            if not torch.isfinite(x).all():
                raise CalibrationError(f"non-finite (NaN/inf) activation entering layer {self.name!r} during calibration")
            self.observer.observe(x)
            return x
        return fake_quantize(x, self.qparams())

    def extra_repr(self) -> str:
        kind = "sym" if self.symmetric else "affine"
        return f"{self.name}: int{self.bits} {kind} per-{'tensor' if self.axis is None else 'channel'}, " \
               f"observer={self.observer_name}, mode={self.mode}"


class _FakeQuantWeighted(nn.Module):
    """Shared part of the fake-quant Linear / Conv2d wrappers: input quantizer + fake-quantized weight."""

    def __init__(self, module: nn.Module, weight_bits: int, act_bits: int, act_symmetric: bool,
                 weight_per_channel: bool, observer: str, name: str, observer_options: dict | None,
                 smooth: torch.Tensor | None = None):
        super().__init__()
        self.module = module
        self.weight_bits, self.weight_per_channel = weight_bits, weight_per_channel
        self.act = ActQuantizer(act_bits, act_symmetric, observer, None, name, observer_options)
        # SmoothQuant factors s (K,): x / s enters the quantizer, W * s the weight quantizer.
        self.register_buffer("smooth_inv", None if smooth is None else 1.0 / smooth.float())
        self.register_buffer("_smooth", None if smooth is None else smooth.float(), persistent=False)
        self._cache: tuple | None = None

    def float_weight(self) -> torch.Tensor:
        """The weight the quantizer sees: ``W * s`` with smoothing (input channels on dim 1)."""
        w = self.module.weight
        if self._smooth is None:
            return w
        return w * self._smooth.reshape(1, -1, *([1] * (w.dim() - 2)))

    def weight_qparams(self) -> QParams:
        w = self.float_weight().detach()
        gran = per_channel(0) if self.weight_per_channel else per_tensor()
        return choose_qparams(w, int_format(self.weight_bits), symmetric=True, granularity=gran)

    def quantized_weight(self) -> torch.Tensor:
        """``fake_quantize(W)`` (straight-through gradient); cached while the weight is unchanged in eval."""
        w = self.float_weight()
        if self.training or torch.is_grad_enabled() and w.requires_grad:
            return fake_quantize(w, self.weight_qparams())
        key = (self.module.weight._version, self.module.weight.data_ptr())
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, fake_quantize(w.detach(), self.weight_qparams()))
        return self._cache[1]

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.smooth_inv is not None:  # linear layers only: input channels are the last dim
            x = x * self.smooth_inv
        return self.act(x)


class FakeQuantLinear(_FakeQuantWeighted):
    """``y = fq(x / s) @ fq(W * s)^T + b`` with a static input quantizer."""

    def __init__(self, linear: nn.Linear, weight_bits: int = 8, act_bits: int = 8, act_symmetric: bool = True,
                 weight_per_channel: bool = True, observer: str = "minmax", name: str = "",
                 observer_options: dict | None = None, smooth: torch.Tensor | None = None):
        super().__init__(linear, weight_bits, act_bits, act_symmetric, weight_per_channel, observer, name,
                         observer_options, smooth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quantized_input(x)
        if self.act.mode == "float":
            return F.linear(x, self.float_weight(), self.module.bias)
        return F.linear(x, self.quantized_weight(), self.module.bias)


class FakeQuantConv2d(_FakeQuantWeighted):
    """``y = conv(fq(x), fq(W)) + b`` with a static input quantizer (zero padding = code ``zero_point``)."""

    def __init__(self, conv: nn.Conv2d, weight_bits: int = 8, act_bits: int = 8, act_symmetric: bool = True,
                 weight_per_channel: bool = True, observer: str = "minmax", name: str = "",
                 observer_options: dict | None = None):
        super().__init__(conv, weight_bits, act_bits, act_symmetric, weight_per_channel, observer, name,
                         observer_options)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quantized_input(x)
        w = self.float_weight() if self.act.mode == "float" else self.quantized_weight()
        return self.module._conv_forward(x, w, self.module.bias)


# ------------------------------------------------------------------------------------- real int8


def quantize_activation(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int,
                        qmax: int) -> torch.Tensor:
    """Float -> int8 codes ``clamp(round(x / scale) + zero_point, qmin, qmax)`` (per-tensor qparams)."""
    return (torch.round(x.float() / scale) + zero_point).clamp_(qmin, qmax).to(torch.int8)


def im2col_int8(q: torch.Tensor, kernel_size: tuple[int, int], stride: tuple[int, int],
                padding: tuple[int, int], pad_code: int) -> tuple[torch.Tensor, int, int]:
    """Integer im2col: codes (B, C, H, W) -> patches (B * Ho * Wo, C * kh * kw), padding with ``pad_code``.

    Padding uses the code of 0.0 (the zero-point), so padded taps contribute exactly 0 after the
    zero-point correction. Pure indexing, no float op.
    """
    (kh, kw), (sh, sw), (ph, pw) = kernel_size, stride, padding
    if ph or pw:
        q = F.pad(q, (pw, pw, ph, ph), value=pad_code)
    b, c = q.shape[:2]
    patches = q.unfold(2, kh, sh).unfold(3, kw, sw)  # (B, C, Ho, Wo, kh, kw)
    ho, wo = patches.shape[2], patches.shape[3]
    cols = patches.permute(0, 2, 3, 1, 4, 5).reshape(b * ho * wo, c * kh * kw)  # (B*Ho*Wo, C*kh*kw)
    return cols, ho, wo


class _StaticQBase(nn.Module):
    """Buffers and epilogue shared by StaticQLinear / StaticQConv2d."""

    def _init_buffers(self, k: int, n: int, bias: bool, act_bits: int, act_symmetric: bool, smooth: bool):
        self.act_bits, self.act_symmetric = act_bits, act_symmetric
        self.register_buffer("qweight_t", torch.zeros(k, n, dtype=torch.int8))  # (K, N)
        self.register_buffer("w_scale", torch.ones(n))  # (N,) (equal entries when per tensor)
        self.register_buffer("act_scale", torch.ones(()))
        self.register_buffer("act_zero_point", torch.zeros((), dtype=torch.int32))
        self.register_buffer("bias", torch.zeros(n) if bias else None)
        self.register_buffer("smooth_inv", torch.ones(k) if smooth else None)  # (K,)
        self._colsum: torch.Tensor | None = None  # derived: sum_k q_w[k, n], int32 (N,)
        self._mm = None

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._colsum = None

    def _copy_from(self, fq: _FakeQuantWeighted, wq: torch.Tensor, bias: torch.Tensor | None) -> None:
        qp = fq.weight_qparams()
        codes = quantize(fq.float_weight().detach().float(), qp)  # int8, weight layout
        n = codes.shape[0]
        self.qweight_t.copy_(wq(codes))
        self.w_scale.copy_(qp.scale.float().expand(n) if qp.scale.dim() == 0 else qp.scale.float())
        self.act_scale.copy_(fq.act.scale)
        self.act_zero_point.copy_(fq.act.zero_point)
        if bias is not None:
            self.bias.copy_(bias.detach().float())
        if fq.smooth_inv is not None:
            self.smooth_inv.copy_(fq.smooth_inv)

    @property
    def qrange(self) -> tuple[int, int]:
        return act_qrange(self.act_bits, self.act_symmetric)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        return quantize_activation(x, self.act_scale, self.act_zero_point, *self.qrange)

    def int_product(self, q: torch.Tensor) -> torch.Tensor:
        """``(q - zp_x) @ q_w`` in int32 for codes q (M, K)."""
        if self._mm is None:
            self._mm = kernels.KERNELS["int8_mm"][kernels.resolve("int8_mm", self.kernel)]
        acc = self._mm(q, self.qweight_t)  # (M, N) int32
        zp = int(self.act_zero_point)
        if zp:
            if self._colsum is None:
                self._colsum = self.qweight_t.to(torch.int32).sum(dim=0)
            acc = acc - zp * self._colsum
        return acc

    def epilogue(self, acc: torch.Tensor) -> torch.Tensor:
        y = acc.float() * (self.act_scale * self.w_scale)
        return y if self.bias is None else y + self.bias


@register_qmodule
class StaticQLinear(_StaticQBase):
    """Static W8A8 linear: calibrated per-tensor activation qparams, symmetric int8 weights."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, act_bits: int = 8,
                 act_symmetric: bool = True, weight_per_channel: bool = True, smooth: bool = False,
                 kernel: str = "auto"):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_per_channel, self.kernel = weight_per_channel, kernel
        self._init_buffers(in_features, out_features, bias, act_bits, act_symmetric, smooth)

    @classmethod
    def from_fake(cls, fq: FakeQuantLinear, kernel: str = "auto") -> "StaticQLinear":
        lin = fq.module
        if fq.weight_bits > 8 or fq.act.bits > 8:
            raise ConfigError("int8 modules hold at most 8-bit codes")
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, fq.act.bits, fq.act.symmetric,
                fq.weight_per_channel, fq.smooth_inv is not None, kernel)
        m._copy_from(fq, lambda codes: codes.t(), lin.bias)  # (N, K) -> (K, N)
        return m

    def spec(self) -> dict:
        return {"class": type(self).__name__, "in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None, "act_bits": self.act_bits, "act_symmetric": self.act_symmetric,
                "weight_per_channel": self.weight_per_channel, "smooth": self.smooth_inv is not None,
                "kernel": self.kernel}

    @classmethod
    def from_spec(cls, spec: dict) -> "StaticQLinear":
        return cls(**spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (M, K)
        if self.smooth_inv is not None:
            x2 = x2 * self.smooth_inv
        y = self.epilogue(self.int_product(self.quantize_input(x2)))  # (M, N)
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, w8 {'per-channel' if self.weight_per_channel else 'per-tensor'}"
                f", a{self.act_bits} {'sym' if self.act_symmetric else 'affine'} static, kernel={self.kernel}")


@register_qmodule
class StaticQConv2d(_StaticQBase):
    """Static W8A8 2-D convolution (groups = 1, dilation = 1, zero padding) by integer im2col + ``int8_mm``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, bias: bool = True,
                 act_bits: int = 8, act_symmetric: bool = True, weight_per_channel: bool = True, kernel: str = "auto"):
        super().__init__()
        pair = nn.modules.utils._pair
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = pair(kernel_size), pair(stride), pair(padding)
        self.weight_per_channel, self.kernel = weight_per_channel, kernel
        k = in_channels * self.kernel_size[0] * self.kernel_size[1]
        self._init_buffers(k, out_channels, bias, act_bits, act_symmetric, False)

    @staticmethod
    def unsupported(conv: nn.Conv2d) -> str | None:
        """Why a Conv2d cannot become a StaticQConv2d (None if it can)."""
        if conv.groups != 1:
            return f"grouped convolution (groups={conv.groups}) not supported by the int8 im2col kernel"
        if tuple(conv.dilation) != (1, 1):
            return f"dilated convolution (dilation={tuple(conv.dilation)}) not supported"
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            return f"padding {conv.padding!r}/{conv.padding_mode} not supported (zero padding by integers only)"
        return None

    @classmethod
    def from_fake(cls, fq: FakeQuantConv2d, kernel: str = "auto") -> "StaticQConv2d":
        conv = fq.module
        why = cls.unsupported(conv)
        if why:
            raise ConfigError(why)
        m = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                conv.bias is not None, fq.act.bits, fq.act.symmetric, fq.weight_per_channel, kernel)
        m._copy_from(fq, lambda codes: codes.reshape(codes.shape[0], -1).t(), conv.bias)  # (O, C, kh, kw) -> (CK, O)
        return m

    def spec(self) -> dict:
        return {"class": type(self).__name__, "in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride), "padding": list(self.padding),
                "bias": self.bias is not None, "act_bits": self.act_bits, "act_symmetric": self.act_symmetric,
                "weight_per_channel": self.weight_per_channel, "kernel": self.kernel}

    @classmethod
    def from_spec(cls, spec: dict) -> "StaticQConv2d":
        return cls(**spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ConfigError(f"StaticQConv2d expects (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        b = x.shape[0]
        q = self.quantize_input(x)  # (B, C, H, W) int8
        cols, ho, wo = im2col_int8(q, self.kernel_size, self.stride, self.padding, int(self.act_zero_point))
        y = self.epilogue(self.int_product(cols))  # (B*Ho*Wo, O)
        return y.reshape(b, ho, wo, self.out_channels).permute(0, 3, 1, 2).to(x.dtype)  # (B, O, Ho, Wo)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}->{self.out_channels}, k={self.kernel_size}, s={self.stride}, p={self.padding}, "
                f"a{self.act_bits} {'sym' if self.act_symmetric else 'affine'} static, kernel={self.kernel}")


__all__ = ["FoldedBatchNorm", "ActQuantizer", "FakeQuantLinear", "FakeQuantConv2d", "StaticQLinear", "StaticQConv2d",
           "quantize_activation", "im2col_int8", "act_qrange"]
