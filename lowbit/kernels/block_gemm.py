"""Prompt-shaped products (many activation rows) with the block-layout weights of
:mod:`lowbit.kernels.block_gemv`: a register-tiled W4A8 GEMM (``vpdpbusd`` on zmm registers) and a
tiled fp32-activation GEMM, both reading the decoder's one copy of the packed codes.

The GEMV kernels of :mod:`lowbit.kernels.block_gemv` walk one weight row at a time and loop over the
``M`` activation rows inside it: right for decoding (``M`` = 1), wasteful for a 128-token prompt,
where every weight byte is unpacked ``M / 4`` times and nothing stays in registers. Here the weight
matrix is cut into tiles of :data:`TILE_N` = 32 output rows; each tile's codes are unpacked **once**
into a per-thread scratch (32 x K bytes, in L1/L2) and then reused by every activation row.

W4A8 (:func:`block_gemm_a8`), the same math as :func:`lowbit.kernels.block_gemv.block_linear_a8`.
Activations are rounded per block of 32 inputs exactly as that kernel does (``d = max|x| / 127``,
``q = round_half_even(x / d)`` computed as ``x * (1 / d)``, group sums ``Xq[m, j] = sum_blk d * sum q``;
the codes and scales are bit-identical, tested). With ``u`` the unsigned weight codes, ``s`` / ``b``
a group's scale / offset and ``I[m, n, blk] = sum_{k in blk} u[n, k] q[m, k]`` (an exact integer):

    G[m, n, j] = sum_{blk in j} d[m, blk] * I[m, n, blk]                    (fp32, one FMA per block)
    y[m, n]    = bias[n] + sum_j ( s[n, j] * G[m, n, j] + b[n, j] * Xq[m, j] )   (two FMAs per group)

The scratch holds the tile's codes as (K/4, 32, 4) bytes, so one zmm load is 16 outputs x 4 inputs
and ``vpdpbusd`` (u8 codes x s8 activations, four products summed per int32 lane) accumulates
``I`` for 16 outputs at once, with no horizontal sums. A register tile of 4 rows x 32 outputs keeps
24 zmm accumulators (integer block sums, group sums, totals). The floating-point steps above run in
the same order with fused multiply-adds in every build (AVX-512 VNNI, AVX2 ``maddubs``, plain C with
``fmaf``), so the three builds return identical floats; against ``block_linear_a8`` (which scales
per block in another order) and ``block_linear_a8_ref`` (``F.linear`` over the dequantized weight)
the results agree to fp32 summation order.

fp32 activations (:func:`block_gemm`): a tile is dequantized once, ``W = s u + b`` rounded as
:func:`lowbit.kernels.block_gemv.dequantize_ref` rounds it (a product, then a sum), into a (K, 32)
fp32 scratch, and a 6-row x 32-output register tile of FMAs runs over it: exact weight-only math,
agreeing with ``block_linear_ref`` to fp32 summation order, without the whole-matrix dequantized
copy that ``F.linear`` needed.

Both are built at first use (:mod:`lowbit.kernels.native`, ``-ffp-contract=off``); OpenMP splits the
activation quantization over rows and the weight tiles over threads. Without a compiler they fall
back to the references.
"""

from __future__ import annotations

import ctypes
import logging

import torch

from lowbit.errors import ConfigError
from lowbit.kernels import block_gemv, native

log = logging.getLogger(__name__)

BLOCK = block_gemv.BLOCK  # inputs per packed block and per activation scale
TILE_N = 32  # output rows unpacked together into the per-thread scratch
# Rows from which the GEMMs beat block_gemv's GEMV kernels (which re-unpack every weight block per
# 4-row tile): SmolLM2's four projections at g = 128, 2 threads, one layer: W4A8 M = 1 85 vs 93 us,
# M = 2 128 vs 94 us; fp32 activations M = 1 108 vs 182 us, M = 2 282 vs 176 us (docs/kernels.md).
A8_MIN_ROWS = 2
F32_MIN_ROWS = 2

_C_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define LB_VNNI 1
#elif defined(__AVX2__) && defined(__FMA__)
#define LB_AVX2 1
#endif

#define LB_NR 32  /* outputs per tile */

int lowbit_block_gemm_variant(void) {
#if defined(LB_VNNI)
    return 2;
#elif defined(LB_AVX2)
    return 1;
#else
    return 0;
#endif
}

static inline float lb_h2f(uint16_t h) {
#ifdef __F16C__
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff, f;
    if (e == 0) {
        float v = ldexpf((float)m, -24);
        return sign ? -v : v;
    }
    f = e == 31 ? (sign | 0x7f800000u | (m << 13)) : (sign | ((e + 112) << 23) | (m << 13));
    float out;
    memcpy(&out, &f, sizeof out);
    return out;
#endif
}

static inline int32_t lb_ld4(const void* p) { int32_t v; memcpy(&v, p, 4); return v; }

/* ---- activations: int8 per block of 32, exactly as block_gemv's lowbit_quantize_blocks ---- */
static void lb_quant_row(const float* x, int8_t* xq, float* d, float* Xq, int64_t K, int64_t G, int64_t bpg) {
    const int64_t nb = K / 32;
    for (int64_t j = 0; j < G; ++j) Xq[j] = 0.0f;
    for (int64_t blk = 0; blk < nb; ++blk) {
        const float* xr = x + blk * 32;
        float amax = 0.0f, dd, inv;
        int sum = 0;
#ifdef LB_VNNI
        __m512 a0 = _mm512_loadu_ps(xr), a1 = _mm512_loadu_ps(xr + 16);
        amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a0), _mm512_abs_ps(a1)));
        dd = amax / 127.0f;
        inv = dd > 0.0f ? 1.0f / dd : 0.0f;
        __m512 vi = _mm512_set1_ps(inv);
        __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(a0, vi)), q1 = _mm512_cvtps_epi32(_mm512_mul_ps(a1, vi));
        _mm_storeu_si128((__m128i*)(xq + blk * 32), _mm512_cvtepi32_epi8(q0));
        _mm_storeu_si128((__m128i*)(xq + blk * 32 + 16), _mm512_cvtepi32_epi8(q1));
        sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
#else
        for (int i = 0; i < 32; ++i) { float a = xr[i] < 0 ? -xr[i] : xr[i]; if (a > amax) amax = a; }
        dd = amax / 127.0f;
        inv = dd > 0.0f ? 1.0f / dd : 0.0f;
        for (int i = 0; i < 32; ++i) {
            int q = (int)nearbyintf(xr[i] * inv);
            xq[blk * 32 + i] = (int8_t)q;
            sum += q;
        }
#endif
        d[blk] = dd;
        Xq[blk / bpg] += dd * (float)sum;
    }
}

void lowbit_quantize_blocks_mt(const float* x, int8_t* xq, float* d, float* Xq, int64_t M, int64_t K, int64_t G,
                               int64_t g, int nthreads) {
    const int64_t nb = K / 32, bpg = g / 32;
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t m = 0; m < M; ++m) lb_quant_row(x + m * K, xq + m * K, d + m * nb, Xq + m * G, K, G, bpg);
}

/* ---- one tile of LB_NR weight rows n0.. into the scratch ----
   wt[((k / 4) * LB_NR + r) * 4 + k % 4] = u[n0 + r, k] (rows past N: code 0), sc / of (G, LB_NR):
   the scales in fp32 and the offsets (stored, or boff * s). */
static void lb_tile_params(const uint16_t* s, const float* b, float boff, int64_t N, int64_t G, int64_t n0,
                           float* sc, float* of) {
    for (int r = 0; r < LB_NR; ++r) {
        int64_t n = n0 + r;
        for (int64_t j = 0; j < G; ++j) {
            float sv = n < N ? lb_h2f(s[n * G + j]) : 0.0f;
            sc[j * LB_NR + r] = sv;
            of[j * LB_NR + r] = n < N ? (b ? b[n * G + j] : boff * sv) : 0.0f;
        }
    }
}

static void lb_unpack_q4(const uint8_t* w, int64_t N, int64_t K, int64_t n0, uint8_t* wt) {
    const int64_t nb = K / 32;
#ifdef LB_VNNI
    if (n0 + LB_NR <= N) {
        /* 16 rows x 16 packed bytes = 4 zmm (4 rows each); dword c of every row -> one zmm per c:
           byte t of it holds inputs 4c + t (low nibble) and 16 + 4c + t (high nibble). */
        const __m512i low = _mm512_set1_epi8(0x0F);
        __m512i idx[4];
        for (int c = 0; c < 4; ++c) {
            int32_t v[16];
            for (int r = 0; r < 16; ++r) v[r] = ((r & 4) ? 16 : 0) + (r & 3) * 4 + c;
            idx[c] = _mm512_loadu_si512(v);
        }
        for (int64_t blk = 0; blk < nb; ++blk)
            for (int h = 0; h < 2; ++h) {
                __m512i z[4];
                for (int q = 0; q < 4; ++q) {
                    const uint8_t* p = w + (n0 + 16 * h + 4 * q) * (K / 2) + blk * 16;
                    __m512i t = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i*)p));
                    t = _mm512_inserti32x4(t, _mm_loadu_si128((const __m128i*)(p + K / 2)), 1);
                    t = _mm512_inserti32x4(t, _mm_loadu_si128((const __m128i*)(p + K)), 2);
                    z[q] = _mm512_inserti32x4(t, _mm_loadu_si128((const __m128i*)(p + 3 * (K / 2))), 3);
                }
                for (int c = 0; c < 4; ++c) {
                    __m512i t01 = _mm512_permutex2var_epi32(z[0], idx[c], z[1]);
                    __m512i t23 = _mm512_permutex2var_epi32(z[2], idx[c], z[3]);
                    __m512i t = _mm512_mask_blend_epi32(0xFF00, t01, t23);
                    _mm512_storeu_si512(wt + ((blk * 8 + c) * LB_NR + 16 * h) * 4, _mm512_and_si512(t, low));
                    _mm512_storeu_si512(wt + ((blk * 8 + 4 + c) * LB_NR + 16 * h) * 4,
                                        _mm512_and_si512(_mm512_srli_epi16(t, 4), low));
                }
            }
        return;
    }
#endif
    for (int r = 0; r < LB_NR; ++r) {
        int64_t n = n0 + r;
        for (int64_t blk = 0; blk < nb; ++blk) {
            uint8_t u[32];
            for (int t = 0; t < 16; ++t) {
                uint8_t c = n < N ? w[n * (K / 2) + blk * 16 + t] : 0;
                u[t] = c & 15;
                u[t + 16] = c >> 4;
            }
            for (int c = 0; c < 8; ++c) memcpy(wt + ((blk * 8 + c) * LB_NR + r) * 4, u + 4 * c, 4);
        }
    }
}

/* ---- W4A8 products of all M rows with one unpacked tile (outputs n0 .. n0 + 31) ---- */
#ifdef LB_VNNI
#define LB_Z3(i) __m512i a##i##0 = _mm512_setzero_si512(), a##i##1 = a##i##0;
#define LB_DOT(i) { __m512i xb = _mm512_set1_epi32(lb_ld4(x##i + o)); \
    a##i##0 = _mm512_dpbusd_epi32(a##i##0, w0, xb); a##i##1 = _mm512_dpbusd_epi32(a##i##1, w1, xb); }
#define LB_BLK(i) { __m512 dv = _mm512_set1_ps(d##i[blk]); \
    g##i##0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a##i##0), dv, g##i##0); \
    g##i##1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a##i##1), dv, g##i##1); }
#define LB_GRP(i) { __m512 xv = _mm512_set1_ps(X##i[j]); \
    t##i##0 = _mm512_fmadd_ps(o0, xv, _mm512_fmadd_ps(g##i##0, s0, t##i##0)); \
    t##i##1 = _mm512_fmadd_ps(o1, xv, _mm512_fmadd_ps(g##i##1, s1, t##i##1)); }
static void lb_a8_tile(const int8_t* xq, const float* d, const float* Xq, const uint8_t* wt, const float* sc,
                       const float* of, const float* bias, float* y, int64_t M, int64_t N, int64_t K, int64_t G,
                       int64_t bpg, int64_t n0) {
    const int64_t nb = K / 32;
    const int64_t nv = N - n0 < LB_NR ? N - n0 : LB_NR;
    const __mmask16 k0 = nv >= 16 ? 0xFFFF : (__mmask16)((1u << nv) - 1);
    const __mmask16 k1 = nv >= 32 ? 0xFFFF : (nv > 16 ? (__mmask16)((1u << (nv - 16)) - 1) : 0);
    const __m512 bias0 = bias ? _mm512_maskz_loadu_ps(k0, bias + n0) : _mm512_setzero_ps();
    const __m512 bias1 = bias ? _mm512_maskz_loadu_ps(k1, bias + n0 + 16) : _mm512_setzero_ps();
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const int64_t mr = M - m0 < 4 ? M - m0 : 4;
        /* rows past M repeat the last row (computed, not stored) */
        const int64_t r1 = m0 + (mr > 1 ? 1 : 0), r2 = m0 + (mr > 2 ? 2 : 0), r3 = m0 + (mr > 3 ? 3 : 0);
        const int8_t *x0 = xq + m0 * K, *x1 = xq + r1 * K, *x2 = xq + r2 * K, *x3 = xq + r3 * K;
        const float *d0 = d + m0 * nb, *d1 = d + r1 * nb, *d2 = d + r2 * nb, *d3 = d + r3 * nb;
        const float *X0 = Xq + m0 * G, *X1 = Xq + r1 * G, *X2 = Xq + r2 * G, *X3 = Xq + r3 * G;
        __m512 t00 = bias0, t01 = bias1, t10 = bias0, t11 = bias1, t20 = bias0, t21 = bias1, t30 = bias0, t31 = bias1;
        for (int64_t j = 0; j < G; ++j) {
            const int64_t b0 = j * bpg, b1 = b0 + bpg < nb ? b0 + bpg : nb;
            __m512 g00 = _mm512_setzero_ps(), g01 = g00, g10 = g00, g11 = g00, g20 = g00, g21 = g00, g30 = g00, g31 = g00;
            for (int64_t blk = b0; blk < b1; ++blk) {
                LB_Z3(0) LB_Z3(1) LB_Z3(2) LB_Z3(3)
                const uint8_t* wb = wt + blk * 8 * LB_NR * 4;
#pragma GCC unroll 8
                for (int c = 0; c < 8; ++c) {
                    const __m512i w0 = _mm512_loadu_si512(wb + c * LB_NR * 4);
                    const __m512i w1 = _mm512_loadu_si512(wb + c * LB_NR * 4 + 64);
                    const int64_t o = blk * 32 + c * 4;
                    LB_DOT(0) LB_DOT(1) LB_DOT(2) LB_DOT(3)
                }
                LB_BLK(0) LB_BLK(1) LB_BLK(2) LB_BLK(3)
            }
            const __m512 s0 = _mm512_loadu_ps(sc + j * LB_NR), s1 = _mm512_loadu_ps(sc + j * LB_NR + 16);
            const __m512 o0 = _mm512_loadu_ps(of + j * LB_NR), o1 = _mm512_loadu_ps(of + j * LB_NR + 16);
            LB_GRP(0) LB_GRP(1) LB_GRP(2) LB_GRP(3)
        }
        __m512 tot[4][2] = {{t00, t01}, {t10, t11}, {t20, t21}, {t30, t31}};
        for (int64_t i = 0; i < mr; ++i) {
            _mm512_mask_storeu_ps(y + (m0 + i) * N + n0, k0, tot[i][0]);
            _mm512_mask_storeu_ps(y + (m0 + i) * N + n0 + 16, k1, tot[i][1]);
        }
    }
}
#else
/* One row at a time over the tile: the same integers, and the same fused steps in the same order. */
static void lb_a8_tile(const int8_t* xq, const float* d, const float* Xq, const uint8_t* wt, const float* sc,
                       const float* of, const float* bias, float* y, int64_t M, int64_t N, int64_t K, int64_t G,
                       int64_t bpg, int64_t n0) {
    const int64_t nb = K / 32;
    const int64_t nv = N - n0 < LB_NR ? N - n0 : LB_NR;
    for (int64_t m = 0; m < M; ++m) {
        const int8_t* xr = xq + m * K;
#ifdef LB_AVX2
        /* 32 outputs = 4 ymm of 8; u8 x s8 pairs summed in int16 (<= 2 * 15 * 127, exact), then int32 */
        const __m256i ones = _mm256_set1_epi16(1);
        __m256 t[4], gs[4];
        for (int v = 0; v < 4; ++v) {
            float bb[8];
            for (int r = 0; r < 8; ++r) bb[r] = bias && 8 * v + r < nv ? bias[n0 + 8 * v + r] : 0.0f;
            t[v] = _mm256_loadu_ps(bb);
        }
        for (int64_t j = 0; j < G; ++j) {
            const int64_t b0 = j * bpg, b1 = b0 + bpg < nb ? b0 + bpg : nb;
            for (int v = 0; v < 4; ++v) gs[v] = _mm256_setzero_ps();
            for (int64_t blk = b0; blk < b1; ++blk) {
                __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
                const uint8_t* wb = wt + blk * 8 * LB_NR * 4;
                for (int c = 0; c < 8; ++c) {
                    const __m256i xb = _mm256_set1_epi32(lb_ld4(xr + blk * 32 + c * 4));
                    const uint8_t* wc = wb + c * LB_NR * 4;
#define LB_D2(v, a) a = _mm256_add_epi32(a, _mm256_madd_epi16(_mm256_maddubs_epi16( \
                    _mm256_loadu_si256((const __m256i*)(wc + 32 * (v))), xb), ones))
                    LB_D2(0, a0); LB_D2(1, a1); LB_D2(2, a2); LB_D2(3, a3);
#undef LB_D2
                }
                const __m256 dv = _mm256_set1_ps(d[m * nb + blk]);
                gs[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a0), dv, gs[0]);
                gs[1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a1), dv, gs[1]);
                gs[2] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a2), dv, gs[2]);
                gs[3] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a3), dv, gs[3]);
            }
            const __m256 xv = _mm256_set1_ps(Xq[m * G + j]);
            for (int v = 0; v < 4; ++v)
                t[v] = _mm256_fmadd_ps(_mm256_loadu_ps(of + j * LB_NR + 8 * v), xv,
                                       _mm256_fmadd_ps(gs[v], _mm256_loadu_ps(sc + j * LB_NR + 8 * v), t[v]));
        }
        float out[LB_NR];
        for (int v = 0; v < 4; ++v) _mm256_storeu_ps(out + 8 * v, t[v]);
        for (int64_t r = 0; r < nv; ++r) y[m * N + n0 + r] = out[r];
#else
        for (int64_t r = 0; r < nv; ++r) {
            float t = bias ? bias[n0 + r] : 0.0f;
            for (int64_t j = 0; j < G; ++j) {
                const int64_t b0 = j * bpg, b1 = b0 + bpg < nb ? b0 + bpg : nb;
                float gs = 0.0f;
                for (int64_t blk = b0; blk < b1; ++blk) {
                    int32_t dot = 0;
                    for (int c = 0; c < 8; ++c)
                        for (int e = 0; e < 4; ++e)
                            dot += (int32_t)wt[((blk * 8 + c) * LB_NR + r) * 4 + e] * xr[blk * 32 + c * 4 + e];
                    gs = fmaf((float)dot, d[m * nb + blk], gs);
                }
                t = fmaf(of[j * LB_NR + r], Xq[m * G + j], fmaf(gs, sc[j * LB_NR + r], t));
            }
            y[m * N + n0 + r] = t;
        }
#endif
    }
}
#endif

/* y (M, N) = W4A8 product. xq (M, K) int8, d (M, K/32), Xq (M, G): from lowbit_quantize_blocks_mt;
   w (N, K/2) block-packed 4-bit codes; s (N, G) fp16; b (N, G) fp32 or NULL (b = boff * s). */
int lowbit_q4a8_gemm(const int8_t* xq, const float* d, const float* Xq, const uint8_t* w, const uint16_t* s,
                     const float* b, float boff, const float* bias, float* y, int64_t M, int64_t N, int64_t K,
                     int64_t G, int64_t g, int nthreads) {
    const int64_t bpg = g / 32, nt = (N + LB_NR - 1) / LB_NR;
    const size_t wbytes = (size_t)K * LB_NR, pbytes = (size_t)G * LB_NR * sizeof(float);
    int failed = 0;
    #pragma omp parallel num_threads(nthreads)
    {
        uint8_t* scratch = (uint8_t*)aligned_alloc(64, (wbytes + 2 * pbytes + 63) / 64 * 64);
        if (!scratch) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(static)
        for (int64_t tile = 0; tile < nt; ++tile) {
            if (!scratch) continue;
            uint8_t* wt = scratch;
            float* sc = (float*)(scratch + wbytes);
            float* of = sc + G * LB_NR;
            lb_unpack_q4(w, N, K, tile * LB_NR, wt);
            lb_tile_params(s, b, boff, N, G, tile * LB_NR, sc, of);
            lb_a8_tile(xq, d, Xq, wt, sc, of, bias, y, M, N, K, G, bpg, tile * LB_NR);
        }
        free(scratch);
    }
    return failed ? -1 : 0;
}

/* ---- fp32 activations: a tile dequantized once, W = s u + b as block_gemv.dequantize_ref rounds it ---- */
static void lb_unpack_q8(const uint8_t* w, int64_t N, int64_t K, int64_t n0, uint8_t* wt) {
    for (int r = 0; r < LB_NR; ++r) {
        int64_t n = n0 + r;
        for (int64_t c = 0; c < K / 4; ++c) {
            if (n < N) memcpy(wt + (c * LB_NR + r) * 4, w + n * K + 4 * c, 4);
            else memset(wt + (c * LB_NR + r) * 4, 0, 4);
        }
    }
}

/* wf[k * LB_NR + r] = sc[j, r] * u[r, k] + of[j, r] (a product, then a sum: -ffp-contract=off), j = k / g */
static void lb_dequant_tile(const uint8_t* wt, const float* sc, const float* of, int64_t K, int64_t g, float* wf) {
#ifdef LB_VNNI
    const __m512i m8 = _mm512_set1_epi32(0xFF);
    for (int64_t c = 0; c < K / 4; ++c) {
        const int64_t j = (4 * c) / g;
        for (int h = 0; h < 2; ++h) {
            const __m512i v = _mm512_loadu_si512(wt + (c * LB_NR + 16 * h) * 4);
            const __m512 sv = _mm512_loadu_ps(sc + j * LB_NR + 16 * h), ov = _mm512_loadu_ps(of + j * LB_NR + 16 * h);
            for (int t = 0; t < 4; ++t) {
                __m512 u = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(v, 8 * t), m8));
                _mm512_storeu_ps(wf + (4 * c + t) * LB_NR + 16 * h, _mm512_add_ps(_mm512_mul_ps(u, sv), ov));
            }
        }
    }
#else
    for (int64_t k = 0; k < K; ++k) {
        const int64_t j = k / g;
        for (int r = 0; r < LB_NR; ++r)
            wf[k * LB_NR + r] = sc[j * LB_NR + r] * (float)wt[((k / 4) * LB_NR + r) * 4 + k % 4] + of[j * LB_NR + r];
    }
#endif
}

/* y[m, n0 + r] = bias + sum_k fma over k in order (acc = fma(w, x, acc) from 0, then + bias) */
#ifdef LB_VNNI
#define LB_FR 6
#define LB_FZ(i) __m512 c##i##0 = _mm512_setzero_ps(), c##i##1 = c##i##0;
#define LB_FMA(i) { const __m512 xb = _mm512_set1_ps(x##i[k]); \
    c##i##0 = _mm512_fmadd_ps(w0, xb, c##i##0); c##i##1 = _mm512_fmadd_ps(w1, xb, c##i##1); }
static void lb_f32_tile(const float* x, const float* wf, const float* bias, float* y, int64_t M, int64_t N, int64_t K,
                        int64_t n0) {
    const int64_t nv = N - n0 < LB_NR ? N - n0 : LB_NR;
    const __mmask16 k0 = nv >= 16 ? 0xFFFF : (__mmask16)((1u << nv) - 1);
    const __mmask16 k1 = nv >= 32 ? 0xFFFF : (nv > 16 ? (__mmask16)((1u << (nv - 16)) - 1) : 0);
    const __m512 bias0 = bias ? _mm512_maskz_loadu_ps(k0, bias + n0) : _mm512_setzero_ps();
    const __m512 bias1 = bias ? _mm512_maskz_loadu_ps(k1, bias + n0 + 16) : _mm512_setzero_ps();
    for (int64_t m0 = 0; m0 < M; m0 += LB_FR) {
        const int64_t mr = M - m0 < LB_FR ? M - m0 : LB_FR;
        const float* x0 = x + m0 * K;  /* rows past M repeat the last row (computed, not stored) */
        const float* x1 = x + (m0 + (mr > 1 ? 1 : 0)) * K;
        const float* x2 = x + (m0 + (mr > 2 ? 2 : 0)) * K;
        const float* x3 = x + (m0 + (mr > 3 ? 3 : 0)) * K;
        const float* x4 = x + (m0 + (mr > 4 ? 4 : 0)) * K;
        const float* x5 = x + (m0 + (mr > 5 ? 5 : 0)) * K;
        LB_FZ(0) LB_FZ(1) LB_FZ(2) LB_FZ(3) LB_FZ(4) LB_FZ(5)
#pragma GCC unroll 4
        for (int64_t k = 0; k < K; ++k) {
            const __m512 w0 = _mm512_loadu_ps(wf + k * LB_NR), w1 = _mm512_loadu_ps(wf + k * LB_NR + 16);
            LB_FMA(0) LB_FMA(1) LB_FMA(2) LB_FMA(3) LB_FMA(4) LB_FMA(5)
        }
        __m512 acc[LB_FR][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
        for (int64_t i = 0; i < mr; ++i) {
            _mm512_mask_storeu_ps(y + (m0 + i) * N + n0, k0, bias ? _mm512_add_ps(acc[i][0], bias0) : acc[i][0]);
            _mm512_mask_storeu_ps(y + (m0 + i) * N + n0 + 16, k1, bias ? _mm512_add_ps(acc[i][1], bias1) : acc[i][1]);
        }
    }
}
#else
static void lb_f32_tile(const float* x, const float* wf, const float* bias, float* y, int64_t M, int64_t N, int64_t K,
                        int64_t n0) {
    const int64_t nv = N - n0 < LB_NR ? N - n0 : LB_NR;
    for (int64_t m = 0; m < M; ++m) {
        const float* xr = x + m * K;
#ifdef LB_AVX2
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t k = 0; k < K; ++k) {
            const __m256 xb = _mm256_set1_ps(xr[k]);
            const float* wk = wf + k * LB_NR;
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(wk), xb, a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(wk + 8), xb, a1);
            a2 = _mm256_fmadd_ps(_mm256_loadu_ps(wk + 16), xb, a2);
            a3 = _mm256_fmadd_ps(_mm256_loadu_ps(wk + 24), xb, a3);
        }
        float out[LB_NR];
        _mm256_storeu_ps(out, a0); _mm256_storeu_ps(out + 8, a1);
        _mm256_storeu_ps(out + 16, a2); _mm256_storeu_ps(out + 24, a3);
        for (int64_t r = 0; r < nv; ++r) y[m * N + n0 + r] = bias ? out[r] + bias[n0 + r] : out[r];
#else
        for (int64_t r = 0; r < nv; ++r) {
            float a = 0.0f;
            for (int64_t k = 0; k < K; ++k) a = fmaf(wf[k * LB_NR + r], xr[k], a);
            y[m * N + n0 + r] = bias ? a + bias[n0 + r] : a;
        }
#endif
    }
}
#endif

/* y (M, N) = x (M, K) fp32 times W^T, W = s u + b from 4- or 8-bit block-layout codes (block_gemv). */
int lowbit_q_gemm_f32(const float* x, const uint8_t* w, const uint16_t* s, const float* b, float boff,
                      const float* bias, float* y, int64_t M, int64_t N, int64_t K, int64_t G, int64_t g, int bits,
                      int nthreads) {
    const int64_t nt = (N + LB_NR - 1) / LB_NR;
    const size_t wbytes = (size_t)K * LB_NR, pbytes = (size_t)G * LB_NR * sizeof(float);
    const size_t fbytes = (size_t)K * LB_NR * sizeof(float);
    int failed = 0;
    #pragma omp parallel num_threads(nthreads)
    {
        uint8_t* scratch = (uint8_t*)aligned_alloc(64, (fbytes + wbytes + 2 * pbytes + 63) / 64 * 64);
        if (!scratch) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(static)
        for (int64_t tile = 0; tile < nt; ++tile) {
            if (!scratch) continue;
            float* wf = (float*)scratch;
            uint8_t* wt = scratch + fbytes;
            float* sc = (float*)(wt + wbytes);
            float* of = sc + G * LB_NR;
            if (bits == 4) lb_unpack_q4(w, N, K, tile * LB_NR, wt);
            else lb_unpack_q8(w, N, K, tile * LB_NR, wt);
            lb_tile_params(s, b, boff, N, G, tile * LB_NR, sc, of);
            lb_dequant_tile(wt, sc, of, K, g, wf);
            lb_f32_tile(x, wf, bias, y, M, N, K, tile * LB_NR);
        }
        free(scratch);
    }
    return failed ? -1 : 0;
}
"""

_VP, _I64, _I32, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
_SIGNATURES = {
    "lowbit_quantize_blocks_mt": [_VP] * 4 + [_I64] * 4 + [_I32],
    "lowbit_q4a8_gemm": [_VP] * 6 + [_F32] + [_VP] * 2 + [_I64] * 5 + [_I32],
    "lowbit_q_gemm_f32": [_VP] * 4 + [_F32] + [_VP] * 2 + [_I64] * 5 + [_I32, _I32],
}
# Build variants: "native" (-march=native); "avx2" and "portable" force the other paths (tests).
VARIANT_FLAGS = {
    "native": ("-ffp-contract=off",),
    "avx2": ("-ffp-contract=off", "-mno-avx512f", "-mno-avxvnni"),
    "portable": ("-ffp-contract=off", "-mno-avx2"),
}


def library(variant: str = "native"):
    """The compiled kernels (``(lib, "")``) or ``(None, why)``."""
    name = "block_gemm" if variant == "native" else f"block_gemm_{variant}"
    lib, why = native.native_library(name, _C_SOURCE, _SIGNATURES, cflags=VARIANT_FLAGS[variant])
    if lib is not None and not getattr(lib, "_lowbit_typed", False):
        lib.lowbit_q4a8_gemm.restype = ctypes.c_int
        lib.lowbit_q_gemm_f32.restype = ctypes.c_int
        lib.lowbit_block_gemm_variant.argtypes, lib.lowbit_block_gemm_variant.restype = [], ctypes.c_int
        lib._lowbit_typed = True
    return lib, why


def path_name(variant: str = "native") -> str:
    """Which product a build runs: ``vnni512``, ``avx2``, ``scalar`` or ``unavailable``."""
    lib, _ = library(variant)
    return "unavailable" if lib is None else ("scalar", "avx2", "vnni512")[lib.lowbit_block_gemm_variant()]


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def quantize_blocks(x: torch.Tensor, group_size: int = 0, variant: str = "native"
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Activations (M, K) -> int8 codes (M, K), block scales (M, K/32) and group sums (M, G) of
    ``d * q`` (the offsets' share), as :func:`block_gemv.quantize_blocks_ref` rounds them; threaded."""
    x2 = x.float().contiguous()
    m, k = x2.shape
    if k % BLOCK:
        raise ConfigError(f"in_features {k} is not a multiple of {BLOCK}")
    g = group_size or k
    n_groups = -(-k // g)
    xq, d, sums = torch.empty(m, k, dtype=torch.int8), torch.empty(m, k // BLOCK), torch.empty(m, n_groups)
    lib, _ = library(variant)
    if lib is None:
        q, dd = block_gemv.quantize_blocks_ref(x2)
        blocks = (q.float().reshape(m, -1, BLOCK).sum(-1) * dd)  # (M, K/32): d * sum q per block
        per = g // BLOCK
        sums = torch.stack([blocks[:, j * per:(j + 1) * per].sum(-1) for j in range(n_groups)], dim=1)
        return q, dd, sums
    lib.lowbit_quantize_blocks_mt(x2.data_ptr(), xq.data_ptr(), d.data_ptr(), sums.data_ptr(), m, k, n_groups, g,
                                  torch.get_num_threads())
    return xq, d, sums


def block_gemm_a8(x: torch.Tensor, packed: torch.Tensor, s: torch.Tensor, b: torch.Tensor | None, bits: int,
                  group_size: int, bias: torch.Tensor | None = None, variant: str = "native") -> torch.Tensor:
    """Fast twin of :func:`block_gemv.block_linear_a8_ref` for prompts (4-bit codes; see the module
    docstring for the math and the order of its roundings)."""
    lib, _ = library(variant)
    if lib is None or bits != 4:
        return block_gemv.block_linear_a8(x, packed, s, b, bits, group_size, bias)
    k, g, n_groups = block_gemv._check(x, packed, s, b, bits, group_size)
    shape = x.shape
    x2 = x.reshape(-1, k)  # (M, K)
    m, n = x2.shape[0], packed.shape[0]
    xq, d, sums = quantize_blocks(x2, group_size, variant)
    y = torch.empty(m, n)
    bias = None if bias is None else bias.float().contiguous()
    rc = lib.lowbit_q4a8_gemm(xq.data_ptr(), d.data_ptr(), sums.data_ptr(), packed.data_ptr(), s.data_ptr(), _ptr(b),
                              block_gemv.offset_constant(bits), _ptr(bias), y.data_ptr(), m, n, k, n_groups, g,
                              torch.get_num_threads())
    if rc:
        raise MemoryError(f"block_gemm_a8: no memory for the {TILE_N} x {k} weight scratch")
    return y.reshape(*shape[:-1], n)


def block_gemm(x: torch.Tensor, packed: torch.Tensor, s: torch.Tensor, b: torch.Tensor | None, bits: int,
               group_size: int, bias: torch.Tensor | None = None, variant: str = "native") -> torch.Tensor:
    """Fast twin of :func:`block_gemv.block_linear_ref` for prompts (4- or 8-bit codes, fp32 activations):
    each 32-output tile dequantized once into a (K, 32) fp32 scratch, then FMAs over every row."""
    lib, _ = library(variant)
    if lib is None:
        return block_gemv.block_linear(x, packed, s, b, bits, group_size, bias)
    k, g, n_groups = block_gemv._check(x, packed, s, b, bits, group_size)
    shape = x.shape
    x2 = x.reshape(-1, k).float().contiguous()  # (M, K)
    m, n = x2.shape[0], packed.shape[0]
    y = torch.empty(m, n)
    bias = None if bias is None else bias.float().contiguous()
    rc = lib.lowbit_q_gemm_f32(x2.data_ptr(), packed.data_ptr(), s.data_ptr(), _ptr(b), block_gemv.offset_constant(bits),
                               _ptr(bias), y.data_ptr(), m, n, k, n_groups, g, bits, torch.get_num_threads())
    if rc:
        raise MemoryError(f"block_gemm: no memory for the {TILE_N} x {k} weight scratch")
    return y.reshape(*shape[:-1], n)


# ------------------------------------------------------------------------------- registry examples

def example_block_gemm_a8(seed: int) -> dict:
    """Odd shapes: seed 0 M = 37 (not a multiple of the 4-row tile), N = 80 (a 16-wide tail tile),
    K = 320 with g = 128 (a ragged last group) and stored offsets; seed 1 M = 9, N = 40, K = 96 with
    g = 32, symmetric (implied offsets)."""
    m, n, k, g, offsets = {0: (37, 80, 320, 128, True), 1: (9, 40, 96, 32, False)}[seed % 2]
    x, packed, s, b, bias = block_gemv._example(seed, 4, g, m, k=k, n=n)
    args = (x, packed, s, b if offsets else None, 4, g, bias)
    return {"fast": args, "reference": args, "exact": False, "tol": 1e-5}


def example_block_gemm(seed: int) -> dict:
    """fp32 activations: seed 0 4-bit, M = 37, N = 80, K = 320 with g = 128 and stored offsets; seed 1
    8-bit, M = 11, N = 40, K = 96 with g = 32 and implied (symmetric) offsets."""
    bits, m, n, k, g, offsets = {0: (4, 37, 80, 320, 128, True), 1: (8, 11, 40, 96, 32, False)}[seed % 2]
    x, packed, s, b, bias = block_gemv._example(seed, bits, g, m, k=k, n=n)
    args = (x, packed, s, b if offsets else None, bits, g, bias)
    return {"fast": args, "reference": args, "exact": False, "tol": 1e-5}
