"""XNOR + popcount GEMM over bit-packed signs (XNOR-Net, Rastegari et al. 2016, section 3.2).

Signs are packed 64 per ``int64`` word: bit ``j`` of word ``w`` of a row holds ``x[64 * w + j] >= 0``
(1 = +1, 0 = -1; the tail of the last word is 0 padding). For rows ``a, b`` of ``K`` signs,

    sum_k sign(a_k) * sign(b_k) = K - 2 * popcount(a XOR b)

(matching bits multiply to +1, differing bits to -1; padding bits agree and count nothing), so a
``(M, K) x (K, N)`` product of ±1 matrices is ``M * N * ceil(K / 64)`` XORs and popcounts.

- :func:`xnor_gemm` / :func:`pack_signs` (fast): a small C kernel (hardware ``popcnt`` via
  ``__builtin_popcountll``, OpenMP over output columns) compiled once with the system C compiler
  into lowbit's cache and called through ``ctypes``. Where no compiler is available they fall back
  to a vectorised torch SWAR popcount on the same packed words (slower, same integers), logged once.
- :func:`xnor_gemm_ref` / :func:`pack_signs_ref`: unpack to ±1 floats and ``matmul`` (exact: the
  sums are integers below 2^24), and a plain torch bit-shift packer.

Why C and not torch: torch has no popcount op; an eager SWAR popcount materialises (M, N, K/64)
int64 temporaries (~100x slower than the fp32 GEMM it replaces) and ``torch.compile`` took 95 s to
compile a kernel no faster than fp32 (measured on this machine, see docs/error_compensation.md).
"""

from __future__ import annotations

import ctypes
import logging

import torch

from lowbit.errors import ConfigError
from lowbit.kernels import native

log = logging.getLogger(__name__)

WORD_BITS = 64

_C_SOURCE = r"""
#include <stdint.h>

/* bit j of word w of row m = (x[m, 64 w + j] >= 0); tail bits of the last word are 0. */
void lowbit_pack_signs(const float* x, int64_t* out, int64_t M, int64_t K, int64_t W, int nthreads) {
    #pragma omp parallel for num_threads(nthreads) schedule(static) if (M * K >= 65536)
    for (int64_t m = 0; m < M; ++m) {
        const float* row = x + m * K;
        for (int64_t w = 0; w < W; ++w) {
            int64_t base = w * 64, n = K - base < 64 ? K - base : 64;
            uint64_t word = 0;
            for (int64_t j = 0; j < n; ++j) word |= (uint64_t)(row[base + j] >= 0.0f) << j;
            out[m * W + w] = (int64_t)word;
        }
    }
}

/* Shift by tau (per column, may be NULL), pack the signs, and beta[m] = mean_k |x[m, k] - tau[k]|. */
void lowbit_pack_signs_shift(const float* x, const float* tau, int64_t* out, float* beta,
                             int64_t M, int64_t K, int64_t W, int nthreads) {
    #pragma omp parallel for num_threads(nthreads) schedule(static) if (M * K >= 65536)
    for (int64_t m = 0; m < M; ++m) {
        const float* row = x + m * K;
        double total = 0.0;
        for (int64_t w = 0; w < W; ++w) {
            int64_t base = w * 64, n = K - base < 64 ? K - base : 64;
            uint64_t word = 0;
            for (int64_t j = 0; j < n; ++j) {
                float v = row[base + j] - (tau ? tau[base + j] : 0.0f);
                word |= (uint64_t)(v >= 0.0f) << j;
                total += v >= 0.0f ? v : -v;
            }
            out[m * W + w] = (int64_t)word;
        }
        beta[m] = (float)(total / (double)K);
    }
}

/* y[m, n] = (float)(K - 2 popcount(x[m] XOR w[n])) * beta[m] * alpha[n] + bias[n] (bias may be NULL). */
void lowbit_xnor_linear(const int64_t* x, const int64_t* w, const float* beta, const float* alpha,
                        const float* bias, float* out, int64_t M, int64_t N, int64_t W, int64_t K, int nthreads) {
    #pragma omp parallel for num_threads(nthreads) schedule(static) if (M * N * W >= 65536)
    for (int64_t n = 0; n < N; ++n) {
        const uint64_t* wr = (const uint64_t*)(w + n * W);
        float a = alpha[n], b = bias ? bias[n] : 0.0f;
        for (int64_t m = 0; m < M; ++m) {
            const uint64_t* xr = (const uint64_t*)(x + m * W);
            int64_t c = 0;
            for (int64_t j = 0; j < W; ++j) c += __builtin_popcountll(xr[j] ^ wr[j]);
            float acc = (float)(K - 2 * c);
            float y = acc * beta[m];
            y = y * a;
            out[m * N + n] = y + b;
        }
    }
}

/* out[m, n] = K - 2 * popcount(x[m] XOR w[n]) summed over the W words of a row. */
void lowbit_xnor_gemm(const int64_t* x, const int64_t* w, int32_t* out,
                      int64_t M, int64_t N, int64_t W, int64_t K, int nthreads) {
    #pragma omp parallel for num_threads(nthreads) schedule(static) if (M * N * W >= 65536)
    for (int64_t n = 0; n < N; ++n) {
        const uint64_t* wr = (const uint64_t*)(w + n * W);
        for (int64_t m = 0; m < M; ++m) {
            const uint64_t* xr = (const uint64_t*)(x + m * W);
            int64_t c = 0;
            for (int64_t j = 0; j < W; ++j) c += __builtin_popcountll(xr[j] ^ wr[j]);
            out[m * N + n] = (int32_t)(K - 2 * c);
        }
    }
}
"""

def n_words(k: int) -> int:
    """int64 words holding ``k`` packed signs."""
    return -(-k // WORD_BITS)


def native_library() -> tuple[ctypes.CDLL | None, str]:
    """The compiled kernel library (built on first use, cached by source and CPU), or why not."""
    vp, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    # no FMA contraction: the fused epilogue must round exactly like the torch reference
    return native.native_library("xnor", _C_SOURCE, {
        "lowbit_pack_signs": [vp, vp, i64, i64, i64, i32],
        "lowbit_xnor_gemm": [vp, vp, vp, i64, i64, i64, i64, i32],
        "lowbit_pack_signs_shift": [vp, vp, vp, vp, i64, i64, i64, i32],
        "lowbit_xnor_linear": [vp, vp, vp, vp, vp, vp, i64, i64, i64, i64, i32],
    }, cflags=("-ffp-contract=off",))


def _check_packed(xp: torch.Tensor, wp: torch.Tensor, k: int) -> None:
    if xp.dtype != torch.int64 or wp.dtype != torch.int64 or xp.dim() != 2 or wp.dim() != 2:
        raise ConfigError(f"xnor_gemm takes 2-D int64 packed signs, got {xp.dtype} {tuple(xp.shape)} "
                          f"and {wp.dtype} {tuple(wp.shape)}")
    if xp.shape[1] != wp.shape[1] or xp.shape[1] != n_words(k):
        raise ConfigError(f"packed widths {xp.shape[1]} / {wp.shape[1]} words do not match K={k} "
                          f"({n_words(k)} words of 64)")


# ------------------------------------------------------------------------------------ packing

def pack_signs_ref(x: torch.Tensor) -> torch.Tensor:
    """(M, K) float -> (M, ceil(K/64)) int64, bit j of word w = x[:, 64 w + j] >= 0."""
    m, k = x.shape
    w = n_words(k)
    bits = torch.zeros(m, w * WORD_BITS, dtype=torch.int64)
    bits[:, :k] = (x >= 0).to(torch.int64)
    bits = bits.reshape(m, w, WORD_BITS)  # (M, W, 64)
    shifts = torch.arange(WORD_BITS, dtype=torch.int64)
    return (bits << shifts).sum(-1)  # disjoint bits: the int64 sum is exact (bit 63 wraps to the sign)


def pack_signs(x: torch.Tensor) -> torch.Tensor:
    """Fast twin of :func:`pack_signs_ref` (C kernel; torch fallback without a compiler)."""
    lib, _ = native_library()
    if lib is None:
        return pack_signs_ref(x)
    x = x.detach().to(torch.float32).contiguous()
    m, k = x.shape
    out = torch.empty(m, n_words(k), dtype=torch.int64)
    lib.lowbit_pack_signs(x.data_ptr(), out.data_ptr(), m, k, out.shape[1], torch.get_num_threads())
    return out


def unpack_signs(packed: torch.Tensor, k: int) -> torch.Tensor:
    """(M, W) int64 -> (M, k) float ±1."""
    shifts = torch.arange(WORD_BITS, dtype=torch.int64)
    bits = (packed.unsqueeze(-1) >> shifts) & 1  # (M, W, 64)
    return bits.reshape(packed.shape[0], -1)[:, :k].float() * 2 - 1


# ------------------------------------------------------------------------------------ GEMM

def xnor_gemm_ref(xp: torch.Tensor, wp: torch.Tensor, k: int) -> torch.Tensor:
    """(M, W) x (N, W) packed -> (M, N) int32 ``sign(x) @ sign(w)^T``, by unpacking to ±1 and matmul."""
    _check_packed(xp, wp, k)
    return (unpack_signs(xp, k) @ unpack_signs(wp, k).T).round().to(torch.int32)


# ----------------------------------------------------------------------------- fused layer ops

def xnor_linear_ref(x: torch.Tensor, tau: torch.Tensor | None, wp: torch.Tensor, alpha: torch.Tensor,
                    bias: torch.Tensor | None) -> torch.Tensor:
    """XNOR-Net linear on float rows x (M, K): ``(sign(x - tau) (*) sign(W)) * beta * alpha + b``,
    ``beta = mean|x - tau|`` per row; the packed product is :func:`xnor_gemm_ref`."""
    xs = x.float() if tau is None else x.float() - tau
    beta = xs.abs().double().mean(1).float()  # (M,)
    acc = xnor_gemm_ref(pack_signs_ref(xs), wp, x.shape[1]).float()  # (M, N)
    y = acc * beta[:, None] * alpha
    return y if bias is None else y + bias


def xnor_linear(x: torch.Tensor, tau: torch.Tensor | None, wp: torch.Tensor, alpha: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
    """Fast twin of :func:`xnor_linear_ref`: shift + pack + beta in one C pass, GEMM + epilogue in another."""
    lib, _ = native_library()
    if lib is None:
        xs = x.float() if tau is None else x.float() - tau
        beta = xs.abs().double().mean(1).float()
        y = xnor_gemm_torch(pack_signs_ref(xs), wp, x.shape[1]).float() * beta[:, None] * alpha
        return y if bias is None else y + bias
    x = x.detach().to(torch.float32).contiguous()
    m, k = x.shape
    _check_packed(torch.empty(0, n_words(k), dtype=torch.int64), wp, k)
    nt = torch.get_num_threads()
    xp = torch.empty(m, n_words(k), dtype=torch.int64)
    beta = torch.empty(m)
    tau_c = None if tau is None else tau.detach().float().contiguous()
    lib.lowbit_pack_signs_shift(x.data_ptr(), None if tau_c is None else tau_c.data_ptr(), xp.data_ptr(),
                                beta.data_ptr(), m, k, xp.shape[1], nt)
    out = torch.empty(m, wp.shape[0])
    alpha_c = alpha.detach().float().contiguous()
    bias_c = None if bias is None else bias.detach().float().contiguous()
    lib.lowbit_xnor_linear(xp.data_ptr(), wp.contiguous().data_ptr(), beta.data_ptr(), alpha_c.data_ptr(),
                           None if bias_c is None else bias_c.data_ptr(), out.data_ptr(), m, wp.shape[0],
                           xp.shape[1], k, nt)
    return out


def example_xnor_linear(seed: int) -> dict:
    """Fused layer op: K = 130, with tau and bias. beta sums in a different order -> tolerance, not exact."""
    g = torch.Generator().manual_seed(seed)
    k = 130
    x, tau = torch.randn(9, k, generator=g), torch.randn(k, generator=g) * 0.1
    wp = pack_signs_ref(torch.randn(20, k, generator=g))
    alpha, bias = torch.rand(20, generator=g), torch.randn(20, generator=g)
    args = (x, tau, wp, alpha, bias)
    return {"fast": args, "reference": args, "exact": False, "tol": 1e-6}


_M1, _M2, _M4, _H01 = 0x5555555555555555, 0x3333333333333333, 0x0F0F0F0F0F0F0F0F, 0x0101010101010101


def _popcount_swar(v: torch.Tensor) -> torch.Tensor:
    """Per-int64 popcount with shifts and masks (the arithmetic shift's sign bits are masked off)."""
    v = v - ((v >> 1) & _M1)
    v = (v & _M2) + ((v >> 2) & _M2)
    v = (v + (v >> 4)) & _M4
    return ((v * _H01) >> 56) & 0xFF


def xnor_gemm_torch(xp: torch.Tensor, wp: torch.Tensor, k: int) -> torch.Tensor:
    """XNOR-popcount in torch ops on the packed words (fallback, chunked over rows to bound memory)."""
    _check_packed(xp, wp, k)
    out = torch.empty(xp.shape[0], wp.shape[0], dtype=torch.int32)
    rows = max(1, (1 << 22) // max(1, wp.numel()))
    for i in range(0, xp.shape[0], rows):
        x = xp[i:i + rows]
        pc = _popcount_swar(x[:, None, :] ^ wp[None, :, :]).sum(-1)  # (m, N)
        out[i:i + rows] = (k - 2 * pc).to(torch.int32)
    return out


def xnor_gemm(xp: torch.Tensor, wp: torch.Tensor, k: int) -> torch.Tensor:
    """Fast twin of :func:`xnor_gemm_ref`: hardware popcount in C (torch SWAR fallback)."""
    _check_packed(xp, wp, k)
    lib, _ = native_library()
    if lib is None:
        return xnor_gemm_torch(xp, wp, k)
    xp, wp = xp.contiguous(), wp.contiguous()
    m, n = xp.shape[0], wp.shape[0]
    out = torch.empty(m, n, dtype=torch.int32)
    lib.lowbit_xnor_gemm(xp.data_ptr(), wp.data_ptr(), out.data_ptr(), m, n, xp.shape[1], k,
                         torch.get_num_threads())
    return out


# ------------------------------------------------------------------------------- registry examples

def example_xnor_gemm(seed: int) -> dict:
    """Inputs for the registry test: K = 200 (a partial last word), M = 7, N = 33."""
    g = torch.Generator().manual_seed(seed)
    k = 200
    xp = pack_signs_ref(torch.randn(7, k, generator=g))
    wp = pack_signs_ref(torch.randn(33, k, generator=g))
    return {"fast": (xp, wp, k), "reference": (xp, wp, k), "exact": True}


def example_pack_signs(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 130, generator=g)
    x[0, :3] = 0.0  # zero packs as +1
    return {"fast": (x,), "reference": (x,), "exact": True}
