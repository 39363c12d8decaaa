"""Integer-only transformer operators of I-BERT (Kim et al. 2021, "I-BERT: Integer-only BERT Quantization").

Every function takes integer codes ``q`` (int64 tensors) with a real scale ``S`` (a Python float,
known offline) and returns ``(codes, S_out)``. The scales only fix integer constants ahead of time;
at run time everything is integer arithmetic (add, multiply, shift, integer division, compare).

- :func:`i_poly`: ``a (x + b)^2 + c`` as ``(q + floor(b/S))^2 + floor(c / (a S^2))`` at scale ``a S^2``.
- :func:`i_gelu`: ``GELU(x) = x/2 (1 + erf(x / sqrt 2))`` with ``erf`` replaced by the
  second-order polynomial ``L(x) = sgn(x) [a (min(|x|, -b) + b)^2 + 1]``, ``a = -0.2888, b = -1.769``
  (max abs error of the float approximation ~0.018 on GELU).
- :func:`i_exp`: for ``x <= 0``, ``x = -ln2 z + p`` with ``p`` in (-ln2, 0]: ``exp(x) = L(p) >> z``,
  ``L(p) = 0.3585 (p + 1.353)^2 + 0.344``.
- :func:`i_softmax`: subtract the row max, ``i_exp``, then an integer division by the row sum to
  ``out_max`` levels (probabilities at scale ``1 / out_max``); masked entries get exactly 0.
- :func:`i_sqrt`: ``floor(sqrt(n))`` by Newton's iteration on integers (I-BERT Algorithm 4).
- :func:`i_layernorm`: integer mean and variance, ``i_sqrt`` for the standard deviation, the
  normalised value as a fixed-point number with ``frac_bits`` fractional bits, then integer gamma /
  beta at a scale chosen so the result stays inside int32 for requantization.
"""

from __future__ import annotations

import math

import torch

GELU_A, GELU_B, GELU_C = -0.2888, -1.769, 1.0
EXP_A, EXP_B, EXP_C = 0.3585, 1.353, 0.344
LN2 = math.log(2.0)
MAX_EXP_SHIFT = 62  # exp of anything below -62 ln2 is 0 at any scale we use


def i_poly(q: torch.Tensor, s: float, a: float, b: float, c: float) -> tuple[torch.Tensor, float]:
    """``a (x + b)^2 + c`` for ``x = q s``: integer codes at scale ``a s^2``."""
    q_b = math.floor(b / s)
    q_c = math.floor(c / (a * s * s))
    return (q + q_b) ** 2 + q_c, a * s * s


def i_erf(q: torch.Tensor, s: float) -> tuple[torch.Tensor, float]:
    """Second-order approximation of erf (I-BERT Algorithm 2, inner part)."""
    sign = torch.sign(q)
    q_abs = torch.minimum(q.abs(), torch.full_like(q, math.floor(-GELU_B / s)))
    q_l, s_l = i_poly(q_abs, s, GELU_A, GELU_B, GELU_C)
    return sign * q_l, s_l


def i_gelu(q: torch.Tensor, s: float) -> tuple[torch.Tensor, float]:
    """Integer GELU: ``q (q_erf + floor(1 / S_erf))`` at scale ``s S_erf / 2``."""
    q_erf, s_erf = i_erf(q, s / math.sqrt(2.0))
    q_one = math.floor(1.0 / s_erf)
    return q * (q_erf + q_one), s * s_erf / 2.0


def i_exp(q: torch.Tensor, s: float) -> tuple[torch.Tensor, float]:
    """Integer exp for ``q <= 0`` (I-BERT Algorithm 3)."""
    q_ln2 = math.floor(LN2 / s)
    z = torch.div(-q, q_ln2, rounding_mode="floor")
    q_p = q + z * q_ln2  # in (-q_ln2, 0]
    q_l, s_l = i_poly(q_p, s, EXP_A, EXP_B, EXP_C)
    return q_l >> z.clamp(max=MAX_EXP_SHIFT), s_l


def i_softmax(q: torch.Tensor, s: float, mask: torch.Tensor | None = None, out_max: int = 127,
              dim: int = -1) -> torch.Tensor:
    """Integer softmax along ``dim``: codes in ``[0, out_max]`` at scale ``1 / out_max``.

    ``mask`` (broadcastable, bool/int, 1 = keep) zeroes excluded entries exactly, as an additive
    ``-inf`` would. Rounding: ``(e * out_max + sum / 2) // sum``.
    """
    if mask is not None:
        keep = mask.to(torch.bool)
        q = torch.where(keep, q, torch.full_like(q, torch.iinfo(torch.int64).min // 4))
    q = q - q.amax(dim=dim, keepdim=True)
    e, _ = i_exp(q, s)
    if mask is not None:
        e = torch.where(keep, e, torch.zeros_like(e))
    total = e.sum(dim=dim, keepdim=True).clamp(min=1)
    return torch.div(e * out_max + total // 2, total, rounding_mode="floor")


def _bit_length(n: torch.Tensor) -> torch.Tensor:
    """Number of bits of non-negative int64 values (0 for 0), by integer comparisons."""
    bits = torch.zeros_like(n)
    for k in range(63):
        bits += (n >> k > 0).to(n.dtype)
    return bits


def i_sqrt(n: torch.Tensor, iterations: int = 40) -> torch.Tensor:
    """``floor(sqrt(n))`` for non-negative int64 ``n``: Newton ``x <- (x + n // x) // 2`` from
    ``2^ceil(bits / 2)`` (always above the root), stopping per element when it stops decreasing."""
    x = torch.ones_like(n) << ((_bit_length(n) + 1) // 2)
    done = n == 0
    for _ in range(iterations):
        nxt = torch.div(x + torch.div(n, x.clamp(min=1), rounding_mode="floor"), 2, rounding_mode="floor")
        improved = (nxt < x) & ~done
        done = done | ~improved
        x = torch.where(improved, nxt, x)
        if bool(done.all()):
            break
    return torch.where(n == 0, torch.zeros_like(x), x)


def layernorm_constants(gamma: torch.Tensor, beta: torch.Tensor, s: float, eps: float = 1e-12,
                        frac_bits: int = 12, gamma_bits: int = 14) -> dict:
    """Offline: integer gamma / beta / eps for :func:`i_layernorm` on codes at scale ``s``.

    ``gamma_q = round(gamma 2^g)`` with ``g`` chosen so ``|gamma_q| < 2^gamma_bits``,
    ``beta_q = round(beta 2^(frac_bits + g))``, ``eps_q = round(eps / s^2)``; output scale ``2^-(frac_bits + g)``.
    """
    g = gamma_bits - max(0, math.ceil(math.log2(float(gamma.detach().abs().max()) + 1e-30)))
    return {
        "gamma_q": torch.round(gamma.detach().double() * 2.0**g).to(torch.int64),
        "beta_q": torch.round(beta.detach().double() * 2.0 ** (frac_bits + g)).to(torch.int64),
        "eps_q": round(eps / (s * s)),
        "frac_bits": frac_bits,
        "scale": 2.0 ** -(frac_bits + g),
    }


def i_layernorm(q: torch.Tensor, gamma_q: torch.Tensor, beta_q: torch.Tensor, eps_q: int = 0,
                frac_bits: int = 12, **_) -> torch.Tensor:
    """Integer LayerNorm over the last dim of int64 codes ``q`` (see :func:`layernorm_constants`).

    ``y = ((q - mean) << frac_bits) // isqrt(var + eps_q)`` is the normalised value at scale
    ``2^-frac_bits`` (the input scale cancels); the result ``y gamma_q + beta_q`` is at the scale
    :func:`layernorm_constants` returns. Keep ``|q| < 2^24`` so the variance is exact in int64.
    """
    c = q.shape[-1]
    mean = torch.div(q.sum(dim=-1, keepdim=True), c, rounding_mode="floor")
    xc = q - mean
    var = torch.div((xc * xc).sum(dim=-1, keepdim=True), c, rounding_mode="floor") + eps_q
    std = i_sqrt(var).clamp(min=1)
    y = torch.div(xc << frac_bits, std, rounding_mode="floor")  # (..., C) at 2^-frac_bits
    return y * gamma_q + beta_q
