"""Weight-only linear kernels: integer weights, float activations.

- int8 per output channel: ``y = (x @ q^T) * s`` through ``aten._weight_int8pack_mm`` (bf16 only:
  with fp32 activations it is 10-70x slower, so the fast path casts activations to bf16).
- int4 (and int2/int3 codes, which fit) per group: ``aten._weight_int4pack_mm_for_cpu`` computes
  ``x @ W^T`` with ``W[n, k] = (u[n, k] - 8) * s[k // g, n] + z[k // g, n]`` for unsigned 4-bit
  ``u`` (measured: this is the layout's dequantization); :func:`int4_kernel_params` maps our codes
  and (scale, zero_point) onto it exactly.

The ``*_ref`` twins dequantize the weight in fp32 and call ``F.linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

INT4_GROUP_SIZES = (32, 64, 128, 256)
INT8_K_MULTIPLE = 16  # _weight_int8pack_mm returns garbage for K = 8, 24, 40 and crashes for K = 100 (measured)
INT4_N_MULTIPLE = 16  # _convert_weight_to_int4pack_for_cpu packs output rows in blocks of 16


def int8_weight_only_linear(x: torch.Tensor, qweight: torch.Tensor, scale_bf16: torch.Tensor,
                            bias: torch.Tensor | None) -> torch.Tensor:
    """``qweight`` int8 (N, K), ``scale_bf16`` (N,). Activations run in bf16."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16)  # (M, K)
    y = torch.ops.aten._weight_int8pack_mm(x2, qweight, scale_bf16)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(x.dtype).reshape(*shape[:-1], -1)


def int8_weight_only_linear_ref(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                                bias: torch.Tensor | None) -> torch.Tensor:
    w = qweight.float() * scale.float()[:, None]
    return F.linear(x.float(), w, None if bias is None else bias.float()).to(x.dtype)


def int4_kernel_params(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                       group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Convert our codes to the int4pack layout.

    ``codes`` (N, K) signed ints in [-8, 7] (symmetric, value ``q * s``) or affine ints with
    ``zero_point`` (N, K/g) (value ``(q - zp) * s``). With ``u = q + 8 - c`` stored and
    ``W = (u - 8) * s + z``: choose ``c = 0`` for signed codes and ``z = -zp * s``; for unsigned
    affine codes in [0, 15], ``u = q`` and ``z = (8 - zp) * s``.
    Returns (packed uint8 (N, K/2) in the kernel's layout, scales_and_zeros (K/g, N, 2) bf16).
    """
    if codes.dtype == torch.int8:  # signed codes: u = q + 8
        u = codes.to(torch.int32) + 8
        zp = zero_point.float() if zero_point is not None else torch.zeros_like(scale)
        z = -zp * scale
    else:  # unsigned affine codes 0..15: u = q
        u = codes.to(torch.int32)
        z = (8 - zero_point.float()) * scale
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u.contiguous(), 1)
    sz = torch.stack([scale.float().T, z.T], dim=-1).to(torch.bfloat16).contiguous()  # (K/g, N, 2)
    return packed, sz


def int4_weight_only_linear(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor,
                            group_size: int, bias: torch.Tensor | None) -> torch.Tensor:
    """Fast path over the int4pack layout; activations run in bf16."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16)  # (M, K)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, group_size, scales_and_zeros)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(x.dtype).reshape(*shape[:-1], -1)


def int4_weight_only_linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Reference: ``F.linear`` with the fp32 dequantized weight (N, K)."""
    return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)


def _example_weights(seed: int, bits: int, group_size: int):
    from lowbit.core import choose_qparams, per_channel, per_group, quantize

    g = torch.Generator().manual_seed(seed)
    n, k = 64, 256
    w = torch.randn(n, k, generator=g)
    x = torch.randn(5, k, generator=g)
    bias = torch.randn(n, generator=g)
    qp = choose_qparams(w, f"int{bits}", True, per_group(group_size) if group_size else per_channel(0))
    return x, bias, quantize(w, qp), qp


def example_int8(seed: int = 0) -> dict:
    x, bias, q, qp = _example_weights(seed, 8, 0)
    scale = qp.scale.to(torch.bfloat16)
    return {"fast": (x, q, scale, bias), "reference": (x, q, scale.float(), bias), "exact": False, "tol": 2e-2}


def example_int4(seed: int = 0) -> dict:
    """Signed int4 codes g32 as the fast layout and as the dequantized fp32 weight (scales in bf16)."""
    from lowbit.core import dequantize

    x, bias, q, qp = _example_weights(seed, 4, 32)
    qp.scale = qp.scale.to(torch.bfloat16).float()  # the kernel holds bf16 scales
    packed, sz = int4_kernel_params(q, qp.scale, None, 32)
    w = dequantize(q, qp)
    return {"fast": (x, packed, sz, 32, bias), "reference": (x, w, bias), "exact": False, "tol": 2e-2}
