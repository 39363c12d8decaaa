"""Fixed-point requantization, as gemmlowp and TensorFlow Lite define it (Jacob et al. 2018, section 2.2).

A real multiplier ``M = s_in * s_w / s_out`` (computed once, offline) is written as
``M = M0 * 2^shift`` with ``M0`` an int32 in ``[2^30, 2^31)`` (a Q0.31 number in [0.5, 1)). At run
time an int32 accumulator ``x`` becomes ``round(x * M)`` using integers only:

- ``saturating_rounding_doubling_high_mul(a, b)``: the high 32 bits of ``2 a b`` with
  round-half-away-from-zero (``nudge = 2^30`` or ``1 - 2^30``, then division by ``2^31`` truncating
  towards zero); the one overflow case ``a = b = -2^31`` saturates to ``2^31 - 1``;
- ``rounding_divide_by_pot(x, e)``: ``x / 2^e`` rounded to nearest, ties away from zero
  (``(x >> e) + (remainder > threshold)`` with ``threshold = mask/2 (+1 if x < 0)``);
- ``multiply_by_quantized_multiplier(x, M0, shift)``: left shift for ``shift > 0`` (multipliers
  above 1), then the high mul, then the rounding right shift.

Vectorised versions work on int64 tensors holding int32 values (per-channel ``M0`` / ``shift``
broadcast); the ``*_ref`` twins are scalar Python-int transcriptions of the C++ for tests.
"""

from __future__ import annotations

import math

import torch

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


# ------------------------------------------------------------------------------------- offline


def quantize_multiplier(real: float) -> tuple[int, int]:
    """TFLite ``QuantizeMultiplier``: ``real ~= M0 * 2^(shift - 31)``, ``M0`` in ``[2^30, 2^31)``."""
    if real < 0:
        raise ValueError(f"requantization multipliers are non-negative, got {real}")
    if real == 0.0:
        return 0, 0
    q, shift = math.frexp(real)  # real = q * 2^shift, q in [0.5, 1)
    q_fixed = round(q * (1 << 31))
    if q_fixed == (1 << 31):
        q_fixed //= 2
        shift += 1
    if shift < -31:  # below the resolution of the right shift: the multiplier is 0
        return 0, 0
    if shift > 30:
        return INT32_MAX, 30
    return int(q_fixed), int(shift)


def quantize_multipliers(real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel :func:`quantize_multiplier`: int64 tensors ``(M0, shift)`` of ``real``'s shape."""
    pairs = [quantize_multiplier(float(r)) for r in real.reshape(-1).double().tolist()]
    m0 = torch.tensor([p[0] for p in pairs], dtype=torch.int64).reshape(real.shape)
    shift = torch.tensor([p[1] for p in pairs], dtype=torch.int64).reshape(real.shape)
    return m0, shift


# ------------------------------------------------------------------------------- vectorised (int64)


def saturating_rounding_doubling_high_mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """gemmlowp ``SaturatingRoundingDoublingHighMul`` on int64 tensors holding int32 values."""
    ab = a * b  # |ab| < 2^62: exact in int64
    nudge = torch.where(ab >= 0, torch.full_like(ab, 1 << 30), torch.full_like(ab, 1 - (1 << 30)))
    high = torch.div(ab + nudge, 1 << 31, rounding_mode="trunc")
    overflow = (a == INT32_MIN) & (b == INT32_MIN)
    return torch.where(overflow, torch.full_like(high, INT32_MAX), high)


def rounding_divide_by_pot(x: torch.Tensor, exponent: torch.Tensor | int) -> torch.Tensor:
    """gemmlowp ``RoundingDivideByPOT``: ``x / 2^exponent`` to nearest, ties away from zero."""
    e = torch.as_tensor(exponent, dtype=torch.int64)
    mask = (torch.ones_like(e) << e) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (x < 0).to(torch.int64)
    return (x >> e) + (remainder > threshold).to(torch.int64)


def multiply_by_quantized_multiplier(x: torch.Tensor, m0: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """TFLite ``MultiplyByQuantizedMultiplier``: ``round(x * M0 * 2^(shift - 31))`` in integers.

    ``x`` int32/int64 values (int32 range); ``m0`` / ``shift`` broadcast against ``x`` (per channel on
    the last dim). The left shift saturates to the int32 range, as the int32 hardware op does.
    """
    x = x.to(torch.int64)
    left = shift.clamp(min=0)
    right = (-shift).clamp(min=0)
    x = (x << left).clamp(INT32_MIN, INT32_MAX)
    return rounding_divide_by_pot(saturating_rounding_doubling_high_mul(x, m0), right)


def requantize(acc: torch.Tensor, m0: torch.Tensor, shift: torch.Tensor, zero_point: int = 0,
               qmin: int = -128, qmax: int = 127) -> torch.Tensor:
    """int32 accumulators -> codes ``clamp(round(acc * M) + zero_point, qmin, qmax)`` (int64 out).

    A fused ReLU is ``qmin = zero_point`` (codes below the code of 0.0 are clamped to it).
    """
    return (multiply_by_quantized_multiplier(acc, m0, shift) + zero_point).clamp(qmin, qmax)


# -------------------------------------------------------------------------------- scalar references


def saturating_rounding_doubling_high_mul_ref(a: int, b: int) -> int:
    if a == b == INT32_MIN:
        return INT32_MAX
    ab = a * b
    nudge = (1 << 30) if ab >= 0 else 1 - (1 << 30)
    n = ab + nudge
    q = abs(n) >> 31  # C++ int64 division truncates towards zero
    return q if n >= 0 else -q


def rounding_divide_by_pot_ref(x: int, exponent: int) -> int:
    mask = (1 << exponent) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (1 if x < 0 else 0)
    return (x >> exponent) + (1 if remainder > threshold else 0)


def multiply_by_quantized_multiplier_ref(x: int, m0: int, shift: int) -> int:
    left, right = max(shift, 0), max(-shift, 0)
    x = min(max(x * (1 << left), INT32_MIN), INT32_MAX)
    return rounding_divide_by_pot_ref(saturating_rounding_doubling_high_mul_ref(x, m0), right)


def requantize_ref(acc: int, m0: int, shift: int, zero_point: int = 0, qmin: int = -128, qmax: int = 127) -> int:
    return min(max(multiply_by_quantized_multiplier_ref(acc, m0, shift) + zero_point, qmin), qmax)
