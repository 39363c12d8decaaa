"""Integer W{b}A{a} linear: b-bit group-wise weights x a-bit per-token activations, int32 accumulation.

For activations ``x`` (M, K) (already multiplied by the SmoothQuant ``smooth_inv`` if any) and weight
codes ``q_W`` (N, K) with one scale per (row, group of ``g`` input columns):

    s_x[m] = max_k |x[m, k]| / qmax_a,   q_x = clamp(round(x / s_x), -qmax_a, qmax_a)   (per token)
    acc_j  = q_x[:, G_j] @ q_W[:, G_j]^T            (int32, exact, one product per group G_j)
    y      = s_x * sum_j acc_j * s_W[:, j] + bias

``qmax_a = 2^(a-1) - 1`` (127 for 8 bits, 7 for 4 bits). The fast path runs each group's product
through ``torch._int_mm`` (int8 storage holds any code of <= 8 bits); the reference computes the
same products in int64 with a plain matmul and the identical float epilogue, so the two agree
bit-exactly.
"""

from __future__ import annotations

import torch

ACT_SCALE_EPS = torch.finfo(torch.float32).eps


def quantize_tokens(x: torch.Tensor, act_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) float -> int8 codes (M, K) in [-qmax, qmax] and fp32 scales (M, 1)."""
    qmax = 2 ** (act_bits - 1) - 1
    scale = (x.abs().amax(dim=-1, keepdim=True) / qmax).clamp_min(ACT_SCALE_EPS)
    return torch.round(x / scale).clamp_(-qmax, qmax).to(torch.int8), scale


def _epilogue(accs, w_scale, s_x, bias, out_dtype, shape):
    y = None
    for j, acc in enumerate(accs):
        part = acc.float() * w_scale[:, j]  # (M, N)
        y = part if y is None else y + part
    y = y * s_x
    if bias is not None:
        y = y + bias
    return y.to(out_dtype).reshape(*shape[:-1], -1)


def _activation_codes(x: torch.Tensor, act_bits: int, smooth_inv: torch.Tensor | None):
    """Per-token codes (M, K) and scales of ``x * smooth_inv``, x flattened to (M, K): shared by both twins."""
    x2 = x.reshape(-1, x.shape[-1]).float()  # (M, K)
    if smooth_inv is not None:
        x2 = x2 * smooth_inv
    return quantize_tokens(x2, act_bits)


def wa_linear(x: torch.Tensor, qweight_t: torch.Tensor, w_scale: torch.Tensor, group_size: int, act_bits: int,
              bias: torch.Tensor | None, smooth_inv: torch.Tensor | None = None) -> torch.Tensor:
    """Fast path. ``qweight_t`` int8 (K, N); ``w_scale`` fp32 (N, G) with ``G = K / group_size``."""
    shape = x.shape
    q, s_x = _activation_codes(x, act_bits, smooth_inv)
    g = group_size
    accs = [torch._int_mm(q[:, j * g:(j + 1) * g].contiguous(), qweight_t[j * g:(j + 1) * g])
            for j in range(w_scale.shape[1])]  # G x (M, N) int32
    return _epilogue(accs, w_scale, s_x, bias, x.dtype, shape)


def wa_linear_ref(x: torch.Tensor, qweight_t: torch.Tensor, w_scale: torch.Tensor, group_size: int, act_bits: int,
                  bias: torch.Tensor | None, smooth_inv: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: the same integer products in int64 by a plain matmul, same epilogue."""
    shape = x.shape
    q, s_x = _activation_codes(x, act_bits, smooth_inv)
    g = group_size
    accs = [(q[:, j * g:(j + 1) * g].long() @ qweight_t[j * g:(j + 1) * g].long()).to(torch.int32)
            for j in range(w_scale.shape[1])]
    return _epilogue(accs, w_scale, s_x, bias, x.dtype, shape)


def example_wa_linear(seed: int) -> dict:
    """Registry example: W4 g32 codes x A8 tokens with smoothing; the twins must agree bit-exactly."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 9, 96, generator=g)  # (B, T, K)
    qw_t = torch.randint(-7, 8, (96, 40), generator=g, dtype=torch.int8)  # (K, N)
    w_scale = torch.rand(40, 3, generator=g) * 0.1  # (N, K / 32)
    bias = torch.randn(40, generator=g)
    smooth_inv = torch.rand(96, generator=g) + 0.5
    args = (x, qw_t, w_scale, 32, 8 - 4 * (seed % 2), bias, smooth_inv)
    return {"fast": args, "reference": args, "exact": True, "tol": 0.0}
