"""Quantize, dequantize and fake-quantize, with the exact formulas.

Uniform formats (MISSION A.1):

- symmetric / absmax: ``scale = absmax / qmax``, ``q = clamp(round(x / scale), -qmax, qmax)``;
  0.0 maps to code 0 exactly. The range is the restricted one, ``[-127, 127]`` for int8 (the seed
  notes' example), so the grid is symmetric about 0.
- affine / asymmetric: the range ``[a, b] = [min(x, 0), max(x, 0)]``,
  ``scale = (b - a) / (qmax - qmin)``, ``zero_point = clamp(qmin - round(a / scale), qmin, qmax)``,
  ``q = clamp(round(x / scale) + zero_point, qmin, qmax)``, ``x ≈ scale * (q - zero_point)``.
  ``round`` is round-half-to-even; adding the integer zero-point after rounding (not before) is what
  makes the codes bit-identical to ``torch.quantize_per_tensor``.

Codebook formats (A.2): ``scale = absmax / max|level|`` (``mean|x|`` for binary, XNOR-Net), and
``q = argmin_i |x / scale - level_i|``. Float formats (FP8): ``scale = absmax / max_finite``, then a
round-to-nearest-even cast. Casts (fp16, bf16): the dtype conversion, no scale.

``fake_quantize`` returns ``dequantize(quantize(x))`` with the straight-through estimator:
``dL/dx = dL/dy`` inside the representable range and 0 outside it (clipped values get no gradient).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.core.formats import Format, Kind, get_format
from lowbit.core.granularity import Granularity, PerTensor, from_blocks, param_shape, to_blocks
from lowbit.errors import ConfigError

# Smallest scale we allow: an all-zero block still gets a valid, finite scale.
SCALE_EPS = torch.finfo(torch.float32).eps


@dataclass
class QParams:
    """Everything needed to map between floats and codes for one tensor.

    ``scale`` / ``zero_point`` have the compact shape of :func:`param_shape`; ``zero_point`` is None
    for symmetric schemes. ``qmin`` / ``qmax`` are the code range actually used (restricted for
    symmetric). ``codebook`` holds the levels of codebook formats: ``(L,)`` shared or ``(C, L)``
    per channel (k-means).
    """

    fmt: Format
    granularity: Granularity
    scale: torch.Tensor | None
    zero_point: torch.Tensor | None = None
    qmin: int | None = None
    qmax: int | None = None
    codebook: torch.Tensor | None = None

    @property
    def symmetric(self) -> bool:
        return self.zero_point is None


def _code_dtype(fmt: Format) -> torch.dtype:
    if fmt.kind is Kind.UNIFORM and fmt.signed:
        return torch.int8
    return torch.uint8


def _as_blocks_param(p: torch.Tensor, xb: torch.Tensor) -> torch.Tensor:
    """Reshape a compact scale/zero_point so it broadcasts over the blocks view ``(pairs..., block)``."""
    return p.reshape(*xb.shape[:-1], 1)


def qparams_from_range(
    min_val: torch.Tensor,
    max_val: torch.Tensor,
    fmt: str | Format = "int8",
    symmetric: bool = True,
    granularity: Granularity = PerTensor(),
) -> QParams:
    """Scale and zero-point from an observed range (per pair: tensors of the compact param shape)."""
    fmt = get_format(fmt)
    min_val = min_val.float()
    max_val = max_val.float()
    if fmt.kind is Kind.CAST:
        return QParams(fmt, granularity, None)
    if fmt.kind is not Kind.UNIFORM:
        if not symmetric:
            raise ConfigError(f"format {fmt.name!r} is symmetric only; use symmetric=True")
        absmax = torch.maximum(min_val.abs(), max_val.abs())
        scale = (absmax / fmt.max_level).clamp_min(SCALE_EPS)
        cb = fmt.codebook_tensor() if fmt.kind is Kind.CODEBOOK else None
        return QParams(fmt, granularity, scale, codebook=cb)
    if symmetric:
        if not fmt.signed:
            raise ConfigError(f"format {fmt.name!r} is unsigned: use affine (symmetric=False) or a signed int format")
        qmax = fmt.qmax
        qmin = fmt.qmin if fmt.name == "ternary" else -qmax
        absmax = torch.maximum(min_val.abs(), max_val.abs())
        scale = (absmax / qmax).clamp_min(SCALE_EPS)
        return QParams(fmt, granularity, scale, None, qmin, qmax)
    qmin, qmax = fmt.qmin, fmt.qmax
    a = torch.minimum(min_val, torch.zeros_like(min_val))
    b = torch.maximum(max_val, torch.zeros_like(max_val))
    scale = ((b - a) / (qmax - qmin)).clamp_min(SCALE_EPS)
    zero_point = (qmin - torch.round(a / scale)).clamp(qmin, qmax).to(torch.int32)
    return QParams(fmt, granularity, scale, zero_point, qmin, qmax)


def choose_qparams(
    x: torch.Tensor,
    fmt: str | Format = "int8",
    symmetric: bool = True,
    granularity: Granularity = PerTensor(),
) -> QParams:
    """Choose (scale, zero_point) for ``x`` from its min/max (absmax if symmetric) per granularity."""
    fmt = get_format(fmt)
    xb = to_blocks(x.detach().float(), granularity)  # (pairs..., block)
    pshape = param_shape(x.shape, granularity)
    if fmt.name == "binary":
        # XNOR-Net: alpha = mean|x| minimises ||x - alpha * sign(x)||^2.
        scale = xb.abs().mean(dim=-1).reshape(pshape).clamp_min(SCALE_EPS)
        return QParams(fmt, granularity, scale, codebook=fmt.codebook_tensor())
    min_val = xb.amin(dim=-1).reshape(pshape)
    max_val = xb.amax(dim=-1).reshape(pshape)
    return qparams_from_range(min_val, max_val, fmt, symmetric, granularity)


def _nearest_level(y: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codebook level for each element of ``y`` (ties go to the lower level).

    ``codebook`` is sorted: ``(L,)`` shared, or ``(C, L)`` with ``y`` of shape ``(C, n)``.
    """
    mids = (codebook[..., 1:] + codebook[..., :-1]) / 2  # (..., L - 1)
    if codebook.dim() == 1:
        return torch.bucketize(y, mids)
    return torch.searchsorted(mids.contiguous(), y.contiguous())


def quantize(x: torch.Tensor, qp: QParams) -> torch.Tensor:
    """Float tensor -> integer codes (int8 for signed uniform formats, uint8 otherwise).

    For a ``cast`` format the result is the cast tensor itself (fp16 / bf16).
    """
    fmt = qp.fmt
    if fmt.kind is Kind.CAST:
        return x.to(fmt.dtype)
    xb = to_blocks(x.detach().float(), qp.granularity)  # (pairs..., block)
    scale = _as_blocks_param(qp.scale, xb)
    if fmt.kind is Kind.UNIFORM:
        q = torch.round(xb / scale)
        if qp.zero_point is not None:
            q = q + _as_blocks_param(qp.zero_point, xb)
        q = q.clamp(qp.qmin, qp.qmax)
    elif fmt.kind is Kind.CODEBOOK:
        cb = qp.codebook
        q = _nearest_level(xb / scale, cb.reshape(*xb.shape[:-1], cb.shape[-1]) if cb.dim() > 1 else cb)
    else:  # FLOAT
        top = fmt.max_level
        q = (xb / scale).clamp(-top, top).to(fmt.dtype).view(torch.uint8)
        return from_blocks(q, x.shape, qp.granularity)
    return from_blocks(q.to(_code_dtype(fmt)), x.shape, qp.granularity)


def dequantize(q: torch.Tensor, qp: QParams, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Codes -> floats: ``scale * (q - zero_point)``, ``scale * codebook[q]`` or the float decode."""
    fmt = qp.fmt
    if fmt.kind is Kind.CAST:
        return q.to(dtype)
    qb = to_blocks(q, qp.granularity)  # (pairs..., block)
    scale = _as_blocks_param(qp.scale, qb)
    if fmt.kind is Kind.UNIFORM:
        v = qb.float()
        if qp.zero_point is not None:
            v = v - _as_blocks_param(qp.zero_point, qb).float()
    elif fmt.kind is Kind.CODEBOOK:
        cb = qp.codebook
        if cb.dim() == 1:
            v = cb[qb.long()]
        else:
            v = torch.gather(cb.reshape(*qb.shape[:-1], cb.shape[-1]), -1, qb.long())
    else:  # FLOAT
        v = qb.contiguous().view(fmt.dtype).float()
    return from_blocks(v * scale, q.shape, qp.granularity).to(dtype)


def representable_range(qp: QParams) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pair (compact shape): the lowest and highest value the quantizer can output."""
    fmt = qp.fmt
    if fmt.kind is Kind.UNIFORM:
        zp = qp.zero_point.float() if qp.zero_point is not None else torch.zeros_like(qp.scale)
        return qp.scale * (qp.qmin - zp), qp.scale * (qp.qmax - zp)
    if fmt.kind is Kind.CODEBOOK:
        lo, hi = qp.codebook[..., 0], qp.codebook[..., -1]
        return qp.scale * lo, qp.scale * hi
    top = fmt.max_level
    return -qp.scale * top, qp.scale * top


class _FakeQuantizeSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, qp: QParams) -> torch.Tensor:
        y = dequantize(quantize(x, qp), qp, dtype=x.dtype)
        if qp.fmt.kind is Kind.CAST:
            mask = torch.ones_like(x, dtype=torch.bool)
        else:
            lo, hi = representable_range(qp)
            xb = to_blocks(x.detach(), qp.granularity)  # (pairs..., block)
            inside = (xb >= _as_blocks_param(lo, xb)) & (xb <= _as_blocks_param(hi, xb))
            mask = from_blocks(inside, x.shape, qp.granularity)
        ctx.save_for_backward(mask)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (mask,) = ctx.saved_tensors
        return grad * mask, None


def fake_quantize(x: torch.Tensor, qp: QParams) -> torch.Tensor:
    """``dequantize(quantize(x))`` in ``x``'s dtype, with a straight-through gradient (zero when clipped)."""
    return _FakeQuantizeSTE.apply(x, qp)
