"""Integer-only inference of the digits CNN (Jacob et al. 2018): int8 image codes in, int32 logits out.

Built from the static fake-quant model (``StaticConfig(real_int8=False)``, BN already folded), whose
calibrated input quantizers fix every activation scale ``s_i`` / zero-point ``z_i``. Per conv / linear
layer with input codes ``q`` (int8), weight codes ``w`` (int8, symmetric per output channel ``s_w``):

    acc = sum (q - z_in) w + round(b / (s_in s_w))                       int32, bias in int32
    q_out = clamp(round(acc * M) + z_out, z_out, 127),  M = s_in s_w / s_out   fixed-point, fused ReLU

with ``round(acc * M)`` done by :func:`lowbit.integer.fixed_point.requantize` (M0 and shift per
channel). Max pooling works on codes (monotone); global average pooling sums the int32 ReLU'd
accumulators of conv3 over the 4x4 map and folds the 1/16 into the requantization multiplier;
the classifier's accumulators are requantized to int32 logits at scale ``s_fc_in * max(s_w)``.
Nothing between :meth:`quantize_input` and the logits is a float op (the tests record every op).

:meth:`forward_int` uses ``int8_mm`` (``torch._int_mm``) on integer im2col patches;
:meth:`forward_int_ref` is a plain independent reference: direct convolution by shifted int64
multiply-adds and the scalar Python-int gemmlowp requantization; the two agree bit-exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit import kernels
from lowbit.core import quantize
from lowbit.errors import ConfigError
from lowbit.integer.fixed_point import INT32_MAX, INT32_MIN, quantize_multipliers, requantize, requantize_ref
from lowbit.nn.static import FakeQuantConv2d, FakeQuantLinear, im2col_int8, quantize_activation

CONV_NAMES = ("conv1", "conv2", "conv3")
GAP_SIZE = 16  # the 4x4 map conv3 produces on 8x8 digits after one 2x2 max pool


class _IntLayer:
    """One conv / linear layer as integers: weight codes (K, N), int32 bias, input zero-point, requant."""

    def __init__(self, fq, s_out: float | None, z_out: int, extra_divisor: int = 1):
        s_in, z_in = float(fq.act.scale), int(fq.act.zero_point)
        qp = fq.weight_qparams()
        w = fq.module.weight.detach().float()
        codes = quantize(w, qp)  # (N, ...) int8
        self.w_t = codes.reshape(codes.shape[0], -1).t().contiguous()  # (K, N)
        self.w4 = codes  # weight layout, for the reference
        s_w = qp.scale.float().expand(codes.shape[0]) if qp.scale.dim() == 0 else qp.scale.float()
        self.s_acc = s_in * s_w.double()  # (N,) real scale of the accumulators
        b = fq.module.bias.detach().double() if fq.module.bias is not None else torch.zeros(codes.shape[0])
        self.bias = torch.round(b / self.s_acc).to(torch.int64)  # (N,) int32-range
        if self.bias.abs().max() > INT32_MAX:
            raise ConfigError("bias does not fit int32 at the accumulator scale")
        self.z_in = z_in
        self.colsum = codes.reshape(codes.shape[0], -1).to(torch.int64).sum(dim=1)  # (N,)
        if s_out is None:  # int32 logits: a common scale, multipliers <= 1
            s_out = float(self.s_acc.max())
        self.s_out, self.z_out = s_out, z_out
        self.m0, self.shift = quantize_multipliers(self.s_acc / (s_out * extra_divisor))
        self.kernel_size = tuple(fq.module.kernel_size) if isinstance(fq, FakeQuantConv2d) else None
        self.padding = tuple(fq.module.padding) if isinstance(fq, FakeQuantConv2d) else None


class IntegerDigitsCNN(nn.Module):
    """The digits CNN as an integer-only pipeline (see the module docstring)."""

    model_name = "digits"
    task = "classifier"

    def __init__(self, fake: nn.Module, kernel: str = "auto"):
        super().__init__()
        names = (*CONV_NAMES, "fc")
        for n in names:
            if not isinstance(getattr(fake, n, None), (FakeQuantConv2d, FakeQuantLinear)):
                raise ConfigError(f"IntegerDigitsCNN needs the static fake-quant digits CNN (real_int8=False); "
                                  f"layer {n!r} is {type(getattr(fake, n, None)).__name__}")
        for n in ("bn1", "bn2", "bn3"):
            if not isinstance(getattr(fake, n), nn.Identity):
                raise ConfigError(f"{n} is not folded: quantize with fold_bn=True first")
        acts = [getattr(fake, n).act for n in names]
        self.s_in, self.z_in = float(acts[0].scale), int(acts[0].zero_point)
        self.qmin_in = -127 if acts[0].symmetric else -128
        self.layers = [
            _IntLayer(fake.conv1, float(acts[1].scale), int(acts[1].zero_point)),
            _IntLayer(fake.conv2, float(acts[2].scale), int(acts[2].zero_point)),
            _IntLayer(fake.conv3, float(acts[3].scale), int(acts[3].zero_point), extra_divisor=GAP_SIZE),
            _IntLayer(fake.fc, None, 0),
        ]
        self.logit_scale = self.layers[-1].s_out
        self.kernel = kernel
        self._mm = kernels.KERNELS["int8_mm"][kernels.resolve("int8_mm", kernel)]

    # ---- boundary ---------------------------------------------------------------------------
    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 1, 8, 8) in [0, 1] -> int8 codes (the float -> integer boundary)."""
        return quantize_activation(x, torch.tensor(self.s_in), torch.tensor(self.z_in), self.qmin_in, 127)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Float images -> int32 logits; ``argmax`` is the class (multiply by ``logit_scale`` for floats)."""
        return self.forward_int(self.quantize_input(x))

    # ---- fast integer path ------------------------------------------------------------------
    def _conv(self, q: torch.Tensor, layer: _IntLayer, z_in: int) -> torch.Tensor:
        """int8 codes (B, C, H, W) -> int32 accumulators with bias (B, Ho, Wo, N)."""
        cols, ho, wo = im2col_int8(q, layer.kernel_size, (1, 1), layer.padding, z_in)  # (B*Ho*Wo, K)
        acc = self._mm(cols, layer.w_t).to(torch.int64) - z_in * layer.colsum + layer.bias  # (B*Ho*Wo, N)
        return acc.reshape(q.shape[0], ho, wo, -1)

    def forward_int(self, q: torch.Tensor) -> torch.Tensor:
        """int8 image codes (B, 1, 8, 8) -> int32 logits (B, 10). Integer ops only."""
        l1, l2, l3, fc = self.layers
        a = self._conv(q, l1, self.z_in)  # (B, 8, 8, 16)
        q = requantize(a, l1.m0, l1.shift, l1.z_out, l1.z_out, 127).to(torch.int8).permute(0, 3, 1, 2)  # ReLU fused
        a = self._conv(q.contiguous(), l2, l1.z_out)  # (B, 8, 8, 32)
        q = requantize(a, l2.m0, l2.shift, l2.z_out, l2.z_out, 127).to(torch.int8).permute(0, 3, 1, 2)
        q = F.max_pool2d(q.contiguous().to(torch.int32), 2).to(torch.int8)  # on codes: max commutes with quantization
        a = self._conv(q, l3, l2.z_out)  # (B, 4, 4, 64)
        s = a.clamp(min=0).sum(dim=(1, 2))  # ReLU then sum over the 4x4 map (B, 64), int64
        q = requantize(s, l3.m0, l3.shift, l3.z_out, -128, 127).to(torch.int8)  # (B, 64), 1/16 in M
        acc = self._mm(q, fc.w_t).to(torch.int64) - l3.z_out * fc.colsum + fc.bias  # (B, 10)
        return requantize(acc, fc.m0, fc.shift, 0, INT32_MIN, INT32_MAX).to(torch.int32)

    # ---- plain reference --------------------------------------------------------------------
    @staticmethod
    def _conv_ref(q: torch.Tensor, layer: _IntLayer, z_in: int) -> torch.Tensor:
        """Direct convolution: sum over kernel taps of shifted (q - z_in) * w, in int64. (B, Ho, Wo, N)."""
        x = q.to(torch.int64) - z_in
        ph, pw = layer.padding
        x = F.pad(x, (pw, pw, ph, ph))  # pads with 0 = (z_in - z_in)
        kh, kw = layer.kernel_size
        b, c, h, w = x.shape
        ho, wo = h - kh + 1, w - kw + 1
        out = torch.zeros(b, layer.w4.shape[0], ho, wo, dtype=torch.int64)
        wk = layer.w4.to(torch.int64)  # (N, C, kh, kw)
        for i in range(kh):
            for j in range(kw):
                patch = x[:, :, i:i + ho, j:j + wo]  # (B, C, Ho, Wo)
                out += torch.einsum("bchw,nc->bnhw", patch, wk[:, :, i, j])
        return (out + layer.bias[None, :, None, None]).permute(0, 2, 3, 1)  # (B, Ho, Wo, N)

    @staticmethod
    def _requant_ref(a: torch.Tensor, layer: _IntLayer, zp: int, qmin: int, qmax: int) -> torch.Tensor:
        m0, sh = layer.m0.tolist(), layer.shift.tolist()
        flat = a.reshape(-1, a.shape[-1]).tolist()
        out = [[requantize_ref(v, m0[c], sh[c], zp, qmin, qmax) for c, v in enumerate(row)] for row in flat]
        return torch.tensor(out, dtype=torch.int64).reshape(a.shape)

    def forward_int_ref(self, q: torch.Tensor) -> torch.Tensor:
        l1, l2, l3, fc = self.layers
        a = self._conv_ref(q, l1, self.z_in)
        q = self._requant_ref(a, l1, l1.z_out, l1.z_out, 127).permute(0, 3, 1, 2)
        a = self._conv_ref(q, l2, l1.z_out)
        q = self._requant_ref(a, l2, l2.z_out, l2.z_out, 127).permute(0, 3, 1, 2)
        b, c, h, w = q.shape
        q = q.reshape(b, c, h // 2, 2, w // 2, 2).amax(dim=(3, 5))  # 2x2 max pool
        a = self._conv_ref(q, l3, l2.z_out)
        s = a.clamp(min=0).sum(dim=(1, 2))
        q = self._requant_ref(s, l3, l3.z_out, -128, 127)
        acc = (q - l3.z_out) @ fc.w4.to(torch.int64).t() + fc.bias  # (B, 10)
        return self._requant_ref(acc, fc, 0, INT32_MIN, INT32_MAX).to(torch.int32)


def integer_digits_cnn(fp32: nn.Module, calibration_data=None, observer: str = "mse", symmetric: bool = False,
                       kernel: str = "auto") -> tuple[IntegerDigitsCNN, nn.Module]:
    """(integer-only CNN, the fake-quant model it was built from) for a float DigitsCNN (left unchanged)."""
    import copy

    import lowbit
    from lowbit.algorithms.static import StaticConfig

    fake = copy.deepcopy(fp32)
    lowbit.quantize(fake, StaticConfig(observer=observer, symmetric=symmetric, smooth_alpha=None, real_int8=False),
                    calibration_data)
    return IntegerDigitsCNN(fake, kernel), fake
