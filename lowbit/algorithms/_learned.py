"""Learnable fake quantizers shared by AdaRound, BRECQ, QDrop and QAT (one file, one job).

Weights (per output channel, or per group of ``group_size`` input columns for linears), codes in
``[qmin, qmax]``, ``w_hat = scale * (clamp(r(w / scale) + zero_point, qmin, qmax) - zero_point)``:

- ``rounding="nearest"``: ``r = round`` with a straight-through gradient (STE; QAT updates ``w``);
- ``rounding="adaround"``: ``r(w / s) = floor(w / s) + h(V)``, the rectified sigmoid
  ``h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1)``, zeta = 1.1, gamma = -0.1, V learned;
  after reconstruction ``h`` is hardened to ``V >= 0`` (Nagel et al. 2020, "Up or Down?", eq. 22-23);
- ``scale_mode="lsq"``: LSQ, the step size is a parameter whose gradient is scaled by
  ``g = 1 / sqrt(n * qmax)`` with ``n`` the elements per step (Esser et al. 2020, sec. 2.2);
  ``"fixed"`` keeps the initial scale; ``"absmax"`` recomputes ``absmax / qmax`` from the current
  weight at every forward (plain STE QAT, Jacob et al. 2018).

Symmetric weights use the full two's-complement range ``[-2^(b-1), 2^(b-1) - 1]`` with no
zero-point (what the static int8 modules store); affine weights (weight-only) add a zero-point.
Scales pass through an fp16 rounding in the forward (gradient straight through) because the real
modules store fp16 scales: the fake weight is then bit-identical to the real module's dequantized
weight. The initial scale is the clipping ratio of ``absmax`` (or of the range) that minimises the
weight MSE, searched per channel.

Activations (per tensor, affine, codes ``[-2^(b-1), 2^(b-1) - 1]`` as ``lowbit.nn.static`` uses):
range from a calibration observer, then fixed, LSQ-learned, or PACT (``clip(x, 0, alpha)`` with
``alpha`` learned, Choi et al. 2018); ``drop_prob`` > 0 keeps each element in float with that
probability while reconstructing (QDrop, Wei et al. 2022).
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.core import QParams, int_format, per_channel, per_group, per_tensor
from lowbit.core.granularity import from_blocks, to_blocks
from lowbit.errors import CalibrationError, ConfigError

ZETA, GAMMA = 1.1, -0.1  # AdaRound's stretch of the sigmoid
log = logging.getLogger(__name__)

CLIP_RATIOS = torch.linspace(0.3, 1.0, 36)  # candidate clipping ratios for the MSE scale search


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g


class _Fp16STE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.to(torch.float16).float()

    @staticmethod
    def backward(ctx, g):
        return g


class _GradScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale: float):
        ctx.scale = scale
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * ctx.scale, None


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` exactly, identity gradient."""
    return _RoundSTE.apply(x)


def weight_qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """Full two's-complement range ``[-2^(b-1), 2^(b-1) - 1]`` (zero-point 0 when symmetric)."""
    f = int_format(bits)
    return f.qmin, f.qmax


# ----------------------------------------------------------------------------------- weights

class WeightQuantizer(nn.Module):
    """Fake-quantize one weight tensor; see the module docstring for the math."""

    def __init__(self, weight: torch.Tensor, bits: int, symmetric: bool = True, group_size: int = 0,
                 rounding: str = "nearest", scale_mode: str = "fixed"):
        super().__init__()
        if rounding not in ("nearest", "adaround"):
            raise ConfigError(f"unknown rounding {rounding!r}; valid: nearest, adaround")
        if group_size and weight.dim() != 2:
            raise ConfigError("group_size applies to linear weights (2-D); convolutions use per channel")
        if scale_mode not in ("fixed", "lsq", "absmax"):
            raise ConfigError(f"unknown scale_mode {scale_mode!r}; valid: fixed, lsq, absmax")
        if scale_mode == "absmax" and not symmetric:
            raise ConfigError("scale_mode='absmax' is symmetric only")
        self.bits, self.symmetric, self.group_size, self.rounding = bits, symmetric, group_size, rounding
        self.scale_mode = scale_mode
        self.fmt = int_format(bits)
        self.qmin, self.qmax = weight_qrange(bits, symmetric)
        self.granularity = per_group(group_size) if group_size else per_channel(0)
        wb = to_blocks(weight.detach().float(), self.granularity)  # (pairs..., block)
        self.pshape = wb.shape[:-1]
        scale, zp = self._search_init(wb)
        self.scale = nn.Parameter(scale.to(torch.float16).float(), requires_grad=scale_mode == "lsq")
        self.register_buffer("zero_point", zp)
        self.n_per_scale = wb.shape[-1]
        self.hard = True
        if rounding == "adaround":
            rest = wb / scale.unsqueeze(-1) - torch.floor(wb / scale.unsqueeze(-1))  # in [0, 1)
            # h(V) = rest  <=>  V = -log((zeta - gamma) / (rest - gamma) - 1)
            self.alpha = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))
            self.hard = False

    def _search_init(self, wb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per pair, the clipping ratio of the range with the least squared weight error."""
        best_err = torch.full(wb.shape[:-1], float("inf"))
        best_s = torch.zeros(wb.shape[:-1])
        best_zp = torch.zeros(wb.shape[:-1])
        lo, hi = wb.amin(-1).clamp(max=0), wb.amax(-1).clamp(min=0)
        for r in CLIP_RATIOS.tolist():
            if self.symmetric:
                s = torch.maximum(-lo * r / -self.qmin, hi * r / self.qmax)
                zp = torch.zeros_like(s)
            else:
                s = (hi - lo) * r / (self.qmax - self.qmin)
                zp = (self.qmin - torch.round(lo * r / s.clamp_min(1e-12))).clamp(self.qmin, self.qmax)
            s = s.clamp_min(1e-8).to(torch.float16).float()
            q = (torch.round(wb / s[..., None]) + zp[..., None]).clamp(self.qmin, self.qmax)
            err = ((q - zp[..., None]) * s[..., None] - wb).pow(2).sum(-1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s = torch.where(better, s, best_s)
            best_zp = torch.where(better, zp, best_zp)
        return best_s, (None if self.symmetric else best_zp.to(torch.int32))

    def h(self) -> torch.Tensor:
        """AdaRound's rectified sigmoid, in [0, 1]."""
        return torch.clamp(torch.sigmoid(self.alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def regulariser(self, beta: float) -> torch.Tensor:
        """``sum(1 - |2 h(V) - 1|^beta)``: pushes every h to 0 or 1 as beta anneals down."""
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()

    def harden(self) -> None:
        """AdaRound: fix each rounding to the side h(V) chose."""
        self.hard = True

    def _absmax_scale(self, wb: torch.Tensor) -> torch.Tensor:
        absmax = wb.detach().abs().amax(-1)
        return (absmax / self.qmax).clamp_min(1e-8).to(torch.float16).float()

    def effective_scale(self, wb: torch.Tensor | None = None) -> torch.Tensor:
        if self.scale_mode == "absmax" and wb is not None:
            return self._absmax_scale(wb)
        s = self.scale
        if self.scale_mode == "lsq":
            s = _GradScale.apply(s, 1.0 / math.sqrt(self.n_per_scale * self.qmax))
        return _Fp16STE.apply(s)

    @torch.no_grad()
    def freeze_scale(self, w: torch.Tensor) -> None:
        """Fix the scale an ``absmax`` quantizer would use for ``w`` now (before :meth:`codes`)."""
        if self.scale_mode == "absmax":
            self.scale.copy_(self._absmax_scale(to_blocks(w.detach().float(), self.granularity)))
            self.scale_mode = "fixed"

    def _levels(self, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """Codes (as floats, before the zero-point) for ``w`` in the blocks view."""
        if self.rounding == "adaround":
            base = torch.floor(w.detach() / s.detach())
            up = (self.alpha >= 0).float() if self.hard else self.h()
            return base + up
        return round_ste(w / s)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        wb = to_blocks(w, self.granularity)  # (pairs..., block)
        s = self.effective_scale(wb).unsqueeze(-1)
        q = self._levels(wb, s)
        if self.zero_point is not None:
            zp = self.zero_point.float().unsqueeze(-1)
            out = (torch.clamp(q + zp, self.qmin, self.qmax) - zp) * s
        else:
            out = torch.clamp(q, self.qmin, self.qmax) * s
        return from_blocks(out, w.shape, self.granularity)

    @torch.no_grad()
    def codes(self, w: torch.Tensor) -> torch.Tensor:
        """Integer codes (int8, weight layout) of the hardened quantizer."""
        self.freeze_scale(w)
        wb = to_blocks(w.detach().float(), self.granularity)
        s = self.scale.to(torch.float16).float().unsqueeze(-1)
        if self.rounding == "adaround":
            q = torch.floor(wb / s) + (self.alpha >= 0).float()
        else:
            q = torch.round(wb / s)
        if self.zero_point is not None:
            q = q + self.zero_point.float().unsqueeze(-1)
        return from_blocks(q.clamp(self.qmin, self.qmax).to(torch.int8), w.shape, self.granularity)

    def qparams(self) -> QParams:
        """The stored (fp16-rounded) scale and zero-point, in :func:`lowbit.core.param_shape` layout."""
        s = self.scale.detach().to(torch.float16).float()
        return QParams(self.fmt, self.granularity, s, self.zero_point, self.qmin, self.qmax)

    def extra_repr(self) -> str:
        gran = f"g{self.group_size}" if self.group_size else "per-channel"
        return (f"int{self.bits} {gran} {'sym' if self.symmetric else 'affine'}, rounding={self.rounding}"
                f"{' (soft)' if not self.hard else ''}, scale={self.scale_mode}")


# ------------------------------------------------------------------------------- activations

class ActQuantizer(nn.Module):
    """Per-tensor affine activation fake quantizer: observe -> init -> quantize (fixed / LSQ / PACT)."""

    def __init__(self, bits: int, learn: str = "none", observer: str = "mse", name: str = ""):
        super().__init__()
        if learn not in ("none", "lsq", "pact"):
            raise ConfigError(f"unknown activation learning {learn!r}; valid: none, lsq, pact")
        self.bits, self.learn, self.name, self.observer_name = bits, learn, name, observer
        self.fmt = int_format(bits)
        self.qmin, self.qmax = self.fmt.qmin, self.fmt.qmax
        self.scale = nn.Parameter(torch.ones(()), requires_grad=learn == "lsq")
        self.alpha = nn.Parameter(torch.ones(()), requires_grad=learn == "pact")  # PACT clip (upper)
        self.register_buffer("zero_point", torch.zeros((), dtype=torch.int32))
        self.mode = "observe"
        self.drop_prob = 0.0
        self.numel = 1
        self._observer = None

    def _make_observer(self):
        try:  # the calibration observers of lowbit.observers (min-max, MSE, percentile, KL)
            from lowbit.observers import make_observer

            return make_observer(self.observer_name, self.fmt, symmetric=False)
        except ImportError:  # pragma: no cover - observers are part of lowbit
            from lowbit.observers.minmax import MinMaxObserver

            return MinMaxObserver(self.fmt, False)

    @torch.no_grad()
    def init_from_observer(self) -> None:
        if self._observer is None or self._observer.n_batches == 0:
            raise CalibrationError(f"activation quantizer {self.name!r} saw no calibration data "
                                   "(is the layer reached by the forward pass?)")
        lo, hi = self._observer.compute_range()
        self.set_range(lo.reshape(()), hi.reshape(()))
        self._observer = None
        self.mode = "quantize"

    @torch.no_grad()
    def set_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        lo, hi = torch.clamp(lo.float(), max=0), torch.clamp(hi.float(), min=0)
        if self.learn == "pact" and lo < 0:
            log.info("PACT clips to [0, alpha] but layer %r sees negative inputs (min %.3g): LSQ for this one",
                     self.name, float(lo))
            self.learn = "lsq"
            self.alpha.requires_grad_(False)
            self.scale.requires_grad_(True)
        if self.learn == "pact":
            self.alpha.fill_(max(float(hi), 1e-4))
            self.zero_point.fill_(self.qmin)
            self.scale.fill_(float(self.alpha) / (self.qmax - self.qmin))
            return
        s = max(float(hi - lo) / (self.qmax - self.qmin), 1e-8)
        self.scale.fill_(s)
        self.zero_point.fill_(int(max(self.qmin, min(self.qmax, self.qmin - round(float(lo) / s)))))

    def effective_scale(self) -> torch.Tensor:
        if self.learn == "pact":
            return (self.alpha / (self.qmax - self.qmin)).clamp_min(1e-8)
        s = self.scale
        if self.learn == "lsq":
            s = _GradScale.apply(s, 1.0 / math.sqrt(self.numel * self.qmax))
        return s.clamp_min(1e-8)

    def qparams(self) -> QParams:
        s = self.effective_scale().detach().clone()
        return QParams(self.fmt, per_tensor(), s, self.zero_point.clone(), self.qmin, self.qmax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "float":
            return x
        if self.mode == "observe":
            if not torch.isfinite(x).all():
                raise CalibrationError(f"non-finite (NaN/inf) activation entering layer {self.name!r}")
            if self._observer is None:
                self._observer = self._make_observer()
            self._observer.observe(x)
            return x
        self.numel = x[0].numel()
        s = self.effective_scale()
        zp = self.zero_point.float()
        if self.learn == "pact":  # y = clip(x, 0, alpha): d y / d alpha = 1 where x >= alpha
            x_in = torch.minimum(F.relu(x), self.alpha)
            s = s.detach()  # PACT: alpha gets its gradient through the clip only (STE on rounding)
        else:
            x_in = x
        q = torch.clamp(round_ste(x_in / s) + zp, self.qmin, self.qmax)
        out = (q - zp) * s
        if self.drop_prob > 0:  # QDrop: keep each element in float with probability drop_prob
            keep_float = torch.rand_like(x) < self.drop_prob
            out = torch.where(keep_float, x, out)
        return out

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes of ``x`` with the current qparams (no drop)."""
        s = self.effective_scale().detach()
        x_in = torch.minimum(F.relu(x), self.alpha.detach()) if self.learn == "pact" else x
        return torch.clamp(torch.round(x_in / s) + self.zero_point, self.qmin, self.qmax).to(torch.int8)

    def extra_repr(self) -> str:
        return f"{self.name}: uint{self.bits}-affine per-tensor, learn={self.learn}, mode={self.mode}"


# ------------------------------------------------------------------------------------ layers

class QuantLayer(nn.Module):
    """A Conv2d / Linear with a fake-quantized weight and (optionally) a fake-quantized input."""

    def __init__(self, module: nn.Module, wq: nn.Module, aq: ActQuantizer | None, name: str = ""):
        super().__init__()
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            raise ConfigError(f"QuantLayer wraps Conv2d or Linear, got {type(module).__name__}")
        self.module, self.wq, self.aq, self.name = module, wq, aq, name

    def quantized_weight(self) -> torch.Tensor:
        return self.wq(self.module.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.aq is not None:
            x = self.aq(x)
        w = self.quantized_weight()
        if isinstance(self.module, nn.Conv2d):
            return self.module._conv_forward(x, w, self.module.bias)
        return F.linear(x, w, self.module.bias)
