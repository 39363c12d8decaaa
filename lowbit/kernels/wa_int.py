"""Integer W{b}A{a} linear: b-bit group-wise weights x a-bit per-token activations, int32 accumulation.

Options (QuaRot's A4 recipe): ``act_clip`` shrinks each token's range, ``act_per_group`` gives each
token one grid per weight group (scales ``s_x`` (M, G)), ``act_symmetric=False`` uses an affine grid
whose zero-point is corrected exactly in int32: ``sum_k (q_x - z) q_W = acc - z * sum_k q_W``.

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


def quantize_tokens(x: torch.Tensor, act_bits: int, act_clip: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) float -> int8 codes (M, K) in [-qmax, qmax] and fp32 scales (M, 1).

    ``act_clip`` < 1 shrinks each token's range to ``act_clip * max|x|`` (values beyond saturate):
    finer steps for the bulk of the channels at the cost of clipping the largest (QuaRot clips A4 at 0.9)."""
    qmax = 2 ** (act_bits - 1) - 1
    scale = (act_clip * x.abs().amax(dim=-1, keepdim=True) / qmax).clamp_min(ACT_SCALE_EPS)
    return torch.round(x / scale).clamp_(-qmax, qmax).to(torch.int8), scale


def quantize_tokens_affine(x: torch.Tensor, act_bits: int, act_clip: float = 1.0):
    """(..., n) float -> centred affine codes ``q - 2^(a-1)`` (int8), scales and centred zero-points (..., 1).

    Range ``[lo, hi] = act_clip * [min(x, 0), max(x, 0)]`` per row, ``s = (hi - lo) / (2^a - 1)``,
    ``z = clamp(round(-lo / s), 0, 2^a - 1)``, ``q = clamp(round(x / s) + z, 0, 2^a - 1)``; ``x ~ s (q - z)``.
    Centring by ``2^(a-1)`` keeps codes and zero-points in int8 for a <= 8."""
    levels = 2 ** act_bits - 1
    half = 2 ** (act_bits - 1)
    lo = act_clip * x.amin(dim=-1, keepdim=True).clamp_max(0)
    hi = act_clip * x.amax(dim=-1, keepdim=True).clamp_min(0)
    scale = ((hi - lo) / levels).clamp_min(ACT_SCALE_EPS)
    zp = torch.round(-lo / scale).clamp_(0, levels)
    q = (torch.round(x / scale) + zp).clamp_(0, levels)
    return (q - half).to(torch.int8), scale, (zp - half).to(torch.int32)


def _epilogue(accs, w_scale, s_x, zp, colsum, bias, out_dtype, shape):
    """``y = sum_j (acc_j - zp_j * colsum_j) * s_W[:, j] * s_x`` with ``s_x`` / ``zp`` per token (M, 1)
    or per token and group (M, G); ``colsum_j`` (N,) = sum of group j's weight codes per output."""
    per_group = s_x.shape[1] > 1
    y = None
    for j, acc in enumerate(accs):
        if zp is not None:
            acc = acc - zp[:, j if per_group else 0, None] * colsum[j]  # (M, N) int32, exact
        part = acc.float() * w_scale[:, j]  # (M, N)
        if per_group:
            part = part * s_x[:, j:j + 1]
        y = part if y is None else y + part
    if not per_group:
        y = y * s_x
    if bias is not None:
        y = y + bias
    return y.to(out_dtype).reshape(*shape[:-1], -1)


def _activation_codes(x: torch.Tensor, act_bits: int, smooth_inv: torch.Tensor | None, act_clip: float = 1.0,
                      group_size: int = 0, act_symmetric: bool = True):
    """Codes (M, K), scales and zero-points (None when symmetric) of ``x * smooth_inv``, x flattened to
    (M, K), one grid per token (``group_size`` 0) or per token and group of ``group_size`` columns
    (scales (M, K / group_size)): shared by both twins."""
    x2 = x.reshape(-1, x.shape[-1]).float()  # (M, K)
    if smooth_inv is not None:
        x2 = x2 * smooth_inv
    m, k = x2.shape
    g = group_size or k
    xg = x2.reshape(m, k // g, g)  # (M, G, g)
    if act_symmetric:
        q, s = quantize_tokens(xg, act_bits, act_clip)
        zp = None
    else:
        q, s, zp = quantize_tokens_affine(xg, act_bits, act_clip)
        zp = zp[..., 0]  # (M, G)
    return q.reshape(m, k), s[..., 0], zp  # s: (M, G)


def _colsum(qweight_t: torch.Tensor, g: int, n_groups: int) -> torch.Tensor:
    """Per group j, the column sums of the weight codes (G, N) int32 (zero-point correction)."""
    return qweight_t.reshape(n_groups, g, -1).to(torch.int32).sum(dim=1)


def wa_linear(x: torch.Tensor, qweight_t: torch.Tensor, w_scale: torch.Tensor, group_size: int, act_bits: int,
              bias: torch.Tensor | None, smooth_inv: torch.Tensor | None = None, act_clip: float = 1.0,
              act_per_group: bool = False, act_symmetric: bool = True,
              colsum: torch.Tensor | None = None) -> torch.Tensor:
    """Fast path. ``qweight_t`` int8 (K, N); ``w_scale`` fp32 (N, G) with ``G = K / group_size``;
    ``act_per_group``: one activation grid per token and weight group; ``colsum`` (G, N): precomputed
    :func:`_colsum` for affine activations (computed here when None)."""
    shape = x.shape
    g, n_groups = group_size, w_scale.shape[1]
    q, s_x, zp = _activation_codes(x, act_bits, smooth_inv, act_clip, g if act_per_group else 0, act_symmetric)
    if zp is not None and colsum is None:
        colsum = _colsum(qweight_t, g, n_groups)
    accs = [torch._int_mm(q[:, j * g:(j + 1) * g].contiguous(), qweight_t[j * g:(j + 1) * g])
            for j in range(n_groups)]  # G x (M, N) int32
    return _epilogue(accs, w_scale, s_x, zp, colsum, bias, x.dtype, shape)


def wa_linear_ref(x: torch.Tensor, qweight_t: torch.Tensor, w_scale: torch.Tensor, group_size: int, act_bits: int,
                  bias: torch.Tensor | None, smooth_inv: torch.Tensor | None = None, act_clip: float = 1.0,
                  act_per_group: bool = False, act_symmetric: bool = True,
                  colsum: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: the same integer products in int64 by a plain matmul, same epilogue (``colsum`` ignored:
    recomputed from the codes)."""
    shape = x.shape
    g, n_groups = group_size, w_scale.shape[1]
    q, s_x, zp = _activation_codes(x, act_bits, smooth_inv, act_clip, g if act_per_group else 0, act_symmetric)
    sums = None if zp is None else torch.stack([qweight_t[j * g:(j + 1) * g].long().sum(0)
                                                 for j in range(n_groups)]).to(torch.int32)
    accs = [(q[:, j * g:(j + 1) * g].long() @ qweight_t[j * g:(j + 1) * g].long()).to(torch.int32)
            for j in range(n_groups)]
    return _epilogue(accs, w_scale, s_x, zp, sums, bias, x.dtype, shape)


def example_wa_linear(seed: int) -> dict:
    """Registry example: W4 g32 codes x A8 tokens with smoothing; the twins must agree bit-exactly."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 9, 96, generator=g)  # (B, T, K)
    qw_t = torch.randint(-7, 8, (96, 40), generator=g, dtype=torch.int8)  # (K, N)
    w_scale = torch.rand(40, 3, generator=g) * 0.1  # (N, K / 32)
    bias = torch.randn(40, generator=g)
    smooth_inv = torch.rand(96, generator=g) + 0.5
    # seeds cycle A8/A4, clip 1 / 0.9 / 0.8, per token / per token and group, symmetric / affine
    args = (x, qw_t, w_scale, 32, 8 - 4 * (seed % 2), bias, smooth_inv, 1.0 - 0.1 * (seed % 3), bool(seed // 2 % 2),
            seed // 4 % 2 == 0)
    return {"fast": args, "reference": args, "exact": True, "tol": 0.0}
