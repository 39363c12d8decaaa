"""W8A8 dynamic linear: per-token int8 activations x per-channel int8 weights, int32 accumulation.

For activations ``x`` (M, K) and weights ``W`` (N, K):

    s_x[m] = max_k |x[m, k]| / 127,   q_x = clamp(round(x / s_x), -127, 127)      (per token)
    acc    = q_x @ q_W^T                                                         (int32, exact)
    y      = acc * s_x[:, None] * s_W[None, :] + bias

An optional per-input-channel ``smooth_inv`` (SmoothQuant, ``1 / s``) multiplies ``x`` first; the
weights were multiplied by ``s`` when quantized.

The fast path is one C call per linear (:mod:`lowbit.kernels.int8_gemm`: quantization, the integer
product with AVX-512 VNNI or AVX2 ``maddubs``, the epilogue), registered as the custom op
``lowbit::w8a8_dynamic_linear`` so ``torch.compile`` keeps it whole and fuses what surrounds it.
Without a C compiler (or for weights holding -128 on AVX2) it runs in torch: the product through
``torch._int_mm`` on AVX-512 CPUs and through exact fp32 GEMM chunks on AVX2 ones
(:func:`int_product`). The reference computes the same integer product in int64 with a plain
matmul. Codes and accumulators agree bit-exactly; the float epilogue uses identical ops so outputs
agree too.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.utils.weak import WeakTensorKeyDictionary

from lowbit.kernels import int8_gemm

# Scale floor for an all-zero token (keeps the division finite; the token quantizes to zeros).
ACT_SCALE_EPS = torch.finfo(torch.float32).eps

# torch._int_mm is fast only where the CPU has AVX-512 (VNNI); on AVX2 it falls back to a loop ~14x
# slower than an fp32 GEMM (measured: 384x384 at M=128, 20.3 ms vs 1.42 ms on 2 threads). There the
# integer product runs as fp32 GEMMs over K-chunks of 1024: int8 x int8 products are exact in fp32
# and a chunk's sum stays below 127^2 * 1024 < 2^24, so every chunk converts to int32 exactly.
INT_MM_FAST = "AVX512" in torch.backends.cpu.get_cpu_capability()
EXACT_FP32_CHUNK = 1024


def int_product(q: torch.Tensor, qweight_t: torch.Tensor) -> torch.Tensor:
    """Exact int32 ``q @ qweight_t`` for int8 (M, K) x (K, N), through the fastest exact path here."""
    if INT_MM_FAST:
        return torch._int_mm(q, qweight_t)
    k = q.shape[-1]
    acc = None
    for start in range(0, k, EXACT_FP32_CHUNK):
        part = (q[:, start:start + EXACT_FP32_CHUNK].float() @ qweight_t[start:start + EXACT_FP32_CHUNK].float())
        part = part.to(torch.int32)  # exact: |sum| < 2^24
        acc = part if acc is None else acc + part
    return acc


def quantize_per_token(x: torch.Tensor, smooth_inv: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) float -> (int8 codes (M, K), fp32 scales (M, 1)), symmetric absmax per row."""
    x = x.float() if smooth_inv is None else x.float() * smooth_inv
    scale = (x.abs().amax(dim=-1, keepdim=True) / 127.0).clamp_min(ACT_SCALE_EPS)
    q = torch.round(x / scale).clamp_(-127, 127).to(torch.int8)
    return q, scale


def quantize_per_token_ref(x: torch.Tensor, smooth_inv: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: the core library's symmetric int8 per-channel quantizer applied to rows."""
    from lowbit.core import choose_qparams, per_channel, quantize

    x = x.float() if smooth_inv is None else x.float() * smooth_inv
    qp = choose_qparams(x.float(), "int8", symmetric=True, granularity=per_channel(0))
    return quantize(x.float(), qp), qp.scale.reshape(-1, 1)


def _torch_linear(x2: torch.Tensor, qweight_t: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                  smooth_inv: torch.Tensor | None) -> torch.Tensor:
    """(M, K) -> (M, N) fp32 with torch ops (the path inductor fuses when no C kernel is available)."""
    q, s_x = quantize_per_token(x2, smooth_inv)
    acc = int_product(q, qweight_t)  # (M, N) int32
    y = acc.float() * (s_x * w_scale)
    if bias is not None:
        y = y + bias
    return y


# Packed weights, one per qweight_t tensor (dropped with it), rebuilt if the tensor is modified in place.
_packed: WeakTensorKeyDictionary = WeakTensorKeyDictionary()


def packed_weight(qweight_t: torch.Tensor) -> int8_gemm.Packed:
    version = -1 if qweight_t.is_inference() else qweight_t._version  # inference tensors have no counter
    entry = _packed.get(qweight_t)
    if entry is None or entry[0] != version:
        entry = (version, int8_gemm.pack(qweight_t))
        _packed[qweight_t] = entry
    return entry[1]


def _native_linear(x2: torch.Tensor, qweight_t: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor],
                   smooth_inv: Optional[torch.Tensor]) -> torch.Tensor:
    """(M, K) -> (M, N) fp32 through the C kernel, or the torch ops where it is unavailable or inexact."""
    packed = packed_weight(qweight_t)
    if packed.fn is None:
        return _torch_linear(x2, qweight_t, w_scale, bias, smooth_inv)
    return int8_gemm.w8a8_linear(x2, packed, w_scale, bias, smooth_inv)


# The custom op torch.compile sees (registered with the plain dispatcher API: a Python kernel for CPU
# and a fake one for shapes; torch.library.custom_op's wrapper costs ~7 us more per call).
_LIB = torch.library.Library("lowbit", "FRAGMENT")
_LIB.define("w8a8_dynamic_linear(Tensor x2, Tensor qweight_t, Tensor w_scale, Tensor? bias, Tensor? smooth_inv) -> Tensor")
_LIB.impl("w8a8_dynamic_linear", _native_linear, "CPU")


@torch.library.register_fake("lowbit::w8a8_dynamic_linear", lib=_LIB)
def _(x2, qweight_t, w_scale, bias, smooth_inv):
    return x2.new_empty(x2.shape[0], qweight_t.shape[1], dtype=torch.float32)


def int8_dynamic_linear(x: torch.Tensor, qweight_t: torch.Tensor, w_scale: torch.Tensor,
                        bias: torch.Tensor | None, smooth_inv: torch.Tensor | None = None) -> torch.Tensor:
    """Fast path. ``qweight_t`` is the int8 weight transposed to (K, N); ``w_scale`` is (N,)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])  # (M, K)
    if x.requires_grad and torch.is_grad_enabled():
        y = _torch_linear(x2, qweight_t, w_scale, bias, smooth_inv)
    elif torch.compiler.is_compiling():
        y = torch.ops.lowbit.w8a8_dynamic_linear(x2, qweight_t, w_scale, bias, smooth_inv)  # opaque to inductor
    else:
        y = _native_linear(x2, qweight_t, w_scale, bias, smooth_inv)  # eager: no dispatcher round trip
    return y.to(x.dtype).reshape(*shape[:-1], -1)


def int8_dynamic_linear_ref(x: torch.Tensor, qweight_t: torch.Tensor, w_scale: torch.Tensor,
                        bias: torch.Tensor | None, smooth_inv: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: same math with the integer product done in int64 by a plain matmul."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])  # (M, K)
    q, s_x = quantize_per_token_ref(x2, smooth_inv)
    acc = (q.long() @ qweight_t.long()).to(torch.int32)  # (M, N), exact
    y = acc.float() * (s_x * w_scale)
    if bias is not None:
        y = y + bias
    return y.to(x.dtype).reshape(*shape[:-1], -1)


def example_per_token(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(37, 96, generator=g) * torch.linspace(0.1, 20, 96)
    x[3] = 0.0  # an all-zero token
    return {"fast": (x,), "reference": (x,), "exact": True, "tol": 0.0}


def example_linear(seed: int = 0) -> dict:
    """Random int8 weights (K, N) with per-channel scales, a smoothing vector and outlier activations."""
    g = torch.Generator().manual_seed(seed)
    k, n = 96, 80
    x = torch.randn(2, 9, k, generator=g) * torch.linspace(0.1, 20, k)
    qw = torch.randint(-127, 128, (k, n), generator=g, dtype=torch.int8)
    w_scale = torch.rand(n, generator=g) * 0.01 + 1e-3
    bias = torch.randn(n, generator=g)
    smooth_inv = torch.rand(k, generator=g) + 0.5
    args = (x, qw, w_scale, bias, smooth_inv)
    return {"fast": args, "reference": args, "exact": True, "tol": 0.0}
