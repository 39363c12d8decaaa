"""Fused W8A8-dynamic linear in C: per-token int8 quantization, exact int8 x int8 -> int32 product and
the float epilogue in one call (the fast path of :func:`lowbit.kernels.int8_dynamic.int8_dynamic_linear`).

Math (identical to :func:`lowbit.kernels.int8_dynamic.int8_dynamic_linear_ref`), for x (M, K) and
int8 weights W^T = ``qweight_t`` (K, N):

    v      = x * smooth_inv                       (when smoothed; fp32)
    s_x[m] = max(max_k |v[m, k]| / 127, eps),     q = clamp(round_half_even(v / s_x), -127, 127)
    acc    = sum_k q[m, k] W^T[k, n]              (int32, exact)
    y      = float(acc) * (s_x[m] * s_W[n]) + bias[n]     (two roundings: a multiply, then an add)

The products are integer and exact on every path, so outputs equal the reference bit for bit
(the library is built with ``-ffp-contract=off`` so the epilogue's multiply and add round apart):

- AVX-512 VNNI (``vpdpbusd``: u8 x s8, four products summed into an int32 lane): the activation
  codes are offset to unsigned, ``a = q + 128``; then ``sum a w = sum q w + 128 sum_k w[k, n]`` and
  the column sums of the weights, computed once when packing, are subtracted.
- AVX2 (``vpmaddubsw``, u8 x s8 -> pairs summed in int16): the offset trick would saturate int16
  (255 * 127 * 2 > 32767), so the sign moves to the weights instead: ``|q| * sign(w, q)`` with
  ``|q|, |w| <= 127`` gives pairs of at most 2 * 127^2 = 32258 < 2^15, exact; ``vpmaddwd`` with ones
  widens to int32. This needs weight codes in [-127, 127] (``sign(-128)`` overflows): weights
  holding -128 take the torch path (:func:`packable`).
- otherwise a plain C loop.

Weights are packed once per weight tensor into blocks of 16 output channels ``(N/16, K/4, 16, 4)``
(four consecutive inputs of one channel in one 32-bit lane), N padded to 64 and K to 4 with zeros;
the packing is cached beside the module's buffer, never saved. Tiles of 6 tokens x 64 channels
(VNNI: 24 zmm accumulators) or 4 x 16 (AVX2) keep activations and weights in registers; OpenMP
splits the quantization over tokens and the tiles over both threads.
"""

from __future__ import annotations

import ctypes
import logging

import torch
import torch.nn.functional as F

from lowbit.kernels import native

log = logging.getLogger(__name__)

PACK_N = 64  # output channels are padded to a multiple of the VNNI tile's 64
BLOCK_N = 16  # channels per packed block (one zmm of int32 lanes)

_C_SOURCE = r"""
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define LB_VNNI 1
#define LB_MR 6
#elif defined(__AVX2__)
#define LB_AVX2 1
#define LB_MR 4
#else
#define LB_MR 4
#endif

#define LB_EPS FLT_EPSILON

int lowbit_w8a8_variant(void) {
#if defined(LB_VNNI)
    return 2;
#elif defined(LB_AVX2)
    return 1;
#else
    return 0;
#endif
}

/* Quantize one token: q (int8, K4 entries, zero beyond K), returns s_x. Every op is the torch
   fast path's: v = x * si, amax |v|, s = max(amax / 127, eps), q = clamp(rint(v / s), -127, 127). */
static float lb_quant_row(const float* x, const float* si, int64_t K, int64_t K4, int8_t* q) {
    int64_t k = 0;
    float amax = 0.0f;
#if defined(__AVX512F__)
    __m512 vm5 = _mm512_setzero_ps();
    for (; k + 16 <= K; k += 16) {
        __m512 v = _mm512_loadu_ps(x + k);
        if (si) v = _mm512_mul_ps(v, _mm512_loadu_ps(si + k));
        vm5 = _mm512_max_ps(vm5, _mm512_abs_ps(v));
    }
    amax = _mm512_reduce_max_ps(vm5);
#endif
#ifdef __AVX2__
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 vm = _mm256_setzero_ps();
    for (; k + 8 <= K; k += 8) {
        __m256 v = _mm256_loadu_ps(x + k);
        if (si) v = _mm256_mul_ps(v, _mm256_loadu_ps(si + k));
        vm = _mm256_max_ps(vm, _mm256_and_ps(v, absmask));
    }
    float t[8];
    _mm256_storeu_ps(t, vm);
    for (int i = 0; i < 8; ++i) amax = t[i] > amax ? t[i] : amax;
#endif
    for (; k < K; ++k) {
        float v = si ? x[k] * si[k] : x[k];
        v = fabsf(v);
        amax = v > amax ? v : amax;
    }
    float s = amax / 127.0f;
    if (s < LB_EPS) s = LB_EPS;
    k = 0;
#if defined(__AVX512F__)
    const __m512 vs5 = _mm512_set1_ps(s), lo5 = _mm512_set1_ps(-127.0f), hi5 = _mm512_set1_ps(127.0f);
    for (; k + 16 <= K; k += 16) {
        __m512 v = _mm512_loadu_ps(x + k);
        if (si) v = _mm512_mul_ps(v, _mm512_loadu_ps(si + k));
        v = _mm512_roundscale_ps(_mm512_div_ps(v, vs5), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm_storeu_si128((__m128i*)(q + k), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(v, lo5), hi5))));
    }
#endif
#ifdef __AVX2__
    const __m256 vs = _mm256_set1_ps(s), lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
    const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (; k + 32 <= K; k += 32) {
        __m256i c[4];
        for (int j = 0; j < 4; ++j) {
            __m256 v = _mm256_loadu_ps(x + k + 8 * j);
            if (si) v = _mm256_mul_ps(v, _mm256_loadu_ps(si + k + 8 * j));
            v = _mm256_round_ps(_mm256_div_ps(v, vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            c[j] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(v, lo), hi));
        }
        __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(c[0], c[1]), _mm256_packs_epi32(c[2], c[3]));
        _mm256_storeu_si256((__m256i*)(q + k), _mm256_permutevar8x32_epi32(p, perm));
    }
#endif
    for (; k < K; ++k) {
        float v = si ? x[k] * si[k] : x[k];
        float r = nearbyintf(v / s);
        r = r < -127.0f ? -127.0f : (r > 127.0f ? 127.0f : r);
        q[k] = (int8_t)r;
    }
    for (; k < K4; ++k) q[k] = 0;
    return s;
}

/* GELU (erf form): gelu(x) = x / 2 * (1 + erf(x / sqrt 2)), erf by Abramowitz & Stegun 7.1.26
   (|error| <= 1.5e-7): erf(z) = 1 - (a1 t + a2 t^2 + a3 t^3 + a4 t^4 + a5 t^5) e^{-z^2}, t = 1 / (1 + p z),
   z >= 0, odd in z. e^u (u <= 0) as 2^n e^r with n = round(u / ln 2), r = u - n ln 2 (ln 2 split in
   two), e^r by its Taylor series to degree 7 (relative error < 1e-8 for |r| <= ln 2 / 2). */
#define LB_ERF_P 0.3275911f
#define LB_ERF_A1 0.254829592f
#define LB_ERF_A2 -0.284496736f
#define LB_ERF_A3 1.421413741f
#define LB_ERF_A4 -1.453152027f
#define LB_ERF_A5 1.061405429f
static inline float lb_gelu_s(float x) {
    float z = fabsf(x) * 0.70710678118654752f;
    float t = 1.0f / (1.0f + LB_ERF_P * z);
    float p = ((((LB_ERF_A5 * t + LB_ERF_A4) * t + LB_ERF_A3) * t + LB_ERF_A2) * t + LB_ERF_A1) * t;
    float e = 1.0f - p * expf(-z * z);
    e = x < 0.0f ? -e : e;
    return 0.5f * x * (1.0f + e);
}
""" + native.EXP512_C + r"""
#if defined(__AVX512F__)
static inline __m512 lb_gelu512(__m512 x) {
    const __m512 one = _mm512_set1_ps(1.0f);
    __m512 ax = _mm512_abs_ps(x);
    __m512 z = _mm512_mul_ps(ax, _mm512_set1_ps(0.70710678118654752f));
    __m512 t = _mm512_div_ps(one, _mm512_fmadd_ps(_mm512_set1_ps(LB_ERF_P), z, one));
    __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(LB_ERF_A5), t, _mm512_set1_ps(LB_ERF_A4));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(LB_ERF_A3));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(LB_ERF_A2));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(LB_ERF_A1));
    p = _mm512_mul_ps(p, t);
    __m512 e = _mm512_fnmadd_ps(p, lb_exp512(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), z), z)), one);
    /* sign of x onto erf */
    e = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(e),
            _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32((int)0x80000000u))));
    return _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), x), _mm512_add_ps(one, e));
}
#endif

/* Epilogues after y = acc * (s_x s_W) (+ bias): LB_EPI_NONE; LB_EPI_GELU: y = gelu(y);
   LB_EPI_RES: y = y + res (res has y's layout), the residual add of a transformer block. */
#define LB_EPI_NONE 0
#define LB_EPI_GELU 1
#define LB_EPI_RES 2
static inline void lb_epi(float* y, const float* res, int64_t cnt, int epi) {
    if (epi == LB_EPI_GELU) for (int64_t c = 0; c < cnt; ++c) y[c] = lb_gelu_s(y[c]);
    else if (epi == LB_EPI_RES) for (int64_t c = 0; c < cnt; ++c) y[c] = y[c] + res[c];
}

/* y[m, n] = float(acc) * (s_x[m] * s_W[n]) (+ bias[n]) for the channels n0 .. n0 + cnt - 1, then the epilogue. */
static inline void lb_store(const int32_t* acc, float sx, const float* ws, const float* bias, float* y, int64_t cnt,
                            int epi, const float* res) {
    for (int64_t c = 0; c < cnt; ++c) {
        float t = sx * ws[c];
        float v = (float)acc[c] * t;
        y[c] = bias ? v + bias[c] : v;
    }
    lb_epi(y, res, cnt, epi);
}

#ifdef LB_VNNI
static inline int32_t lb_ld4(const uint8_t* p) { int32_t v; memcpy(&v, p, 4); return v; }

/* 6 tokens x 64 channels, 24 zmm accumulators named so they stay in registers; a: unsigned codes
   (q + 128), rows of K4 bytes (rows past M are padding and are not stored); w: four packed blocks. */
#define LB_ROW(i) { __m512i b = _mm512_set1_epi32(lb_ld4(a + (i) * K4 + k)); \
    c##i##0 = _mm512_dpbusd_epi32(c##i##0, b, w0); c##i##1 = _mm512_dpbusd_epi32(c##i##1, b, w1); \
    c##i##2 = _mm512_dpbusd_epi32(c##i##2, b, w2); c##i##3 = _mm512_dpbusd_epi32(c##i##3, b, w3); }
#define LB_Z(i) __m512i c##i##0 = _mm512_setzero_si512(), c##i##1 = c##i##0, c##i##2 = c##i##0, c##i##3 = c##i##0;
static void lb_tile(const uint8_t* a, int64_t K4, const int8_t* w, const int32_t* corr, const float* sx,
                    const float* ws, const float* bias, float* y, int64_t N, int64_t n0, int mr,
                    int epi, const float* res) {
    LB_Z(0) LB_Z(1) LB_Z(2) LB_Z(3) LB_Z(4) LB_Z(5)
    const int64_t bs = K4 * 16;  /* bytes per packed block of 16 channels */
    for (int64_t k = 0; k < K4; k += 4) {
        __m512i w0 = _mm512_loadu_si512(w + 16 * k), w1 = _mm512_loadu_si512(w + bs + 16 * k);
        __m512i w2 = _mm512_loadu_si512(w + 2 * bs + 16 * k), w3 = _mm512_loadu_si512(w + 3 * bs + 16 * k);
        LB_ROW(0) LB_ROW(1) LB_ROW(2) LB_ROW(3) LB_ROW(4) LB_ROW(5)
    }
    __m512i acc[6][4] = {{c00, c01, c02, c03}, {c10, c11, c12, c13}, {c20, c21, c22, c23},
                         {c30, c31, c32, c33}, {c40, c41, c42, c43}, {c50, c51, c52, c53}};
    for (int j = 0; j < 4; ++j) {
        int64_t n = n0 + 16 * j;
        if (n >= N) break;
        __m512i c = _mm512_loadu_si512(corr + n);
        if (n + 16 <= N) {
            __m512 vw = _mm512_loadu_ps(ws + n), vb = bias ? _mm512_loadu_ps(bias + n) : _mm512_setzero_ps();
            for (int i = 0; i < mr; ++i) {
                __m512 t = _mm512_mul_ps(_mm512_set1_ps(sx[i]), vw);
                __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[i][j], c)), t);
                if (bias) v = _mm512_add_ps(v, vb);
                if (epi == LB_EPI_GELU) v = lb_gelu512(v);
                else if (epi == LB_EPI_RES) v = _mm512_add_ps(v, _mm512_loadu_ps(res + i * N + n));
                _mm512_storeu_ps(y + i * N + n, v);
            }
        } else {
            int32_t tmp[16];
            for (int i = 0; i < mr; ++i) {
                _mm512_storeu_si512(tmp, _mm512_sub_epi32(acc[i][j], c));
                lb_store(tmp, sx[i], ws + n, bias ? bias + n : 0, y + i * N + n, N - n, epi, res ? res + i * N + n : 0);
            }
        }
    }
}
#elif defined(LB_AVX2)
static inline int32_t lb_ld4(const void* p) { int32_t v; memcpy(&v, p, 4); return v; }

/* 4 tokens x 16 channels; a: |q| and s: q, rows of K4 bytes (rows past M are zero padding); w: one
   packed block. |q| * sign(w, q) = q w per byte, pairs summed in int16 (<= 32258), then int32. */
#define LB_ROW2(i) { __m256i ab = _mm256_set1_epi32(lb_ld4(a + (i) * K4 + k)), sb = _mm256_set1_epi32(lb_ld4(s + (i) * K4 + k)); \
    c##i##0 = _mm256_add_epi32(c##i##0, _mm256_madd_epi16(_mm256_maddubs_epi16(ab, _mm256_sign_epi8(w0, sb)), ones)); \
    c##i##1 = _mm256_add_epi32(c##i##1, _mm256_madd_epi16(_mm256_maddubs_epi16(ab, _mm256_sign_epi8(w1, sb)), ones)); }
#define LB_Z2(i) __m256i c##i##0 = _mm256_setzero_si256(), c##i##1 = c##i##0;
static void lb_tile16(const uint8_t* a, const int8_t* s, int64_t K4, const int8_t* w, const float* sx,
                      const float* ws, const float* bias, float* y, int64_t N, int64_t n, int mr,
                      int epi, const float* res) {
    const __m256i ones = _mm256_set1_epi16(1);
    LB_Z2(0) LB_Z2(1) LB_Z2(2) LB_Z2(3)
    for (int64_t k = 0; k < K4; k += 4) {
        __m256i w0 = _mm256_loadu_si256((const __m256i*)(w + 16 * k));
        __m256i w1 = _mm256_loadu_si256((const __m256i*)(w + 16 * k + 32));
        LB_ROW2(0) LB_ROW2(1) LB_ROW2(2) LB_ROW2(3)
    }
    __m256i acc[4][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}};
    if (n + 16 <= N) {
        __m256 vw0 = _mm256_loadu_ps(ws + n), vw1 = _mm256_loadu_ps(ws + n + 8);
        for (int i = 0; i < mr; ++i) {
            __m256 t0 = _mm256_mul_ps(_mm256_set1_ps(sx[i]), vw0), t1 = _mm256_mul_ps(_mm256_set1_ps(sx[i]), vw1);
            __m256 v0 = _mm256_mul_ps(_mm256_cvtepi32_ps(acc[i][0]), t0);
            __m256 v1 = _mm256_mul_ps(_mm256_cvtepi32_ps(acc[i][1]), t1);
            if (bias) {
                v0 = _mm256_add_ps(v0, _mm256_loadu_ps(bias + n));
                v1 = _mm256_add_ps(v1, _mm256_loadu_ps(bias + n + 8));
            }
            _mm256_storeu_ps(y + i * N + n, v0);
            _mm256_storeu_ps(y + i * N + n + 8, v1);
            lb_epi(y + i * N + n, res ? res + i * N + n : 0, 16, epi);
        }
    } else {
        int32_t tmp[16];
        for (int i = 0; i < mr; ++i) {
            _mm256_storeu_si256((__m256i*)tmp, acc[i][0]);
            _mm256_storeu_si256((__m256i*)(tmp + 8), acc[i][1]);
            lb_store(tmp, sx[i], ws + n, bias ? bias + n : 0, y + i * N + n, N - n, epi, res ? res + i * N + n : 0);
        }
    }
}
#endif

/* Codes of row m of x (M, K) into the scratch rows of K4 bytes: q (signed, zeros past K and for
   m >= M), the tile operand a (VNNI: q + 128, AVX2: |q|) and s_x[m]. Any thread may run any row. */
static void lb_code_row(const float* x, const float* si, int64_t m, int64_t M, int64_t K, int64_t K4,
                        int8_t* q, uint8_t* a, float* sx) {
    int8_t* qr = q + m * K4;
    if (m < M) {
        sx[m] = lb_quant_row(x + m * K, si, K, K4, qr);
    } else {
        memset(qr, 0, K4);
        sx[m] = 0.0f;
    }
#if defined(LB_VNNI)
    for (int64_t k = 0; k < K4; ++k) a[m * K4 + k] = (uint8_t)(qr[k] + 128);
#elif defined(LB_AVX2)
    for (int64_t k = 0; k < K4; ++k) a[m * K4 + k] = (uint8_t)abs(qr[k]);
#else
    (void)a;
#endif
}

/* Rows of scratch codes a GEMM over M tokens needs (whole tiles of every path, zero rows past M). */
static inline int64_t lb_rows_padded(int64_t M) { return (M + 11) / 12 * 12; }

/* The number of independent output tiles of an (M, N) product, and tile t of it (channel blocks
   outer, token blocks inner: the order of the collapsed loop this replaced). */
static inline int64_t lb_tiles(int64_t M, int64_t N) {
#if defined(LB_VNNI)
    return ((N + 63) / 64) * ((M + LB_MR - 1) / LB_MR);
#elif defined(LB_AVX2)
    return ((N + 15) / 16) * ((M + LB_MR - 1) / LB_MR);
#else
    (void)M;
    return (N + 15) / 16;
#endif
}

static void lb_run_tile(int64_t t, int64_t M, int64_t N, int64_t K4, const int8_t* q, const uint8_t* a,
                        const float* sx, const int8_t* w, const int32_t* corr, const float* ws, const float* bias,
                        float* y, int epi, const float* res) {
#if defined(LB_VNNI)
    const int64_t mt = (M + LB_MR - 1) / LB_MR, jb = t / mt, it = t % mt;
    int64_t m0 = it * LB_MR, n0 = jb * 64;
    int mr = M - m0 < LB_MR ? (int)(M - m0) : LB_MR;
    (void)q;
    lb_tile(a + m0 * K4, K4, w + (n0 / 16) * K4 * 16, corr, sx + m0, ws, bias, y + m0 * N, N, n0, mr,
            epi, res ? res + m0 * N : 0);
#elif defined(LB_AVX2)
    const int64_t mt = (M + LB_MR - 1) / LB_MR, jb = t / mt, it = t % mt;
    int64_t m0 = it * LB_MR;
    int mr = M - m0 < LB_MR ? (int)(M - m0) : LB_MR;
    (void)corr;
    lb_tile16(a + m0 * K4, q + m0 * K4, K4, w + jb * K4 * 16, sx + m0, ws, bias, y + m0 * N, N, jb * 16, mr,
              epi, res ? res + m0 * N : 0);
#else
    const int64_t jb = t;
    (void)a; (void)corr;
    for (int64_t m = 0; m < M; ++m) {
        int32_t acc[16] = {0};
        const int8_t* wb = w + jb * K4 * 16;
        for (int64_t k = 0; k < K4; k += 4)
            for (int c = 0; c < 16; ++c)
                for (int u = 0; u < 4; ++u) acc[c] += (int32_t)q[m * K4 + k + u] * wb[16 * k + 4 * c + u];
        int64_t n = jb * 16;
        lb_store(acc, sx[m], ws + n, bias ? bias + n : 0, y + m * N + n, N - n < 16 ? N - n : 16,
                 epi, res ? res + m * N + n : 0);
    }
#endif
}

/* x (M, K) fp32, si (K,) or NULL, w packed (NP/16, K4/4, 16, 4) int8, corr (NP,) int32 (128 * the
   column sums, VNNI only), ws (N,), bias (N,) or NULL, y (M, N) fp32. Scratch (malloc'd here): the
   codes (2, MP, K4) int8 with MP = M rounded up to whole tiles (padding rows are zero codes) and sx (MP,). */
int lowbit_w8a8_linear(const float* x, const float* si, const int8_t* w, const int32_t* corr, const float* ws,
                       const float* bias, float* y, int64_t M, int64_t N, int64_t K, int nthreads) {
    const int64_t K4 = (K + 3) / 4 * 4, MP = lb_rows_padded(M);
    int8_t* codes = (int8_t*)malloc((size_t)(2 * MP * K4) + (size_t)MP * sizeof(float));
    if (!codes) return -1;
    float* sx = (float*)(codes + 2 * MP * K4);  /* 2 * MP * K4 is a multiple of 4 */
    int8_t* q = codes;
    uint8_t* a = (uint8_t*)(codes + MP * K4);
    const int64_t nt = lb_tiles(M, N);
    #pragma omp parallel num_threads(nthreads)
    {
        #pragma omp for schedule(static)
        for (int64_t m = 0; m < MP; ++m) lb_code_row(x, si, m, M, K, K4, q, a, sx);
        #pragma omp for schedule(static)
        for (int64_t t = 0; t < nt; ++t) lb_run_tile(t, M, N, K4, q, a, sx, w, corr, ws, bias, y, LB_EPI_NONE, 0);
    }
    free(codes);
    return 0;
}
"""

_VP = ctypes.c_void_p
_ARGS = [_VP] * 7 + [ctypes.c_int64] * 3 + [ctypes.c_int]
# Build variants: "native" (-march=native); "avx2" and "portable" force the other paths (tests).
VARIANT_FLAGS = {
    "native": ("-ffp-contract=off",),
    "avx2": ("-ffp-contract=off", "-mno-avx512f", "-mno-avxvnni"),
    "portable": ("-ffp-contract=off", "-mno-avx2"),  # the plain C loop
}


def library(variant: str = "native"):
    """The compiled kernel (``(lib, "")``) or ``(None, why)``."""
    name = "int8_gemm" if variant == "native" else f"int8_gemm_{variant}"
    lib, why = native.native_library(name, _C_SOURCE, {"lowbit_w8a8_linear": _ARGS}, cflags=VARIANT_FLAGS[variant])
    if lib is not None and not getattr(lib, "_lowbit_typed", False):
        lib.lowbit_w8a8_linear.restype = ctypes.c_int
        lib.lowbit_w8a8_variant.argtypes, lib.lowbit_w8a8_variant.restype = [], ctypes.c_int
        lib._lowbit_typed = True
    return lib, why


def path_name(variant: str = "native") -> str:
    """Which integer product the built library runs: ``vnni512``, ``avx2``, ``scalar`` or ``unavailable``."""
    lib, _ = library(variant)
    return "unavailable" if lib is None else ("scalar", "avx2", "vnni512")[lib.lowbit_w8a8_variant()]


class Packed:
    """A weight in the kernel's layout: ``w`` (NP/16, K4/4, 16, 4) int8, ``corr`` (NP,) int32 = 128 * column
    sums, and ``fn``: the library function that computes with it exactly (None: use the torch path)."""

    def __init__(self, qweight_t: torch.Tensor, variant: str = "native"):
        k, n = qweight_t.shape
        k4, np_ = -(-k // 4) * 4, -(-n // PACK_N) * PACK_N
        w = F.pad(qweight_t.to(torch.int8), (0, np_ - n, 0, k4 - k))  # (K4, NP), zeros appended
        self.w = w.reshape(k4 // 4, 4, np_ // BLOCK_N, BLOCK_N).permute(2, 0, 3, 1).contiguous()  # (NP/16, K4/4, 16, 4)
        self.corr = (w.sum(0, dtype=torch.int32) * 128).contiguous()  # (NP,)
        self.has_min = bool((qweight_t == -128).any())  # -128 breaks the AVX2 sign trick
        self.k, self.n = k, n
        lib, _ = library(variant)
        self.fn = lib.lowbit_w8a8_linear if lib is not None and packable(self, variant) else None


def pack(qweight_t: torch.Tensor, variant: str = "native") -> Packed:
    return Packed(qweight_t, variant)


def packable(packed: Packed, variant: str = "native") -> bool:
    """Whether the library's integer product is exact for these codes (AVX2 needs no -128)."""
    return not (packed.has_min and path_name(variant) == "avx2")


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return t if t is None or (t.dtype == torch.float32 and t.is_contiguous()) else t.float().contiguous()


def w8a8_linear(x2: torch.Tensor, packed: Packed, w_scale: torch.Tensor, bias: torch.Tensor | None,
                smooth_inv: torch.Tensor | None, nthreads: int | None = None) -> torch.Tensor:
    """(M, K) -> (M, N) fp32 through the C kernel (see the module docstring); ``packed.fn`` must be set."""
    x2, ws, b, si = _f32(x2), _f32(w_scale), _f32(bias), _f32(smooth_inv)
    m = x2.shape[0]
    y = torch.empty(m, packed.n)
    rc = packed.fn(x2.data_ptr(), None if si is None else si.data_ptr(), packed.w.data_ptr(), packed.corr.data_ptr(),
                   ws.data_ptr(), None if b is None else b.data_ptr(), y.data_ptr(), m, packed.n, packed.k,
                   nthreads or torch.get_num_threads())
    if rc:
        raise MemoryError(f"w8a8 kernel: no memory for the scratch codes of {m} x {packed.k}")
    return y
