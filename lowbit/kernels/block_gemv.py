"""Weight-quantized matrix-vector products for decoding: 4- or 8-bit codes, fp32 activations.

One layout serves every grouped integer weight lowbit stores (symmetric or affine RTN/GPTQ/AWQ,
HQQ's float zero-points, GGUF's Q4_0 / Q4_1 / Q8_0). A weight row ``n`` of ``K`` inputs is

    W[n, k] = s[n, j] * u[n, k] + b[n, j]        j = k // g  (the group of k; g a multiple of 32)

with unsigned codes ``u`` (0..15 or 0..255), per-group scale ``s`` (fp16, as lowbit's modules and
GGUF store it) and offset ``b`` (fp32, or not stored for symmetric codes): a
symmetric code ``q = u - 8`` has ``b = -8 s``, an affine one ``s (q - z)`` has ``b = -z s``, Q4_1's
``d u + m`` has ``b = m``. The product of a row of ``x`` with it is then

    y[m, n] = sum_j ( s[n, j] * sum_{k in j} u[n, k] x[m, k]  +  b[n, j] * X[m, j] ),   X[m, j] = sum_{k in j} x[m, k]

so the inner loop only converts codes to float and multiplies-adds; the offsets cost one product
per group and row. 4-bit codes are packed per block of 32 inputs as ggml does for Q4_0
(ggml-common.h ``block_q4_0``): byte ``i`` of a block holds input ``i`` in its low nibble and input
``i + 16`` in its high nibble, so one 16-byte load and two masks give 32 codes in order.

- :func:`block_linear` (fast): an AVX2/FMA C kernel, OpenMP over output rows, built at first use
  (:mod:`lowbit.kernels.native`). Each weight byte is read once per call for all ``M`` rows of ``x``,
  which is what decoding needs (``M`` = batch, one token each); the weights never pass through a
  dequantized copy. Without a compiler it falls back to the reference.
- :func:`block_linear_ref`: dequantize ``W`` in fp32 and ``F.linear``. The two agree to fp32
  summation order.
"""

from __future__ import annotations

import ctypes
import logging

import torch
import torch.nn.functional as F

from lowbit.errors import ConfigError
from lowbit.kernels import native

log = logging.getLogger(__name__)

BLOCK = 32  # inputs per packed block; group sizes must be multiples of it

_C_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LB_AVX2 1
#elif defined(__F16C__)
#include <immintrin.h>
#endif

/* Scales are stored in fp16 (as the modules hold them): 2 bytes per group read per token. */
static inline float lb_h2f(uint16_t h) {
#ifdef __F16C__
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff, f;
    if (e == 0) {
        float v = ldexpf((float)m, -24);  /* zero or subnormal */
        return sign ? -v : v;
    }
    f = e == 31 ? (sign | 0x7f800000u | (m << 13)) : (sign | ((e + 112) << 23) | (m << 13));
    float out;
    memcpy(&out, &f, sizeof out);
    return out;
#endif
}

static inline float lb_hsum(
#ifdef LB_AVX2
    __m256 v
#else
    const float* v
#endif
) {
#ifdef LB_AVX2
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
#else
    float t = 0; for (int i = 0; i < 8; ++i) t += v[i]; return t;
#endif
}

/* X[m, j] = sum of x[m, k] over group j (G groups of g, the last may be short). */
static void lb_group_sums(const float* x, float* X, int64_t M, int64_t K, int64_t G, int64_t g) {
    for (int64_t m = 0; m < M; ++m)
        for (int64_t j = 0; j < G; ++j) {
            int64_t k0 = j * g, k1 = k0 + g < K ? k0 + g : K;
            float t = 0.0f;
            for (int64_t k = k0; k < k1; ++k) t += x[m * K + k];
            X[m * G + j] = t;
        }
}

#define LB_MAX_M 16
#define LB_ROW_GROUPS 1024  /* rows of up to 1024 groups convert their scales up front */

#ifdef LB_AVX2
static inline void lb_scales_row(const uint16_t* h, float* out, int64_t G) {
    int64_t j = 0;
    for (; j + 8 <= G; j += 8) _mm256_storeu_ps(out + j, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(h + j))));
    for (; j < G; ++j) out[j] = lb_h2f(h[j]);
}
#endif
#ifdef LB_AVX2
/* Sums of four u8 x s8 products into each int32 lane (lane j: bytes 4j..4j+3), exact here (|u x| <=
   15 * 127): one vpdpbusd with VNNI, else maddubs (pairs to int16, no saturation at these ranges)
   and madd with ones. Identical integers either way. */
static inline __m256i lb_dot4(__m256i u, __m256i x) {
#if defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, x);
#elif defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, x);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, x), _mm256_set1_epi16(1));
#endif
}
/* The offsets' share of one output, sum_j b_j X_j over a row's G groups (X: the activation block
   sums per group), times mul = boff when the offsets are implied (bo = the scales, b_j = boff s_j). */
static inline float lb_offset_dot(const float* bo, const float* X, int64_t G, float mul) {
    __m256 vo = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= G; j += 8) vo = _mm256_fmadd_ps(_mm256_loadu_ps(bo + j), _mm256_loadu_ps(X + j), vo);
    float off = lb_hsum(vo);
    for (; j < G; ++j) off += bo[j] * X[j];
    return off * mul;
}
#endif
/* The offset of group idx: stored, or boff * s for symmetric codes (boff = -2^(bits-1), b = NULL). */
#define LB_S(idx) lb_h2f(s[idx])
#define LB_B(idx) (b ? b[idx] : boff * LB_S(idx))

#ifdef LB_AVX2
/* One row of x (M = 1, decoding): four independent accumulators per group hide the FMA latency. */
static void lb_q4_row(const float* x, const uint8_t* w, const uint16_t* s, const float* b, float boff, const float* bias,
                      float* y, const float* X, int64_t N, int64_t K, int64_t G, int64_t g, int nthreads) {
    const int64_t nb = K / 32, bpg = g / 32;
    const __m128i low = _mm_set1_epi8(0x0F);
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; ++n) {
        const uint8_t* wr = w + n * (K / 2);
        __m256 vt = _mm256_setzero_ps();
        float tot = bias ? bias[n] : 0.0f;
        for (int64_t j = 0; j < G; ++j) {
            int64_t b0 = j * bpg, b1 = b0 + bpg < nb ? b0 + bpg : nb;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (int64_t blk = b0; blk < b1; ++blk) {
                __m128i q = _mm_loadu_si128((const __m128i*)(wr + blk * 16));
                __m128i lo = _mm_and_si128(q, low), hi = _mm_and_si128(_mm_srli_epi16(q, 4), low);
                const float* xr = x + blk * 32;
                a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), _mm256_loadu_ps(xr), a0);
                a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))),
                                     _mm256_loadu_ps(xr + 8), a1);
                a2 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), _mm256_loadu_ps(xr + 16), a2);
                a3 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))),
                                     _mm256_loadu_ps(xr + 24), a3);
            }
            __m256 a = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
            vt = _mm256_fmadd_ps(a, _mm256_set1_ps(LB_S(n * G + j)), vt);
            tot += LB_B(n * G + j) * X[j];
        }
        y[n] = tot + lb_hsum(vt);
    }
}

static void lb_q8_row(const float* x, const uint8_t* w, const uint16_t* s, const float* b, float boff, const float* bias,
                      float* y, const float* X, int64_t N, int64_t K, int64_t G, int64_t g, int nthreads) {
    const int64_t nb = K / 32, bpg = g / 32;
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; ++n) {
        const uint8_t* wr = w + n * K;
        __m256 vt = _mm256_setzero_ps();
        float tot = bias ? bias[n] : 0.0f;
        for (int64_t j = 0; j < G; ++j) {
            int64_t b0 = j * bpg, b1 = b0 + bpg < nb ? b0 + bpg : nb;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (int64_t blk = b0; blk < b1; ++blk) {
                const uint8_t* q = wr + blk * 32;
                const float* xr = x + blk * 32;
                a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)q))),
                                     _mm256_loadu_ps(xr), a0);
                a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(q + 8)))),
                                     _mm256_loadu_ps(xr + 8), a1);
                a2 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(q + 16)))),
                                     _mm256_loadu_ps(xr + 16), a2);
                a3 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(q + 24)))),
                                     _mm256_loadu_ps(xr + 24), a3);
            }
            __m256 a = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
            vt = _mm256_fmadd_ps(a, _mm256_set1_ps(LB_S(n * G + j)), vt);
            tot += LB_B(n * G + j) * X[j];
        }
        y[n] = tot + lb_hsum(vt);
    }
}
#endif

/* 4-bit: w is (N, K/2) bytes, blocks of 32 inputs as 16 bytes (low nibble i, high nibble i + 16). */
void lowbit_q4_linear(const float* x, const uint8_t* w, const uint16_t* s, const float* b, float boff, const float* bias,
                      float* y, float* X, int64_t M, int64_t N, int64_t K, int64_t G, int64_t g, int nthreads) {
    lb_group_sums(x, X, M, K, G, g);
    const int64_t nb = K / 32, bpg = g / 32;
#ifdef LB_AVX2
    if (M == 1) { lb_q4_row(x, w, s, b, boff, bias, y, X, N, K, G, g, nthreads); return; }
#endif
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; ++n) {
        const uint8_t* wr = w + n * (K / 2);
        for (int64_t m0 = 0; m0 < M; m0 += LB_MAX_M) {
            int64_t mc = M - m0 < LB_MAX_M ? M - m0 : LB_MAX_M;
            float tot[LB_MAX_M];
            for (int64_t i = 0; i < mc; ++i) tot[i] = bias ? bias[n] : 0.0f;
#ifdef LB_AVX2
            __m256 vt[LB_MAX_M];
            for (int64_t i = 0; i < mc; ++i) vt[i] = _mm256_setzero_ps();
            const __m128i low = _mm_set1_epi8(0x0F);
            for (int64_t j = 0; j < G; ++j) {
                int64_t b0 = j * bpg, b1 = b0 + bpg < nb ? b0 + bpg : nb;
                __m256 va[LB_MAX_M];
                for (int64_t i = 0; i < mc; ++i) va[i] = _mm256_setzero_ps();
                for (int64_t blk = b0; blk < b1; ++blk) {
                    __m128i q = _mm_loadu_si128((const __m128i*)(wr + blk * 16));
                    __m128i lo = _mm_and_si128(q, low), hi = _mm_and_si128(_mm_srli_epi16(q, 4), low);
                    __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
                    __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
                    __m256 w2 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
                    __m256 w3 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
                    for (int64_t i = 0; i < mc; ++i) {
                        const float* xr = x + (m0 + i) * K + blk * 32;
                        __m256 a = va[i];
                        a = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xr), a);
                        a = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xr + 8), a);
                        a = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xr + 16), a);
                        a = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xr + 24), a);
                        va[i] = a;
                    }
                }
                __m256 vs = _mm256_set1_ps(LB_S(n * G + j));
                float bj = LB_B(n * G + j);
                for (int64_t i = 0; i < mc; ++i) {
                    vt[i] = _mm256_fmadd_ps(va[i], vs, vt[i]);
                    tot[i] += bj * X[(m0 + i) * G + j];
                }
            }
            for (int64_t i = 0; i < mc; ++i) y[(m0 + i) * N + n] = tot[i] + lb_hsum(vt[i]);
#else
            for (int64_t j = 0; j < G; ++j) {
                int64_t b0 = j * bpg, b1 = b0 + bpg < nb ? b0 + bpg : nb;
                for (int64_t i = 0; i < mc; ++i) {
                    const float* xr = x + (m0 + i) * K;
                    float a = 0.0f;
                    for (int64_t blk = b0; blk < b1; ++blk)
                        for (int t = 0; t < 16; ++t) {
                            uint8_t c = wr[blk * 16 + t];
                            a += (float)(c & 15) * xr[blk * 32 + t] + (float)(c >> 4) * xr[blk * 32 + t + 16];
                        }
                    tot[i] += LB_S(n * G + j) * a + LB_B(n * G + j) * X[(m0 + i) * G + j];
                }
            }
            for (int64_t i = 0; i < mc; ++i) y[(m0 + i) * N + n] = tot[i];
#endif
        }
    }
}

/* 8-bit: w is (N, K) unsigned codes. */
void lowbit_q8_linear(const float* x, const uint8_t* w, const uint16_t* s, const float* b, float boff, const float* bias,
                      float* y, float* X, int64_t M, int64_t N, int64_t K, int64_t G, int64_t g, int nthreads) {
    lb_group_sums(x, X, M, K, G, g);
    const int64_t nb = K / 32, bpg = g / 32;
#ifdef LB_AVX2
    if (M == 1) { lb_q8_row(x, w, s, b, boff, bias, y, X, N, K, G, g, nthreads); return; }
#endif
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; ++n) {
        const uint8_t* wr = w + n * K;
        for (int64_t m0 = 0; m0 < M; m0 += LB_MAX_M) {
            int64_t mc = M - m0 < LB_MAX_M ? M - m0 : LB_MAX_M;
            float tot[LB_MAX_M];
            for (int64_t i = 0; i < mc; ++i) tot[i] = bias ? bias[n] : 0.0f;
#ifdef LB_AVX2
            __m256 vt[LB_MAX_M];
            for (int64_t i = 0; i < mc; ++i) vt[i] = _mm256_setzero_ps();
            for (int64_t j = 0; j < G; ++j) {
                int64_t b0 = j * bpg, b1 = b0 + bpg < nb ? b0 + bpg : nb;
                __m256 va[LB_MAX_M];
                for (int64_t i = 0; i < mc; ++i) va[i] = _mm256_setzero_ps();
                for (int64_t blk = b0; blk < b1; ++blk) {
                    __m128i q0 = _mm_loadu_si128((const __m128i*)(wr + blk * 32));
                    __m128i q1 = _mm_loadu_si128((const __m128i*)(wr + blk * 32 + 16));
                    __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(q0));
                    __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(q0, 8)));
                    __m256 w2 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(q1));
                    __m256 w3 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(q1, 8)));
                    for (int64_t i = 0; i < mc; ++i) {
                        const float* xr = x + (m0 + i) * K + blk * 32;
                        __m256 a = va[i];
                        a = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xr), a);
                        a = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xr + 8), a);
                        a = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xr + 16), a);
                        a = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xr + 24), a);
                        va[i] = a;
                    }
                }
                __m256 vs = _mm256_set1_ps(LB_S(n * G + j));
                float bj = LB_B(n * G + j);
                for (int64_t i = 0; i < mc; ++i) {
                    vt[i] = _mm256_fmadd_ps(va[i], vs, vt[i]);
                    tot[i] += bj * X[(m0 + i) * G + j];
                }
            }
            for (int64_t i = 0; i < mc; ++i) y[(m0 + i) * N + n] = tot[i] + lb_hsum(vt[i]);
#else
            for (int64_t j = 0; j < G; ++j) {
                int64_t k0 = j * g, k1 = k0 + g < K ? k0 + g : K;
                for (int64_t i = 0; i < mc; ++i) {
                    const float* xr = x + (m0 + i) * K;
                    float a = 0.0f;
                    for (int64_t k = k0; k < k1; ++k) a += (float)wr[k] * xr[k];
                    tot[i] += LB_S(n * G + j) * a + LB_B(n * G + j) * X[(m0 + i) * G + j];
                }
            }
            for (int64_t i = 0; i < mc; ++i) y[(m0 + i) * N + n] = tot[i];
#endif
        }
    }
}

/* ---- int8 activations (W4A8): x quantized per block of 32 as ggml's Q8_0 does for its dot products ----
   xq[m, k] = round(x[m, k] / d[m, blk]), d = max|x| / 127 over the block (0 -> all codes 0);
   Xq[m, j] = sum over the group's blocks of d * sum(xq): the offset term uses the quantized x too. */
void lowbit_quantize_blocks(const float* x, int8_t* xq, float* d, float* Xq, int64_t M, int64_t K, int64_t G,
                            int64_t g) {
    const int64_t nb = K / 32, bpg = g / 32;
    for (int64_t m = 0; m < M; ++m) {
        for (int64_t j = 0; j < G; ++j) Xq[m * G + j] = 0.0f;
        for (int64_t blk = 0; blk < nb; ++blk) {
            const float* xr = x + m * K + blk * 32;
            float amax = 0.0f;
            for (int i = 0; i < 32; ++i) { float a = xr[i] < 0 ? -xr[i] : xr[i]; if (a > amax) amax = a; }
            float dd = amax / 127.0f, inv = dd > 0.0f ? 1.0f / dd : 0.0f;
            int sum = 0;
            for (int i = 0; i < 32; ++i) {
                int q = (int)nearbyintf(xr[i] * inv);
                xq[m * K + blk * 32 + i] = (int8_t)q;
                sum += q;
            }
            d[m * nb + blk] = dd;
            Xq[m * G + blk / bpg] += dd * (float)sum;
        }
    }
}

void lowbit_q4a8_linear(const int8_t* xq, const float* d, const float* Xq, const uint8_t* w, const uint16_t* s,
                        const float* b, float boff, const float* bias, float* y, int64_t M, int64_t N, int64_t K, int64_t G,
                        int64_t g, int nthreads) {
    const int64_t nb = K / 32, bpg = g / 32;
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; ++n) {
        const uint8_t* wr = w + n * (K / 2);
        int64_t m = 0;
#ifdef LB_AVX2
        if (M >= 4 && bpg <= 2 && G <= LB_ROW_GROUPS) {
            /* Prompts with small groups (Q4_0's 32): four rows of x per decoded block of codes, each
               block's factor s[group] * d[row, block] computed up front for the four rows (8 blocks per
               instruction), so the block loop is integer dot products and one FMA per row; the offsets
               are one dot of length G per row at the end. */
            const __m256i low = _mm256_set1_epi8(0x0F);
            const __m256i ones = _mm256_set1_epi16(1);
            float sr[LB_ROW_GROUPS];           /* this weight row's scales in fp32 */
            float sw[2 * LB_ROW_GROUPS];       /* per block: s[group] */
            float sd[4][2 * LB_ROW_GROUPS];    /* per tile row and block: s[group] * d[row, block] */
            lb_scales_row(s + n * G, sr, G);
            for (int64_t blk = 0; blk < nb; ++blk) sw[blk] = sr[bpg == 1 ? blk : blk >> 1];
            const float* bo = b ? b + n * G : sr;
            for (; m + 4 <= M; m += 4) {
                const int8_t* x0 = xq + m * K;
                for (int i = 0; i < 4; ++i) {
                    const float* di = d + (m + i) * nb;
                    int64_t blk = 0;
                    for (; blk + 8 <= nb; blk += 8)
                        _mm256_storeu_ps(sd[i] + blk, _mm256_mul_ps(_mm256_loadu_ps(sw + blk), _mm256_loadu_ps(di + blk)));
                    for (; blk < nb; ++blk) sd[i][blk] = sw[blk] * di[blk];
                }
                __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
                for (int64_t blk = 0; blk < nb; ++blk) {
                    __m128i q = _mm_loadu_si128((const __m128i*)(wr + blk * 16));
                    __m256i u = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(q, 4), q), low);
#define LB_ROW(i, acc) acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lb_dot4(u, \
                    _mm256_loadu_si256((const __m256i*)(x0 + (i) * K + blk * 32)))), \
                    _mm256_broadcast_ss(sd[i] + blk), acc)
                    LB_ROW(0, a0); LB_ROW(1, a1); LB_ROW(2, a2); LB_ROW(3, a3);
#undef LB_ROW
                }
                __m256 acc[4] = {a0, a1, a2, a3};
                for (int i = 0; i < 4; ++i)
                    y[(m + i) * N + n] = (bias ? bias[n] : 0.0f) + lb_offset_dot(bo, Xq + (m + i) * G, G, b ? 1.0f : boff)
                                         + lb_hsum(acc[i]);
            }
        }
        /* Prompts: four rows of x per decoded block of codes (the nibble unpacking is shared). */
        for (; m + 4 <= M; m += 4) {
            const __m128i low = _mm_set1_epi8(0x0F);
            const __m256i ones = _mm256_set1_epi16(1);
            __m256 vt0 = _mm256_setzero_ps(), vt1 = vt0, vt2 = vt0, vt3 = vt0;
            float t0 = bias ? bias[n] : 0.0f, t1 = t0, t2 = t0, t3 = t0;
            const int8_t* x0 = xq + m * K;
            const float* d0 = d + m * nb;
            for (int64_t j = 0; j < G; ++j) {
                int64_t b0 = j * bpg, b1 = b0 + bpg < nb ? b0 + bpg : nb;
                __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
                for (int64_t blk = b0; blk < b1; ++blk) {
                    __m128i q = _mm_loadu_si128((const __m128i*)(wr + blk * 16));
                    __m256i u = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(q, 4), low), _mm_and_si128(q, low));
#define LB_ROW(i, acc) acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lb_dot4(u, \
                    _mm256_loadu_si256((const __m256i*)(x0 + (i) * K + blk * 32)))), \
                    _mm256_set1_ps(d0[(i) * nb + blk]), acc)
                    LB_ROW(0, a0); LB_ROW(1, a1); LB_ROW(2, a2); LB_ROW(3, a3);
#undef LB_ROW
                }
                __m256 vs = _mm256_set1_ps(LB_S(n * G + j));
                float bj = LB_B(n * G + j);
                vt0 = _mm256_fmadd_ps(a0, vs, vt0); t0 += bj * Xq[m * G + j];
                vt1 = _mm256_fmadd_ps(a1, vs, vt1); t1 += bj * Xq[(m + 1) * G + j];
                vt2 = _mm256_fmadd_ps(a2, vs, vt2); t2 += bj * Xq[(m + 2) * G + j];
                vt3 = _mm256_fmadd_ps(a3, vs, vt3); t3 += bj * Xq[(m + 3) * G + j];
            }
            y[m * N + n] = t0 + lb_hsum(vt0);
            y[(m + 1) * N + n] = t1 + lb_hsum(vt1);
            y[(m + 2) * N + n] = t2 + lb_hsum(vt2);
            y[(m + 3) * N + n] = t3 + lb_hsum(vt3);
        }
#endif
        for (; m < M; ++m) {
            const int8_t* xr = xq + m * K;
            const float* dm = d + m * nb;
#ifdef LB_AVX2
            if (bpg <= 2 && G <= LB_ROW_GROUPS) {
                /* Small groups (Q4_0's 32): the group scale goes into each block's factor s * d,
                   computed for the whole row first (8 blocks per instruction when g = 32), so the
                   block loop has no per-group reduction and no scalar work; the offsets are one
                   dot of length G at the end. */
                const __m256i low = _mm256_set1_epi8(0x0F);
                const __m256i ones = _mm256_set1_epi16(1);
                __m256 a0 = _mm256_setzero_ps(), a1 = a0;
                float sr[LB_ROW_GROUPS];      /* this row's scales in fp32 */
                float sd[2 * LB_ROW_GROUPS];  /* per block: s[group] * d[block] */
                lb_scales_row(s + n * G, sr, G);
                int64_t blk = 0;
                if (bpg == 1) {
                    for (; blk + 8 <= nb; blk += 8)
                        _mm256_storeu_ps(sd + blk, _mm256_mul_ps(_mm256_loadu_ps(sr + blk), _mm256_loadu_ps(dm + blk)));
                    for (; blk < nb; ++blk) sd[blk] = sr[blk] * dm[blk];
                } else {
                    for (; blk < nb; ++blk) sd[blk] = sr[blk >> 1] * dm[blk];
                }
                for (blk = 0; blk + 1 < nb; blk += 2) {
                    __m128i q0 = _mm_loadu_si128((const __m128i*)(wr + blk * 16));
                    __m128i q1 = _mm_loadu_si128((const __m128i*)(wr + blk * 16 + 16));
                    __m256i u0 = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(q0, 4), q0), low);
                    __m256i u1 = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(q1, 4), q1), low);
                    __m256i p0 = lb_dot4(u0, _mm256_loadu_si256((const __m256i*)(xr + blk * 32)));
                    __m256i p1 = lb_dot4(u1, _mm256_loadu_si256((const __m256i*)(xr + blk * 32 + 32)));
                    a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_broadcast_ss(sd + blk), a0);
                    a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), _mm256_broadcast_ss(sd + blk + 1), a1);
                }
                for (; blk < nb; ++blk) {
                    __m128i q0 = _mm_loadu_si128((const __m128i*)(wr + blk * 16));
                    __m256i u0 = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(q0, 4), q0), low);
                    __m256i p0 = lb_dot4(u0, _mm256_loadu_si256((const __m256i*)(xr + blk * 32)));
                    a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_broadcast_ss(sd + blk), a0);
                }
                const float* bo = b ? b + n * G : sr;
                y[m * N + n] = (bias ? bias[n] : 0.0f) + lb_offset_dot(bo, Xq + m * G, G, b ? 1.0f : boff)
                               + lb_hsum(_mm256_add_ps(a0, a1));
                continue;
            }
#endif
            float tot = bias ? bias[n] : 0.0f;
#ifdef LB_AVX2
            const __m128i low = _mm_set1_epi8(0x0F);
            const __m256i ones = _mm256_set1_epi16(1);
            __m256 vt = _mm256_setzero_ps();
            for (int64_t j = 0; j < G; ++j) {
                int64_t b0 = j * bpg, b1 = b0 + bpg < nb ? b0 + bpg : nb;
                __m256 a0 = _mm256_setzero_ps(), a1 = a0;
                int64_t blk = b0;
                for (; blk + 1 < b1; blk += 2) {
                    __m128i q0 = _mm_loadu_si128((const __m128i*)(wr + blk * 16));
                    __m128i q1 = _mm_loadu_si128((const __m128i*)(wr + blk * 16 + 16));
                    __m256i u0 = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(q0, 4), low), _mm_and_si128(q0, low));
                    __m256i u1 = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(q1, 4), low), _mm_and_si128(q1, low));
                    __m256i p0 = lb_dot4(u0, _mm256_loadu_si256((const __m256i*)(xr + blk * 32)));
                    __m256i p1 = lb_dot4(u1, _mm256_loadu_si256((const __m256i*)(xr + blk * 32 + 32)));
                    a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_set1_ps(dm[blk]), a0);
                    a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), _mm256_set1_ps(dm[blk + 1]), a1);
                }
                for (; blk < b1; ++blk) {
                    __m128i q0 = _mm_loadu_si128((const __m128i*)(wr + blk * 16));
                    __m256i u0 = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(q0, 4), low), _mm_and_si128(q0, low));
                    __m256i p0 = lb_dot4(u0, _mm256_loadu_si256((const __m256i*)(xr + blk * 32)));
                    a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_set1_ps(dm[blk]), a0);
                }
                vt = _mm256_fmadd_ps(_mm256_add_ps(a0, a1), _mm256_set1_ps(LB_S(n * G + j)), vt);
                tot += LB_B(n * G + j) * Xq[m * G + j];
            }
            y[m * N + n] = tot + lb_hsum(vt);
#else
            for (int64_t j = 0; j < G; ++j) {
                int64_t b0 = j * bpg, b1 = b0 + bpg < nb ? b0 + bpg : nb;
                float a = 0.0f;
                for (int64_t blk = b0; blk < b1; ++blk) {
                    int dot = 0;
                    for (int t = 0; t < 16; ++t) {
                        uint8_t c = wr[blk * 16 + t];
                        dot += (c & 15) * xr[blk * 32 + t] + (c >> 4) * xr[blk * 32 + t + 16];
                    }
                    a += dm[blk] * (float)dot;
                }
                tot += LB_S(n * G + j) * a + LB_B(n * G + j) * Xq[m * G + j];
            }
            y[m * N + n] = tot;
#endif
        }
    }
}

/* Rows of a 4-bit table: out[r, k] = s[row, j] * u[row, k] + b[row, j] (an embedding lookup). */
void lowbit_q4_rows(const int64_t* rows, const uint8_t* w, const uint16_t* s, const float* b, float boff, float* out,
                    int64_t R, int64_t K, int64_t G, int64_t g) {
    for (int64_t r = 0; r < R; ++r) {
        const uint8_t* wr = w + rows[r] * (K / 2);
        for (int64_t k = 0; k < K; ++k) {
            int64_t blk = k / 32, i = k % 32;
            uint8_t c = wr[blk * 16 + (i & 15)];
            int u = i < 16 ? (c & 15) : (c >> 4);
            int64_t j = k / g;
            out[r * K + k] = LB_S(rows[r] * G + j) * (float)u + LB_B(rows[r] * G + j);
        }
    }
}

/* Rows of an 8-bit table. */
void lowbit_q8_rows(const int64_t* rows, const uint8_t* w, const uint16_t* s, const float* b, float boff, float* out,
                    int64_t R, int64_t K, int64_t G, int64_t g) {
    for (int64_t r = 0; r < R; ++r)
        for (int64_t k = 0; k < K; ++k) {
            int64_t j = k / g;
            out[r * K + k] = LB_S(rows[r] * G + j) * (float)w[rows[r] * K + k] + LB_B(rows[r] * G + j);
        }
}
"""

_VP, _I64, _I32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_F32 = ctypes.c_float
_LINEAR_ARGS = [_VP] * 4 + [_F32] + [_VP] * 3 + [_I64] * 5 + [_I32]
_ROWS_ARGS = [_VP] * 4 + [_F32, _VP] + [_I64] * 4
_QUANT_ARGS = [_VP] * 4 + [_I64] * 4
_A8_ARGS = [_VP] * 6 + [_F32] + [_VP] * 2 + [_I64] * 5 + [_I32]


def library():
    """The compiled kernels, or ``(None, why)``."""
    return native.native_library("block_gemv", _C_SOURCE, {
        "lowbit_q4_linear": _LINEAR_ARGS, "lowbit_q8_linear": _LINEAR_ARGS,
        "lowbit_q4_rows": _ROWS_ARGS, "lowbit_q8_rows": _ROWS_ARGS,
        "lowbit_quantize_blocks": _QUANT_ARGS, "lowbit_q4a8_linear": _A8_ARGS,
    }, cflags=("-ffp-contract=off",))  # scalar s * u + b rounds like the torch reference


# ------------------------------------------------------------------------------------- layout

def check_layout(bits: int, k: int, group_size: int) -> str:
    """Why (K, group_size) does not fit the block layout, or ``""``."""
    if bits not in (4, 8):
        return f"block kernels take 4- or 8-bit codes, not {bits}"
    if k % BLOCK:
        return f"in_features {k} is not a multiple of {BLOCK}"
    if group_size and group_size % BLOCK:
        return f"group_size {group_size} is not a multiple of {BLOCK}"
    return ""


def pack_codes(u: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes (N, K) -> the kernel's bytes: (N, K/2) for 4 bits (block layout), (N, K) for 8."""
    u = u.to(torch.uint8)
    if bits == 8:
        return u.contiguous()
    n, k = u.shape
    blocks = u.reshape(n, k // BLOCK, 2, BLOCK // 2)  # (N, K/32, [first 16, last 16], 16)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(n, k // 2).contiguous()


def unpack_codes(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: (N, K) uint8 codes."""
    if bits == 8:
        return packed
    n = packed.shape[0]
    blocks = packed.reshape(n, k // BLOCK, BLOCK // 2)  # (N, K/32, 16)
    return torch.stack([blocks & 15, blocks >> 4], dim=2).reshape(n, k)  # (N, K/32, 2, 16) -> (N, K)


def offset_constant(bits: int) -> float:
    """``boff`` of symmetric codes stored without offsets (``b = None``): ``b = boff * s``, ``u = q + 2^(bits-1)``."""
    return -float(2 ** (bits - 1))


def dequantize_ref(packed: torch.Tensor, s: torch.Tensor, b: torch.Tensor | None, bits: int, k: int,
                   group_size: int) -> torch.Tensor:
    """``W = s u + b`` per group, fp32 (N, K); ``b = None`` means ``b = -2^(bits-1) s`` (symmetric codes)."""
    g = group_size or k
    u = unpack_codes(packed, bits, k).float()
    s = s.float()
    if b is None:
        b = s * offset_constant(bits)
    s_k = s.repeat_interleave(g, dim=1)[:, :k]  # (N, G*g) -> (N, K): the last group may be short
    b_k = b.repeat_interleave(g, dim=1)[:, :k]
    return u * s_k + b_k


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def _check(x: torch.Tensor, packed: torch.Tensor, s: torch.Tensor, b: torch.Tensor, bits: int, group_size: int):
    k = x.shape[-1]
    why = check_layout(bits, k, group_size)
    if why:
        raise ConfigError(why)
    g = group_size or k
    n_groups = -(-k // g)
    width = k // 2 if bits == 4 else k
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] != width:
        raise ConfigError(f"packed codes must be uint8 (N, {width}) for K={k} at {bits} bits, "
                          f"got {packed.dtype} {tuple(packed.shape)}")
    if s.dtype != torch.float16:
        raise ConfigError(f"block kernels take fp16 scales, got {s.dtype}")
    want = (packed.shape[0], n_groups)
    if tuple(s.shape) != want or (b is not None and tuple(b.shape) != want):
        raise ConfigError(f"scale/offset must be {want}, got {tuple(s.shape)} / {None if b is None else tuple(b.shape)}")
    return k, g, n_groups


def block_linear_ref(x: torch.Tensor, packed: torch.Tensor, s: torch.Tensor, b: torch.Tensor, bits: int,
                     group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: ``F.linear(x, s u + b, bias)`` in fp32."""
    k, _, _ = _check(x, packed, s, b, bits, group_size)
    w = dequantize_ref(packed, s.float(), None if b is None else b.float(), bits, k, group_size)
    return F.linear(x.float(), w, None if bias is None else bias.float())


def block_linear(x: torch.Tensor, packed: torch.Tensor, s: torch.Tensor, b: torch.Tensor, bits: int,
                 group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Fast twin of :func:`block_linear_ref` (``s``, ``b`` fp32 contiguous (N, G); ``x`` (..., K))."""
    lib, _ = library()
    if lib is None:
        return block_linear_ref(x, packed, s, b, bits, group_size, bias)
    k, g, n_groups = _check(x, packed, s, b, bits, group_size)
    shape = x.shape
    x2 = x.reshape(-1, k).float().contiguous()  # (M, K)
    m, n = x2.shape[0], packed.shape[0]
    y = torch.empty(m, n)
    sums = torch.empty(m, n_groups)
    fn = lib.lowbit_q4_linear if bits == 4 else lib.lowbit_q8_linear
    fn(x2.data_ptr(), packed.data_ptr(), s.data_ptr(), _ptr(b), offset_constant(bits), _ptr(bias),
       y.data_ptr(), sums.data_ptr(), m, n, k, n_groups, g, torch.get_num_threads())
    return y.reshape(*shape[:-1], n)


def quantize_blocks_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations (M, K) -> int8 codes (M, K) and scales (M, K/32): ``d = max|x| / 127`` per block
    of 32, ``q = round(x / d)`` (half to even; a zero block gets d = 0 and codes 0)."""
    m, k = x.shape
    blocks = x.float().reshape(m, k // BLOCK, BLOCK)  # (M, K/32, 32)
    d = blocks.abs().amax(-1) / 127.0
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round(blocks * inv[..., None]).to(torch.int8)
    return q.reshape(m, k), d


def block_linear_a8_ref(x: torch.Tensor, packed: torch.Tensor, s: torch.Tensor, b: torch.Tensor, bits: int,
                        group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """W4A8 reference: ``F.linear(x_hat, s u + b, bias)`` with ``x_hat = d q`` from :func:`quantize_blocks_ref`."""
    k, _, _ = _check(x, packed, s, b, bits, group_size)
    shape = x.shape
    q, d = quantize_blocks_ref(x.reshape(-1, k))
    x_hat = (q.float().reshape(q.shape[0], -1, BLOCK) * d[..., None]).reshape(q.shape)  # (M, K)
    w = dequantize_ref(packed, s.float(), None if b is None else b.float(), bits, k, group_size)
    return F.linear(x_hat, w, None if bias is None else bias.float()).reshape(*shape[:-1], -1)


def block_linear_a8(x: torch.Tensor, packed: torch.Tensor, s: torch.Tensor, b: torch.Tensor, bits: int,
                    group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Fast twin of :func:`block_linear_a8_ref` for 4-bit codes: the products ``u q`` are summed as
    integers (``maddubs``: at most 2 * 15 * 127 per pair, no saturation), then scaled per block."""
    lib, _ = library()
    if lib is None or bits != 4:
        return block_linear_a8_ref(x, packed, s, b, bits, group_size, bias)
    k, g, n_groups = _check(x, packed, s, b, bits, group_size)
    shape = x.shape
    x2 = x.reshape(-1, k).float().contiguous()  # (M, K)
    m, n = x2.shape[0], packed.shape[0]
    xq = torch.empty(m, k, dtype=torch.int8)
    d = torch.empty(m, k // BLOCK)
    sums = torch.empty(m, n_groups)
    lib.lowbit_quantize_blocks(x2.data_ptr(), xq.data_ptr(), d.data_ptr(), sums.data_ptr(), m, k, n_groups, g)
    y = torch.empty(m, n)
    lib.lowbit_q4a8_linear(xq.data_ptr(), d.data_ptr(), sums.data_ptr(), packed.data_ptr(), s.data_ptr(),
                           _ptr(b), offset_constant(bits), _ptr(bias), y.data_ptr(), m, n, k,
                           n_groups, g, torch.get_num_threads())
    return y.reshape(*shape[:-1], n)


def block_rows_ref(ids: torch.Tensor, packed: torch.Tensor, s: torch.Tensor, b: torch.Tensor, bits: int,
                   k: int, group_size: int) -> torch.Tensor:
    """Dequantized rows ``ids`` (any shape) of a (V, K) table -> (*ids.shape, K)."""
    flat = ids.reshape(-1)
    w = dequantize_ref(packed[flat], s[flat].float(), None if b is None else b[flat].float(), bits, k, group_size)
    return w.reshape(*ids.shape, k)


def block_rows(ids: torch.Tensor, packed: torch.Tensor, s: torch.Tensor, b: torch.Tensor, bits: int,
               k: int, group_size: int) -> torch.Tensor:
    """Fast twin of :func:`block_rows_ref` (an embedding lookup that reads only the rows asked for)."""
    lib, _ = library()
    if lib is None:
        return block_rows_ref(ids, packed, s, b, bits, k, group_size)
    flat = ids.reshape(-1).to(torch.int64).contiguous()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= packed.shape[0]):
        raise ConfigError(f"token ids must lie in [0, {packed.shape[0]}), got {int(flat.min())}..{int(flat.max())}")
    g = group_size or k
    out = torch.empty(flat.numel(), k)
    fn = lib.lowbit_q4_rows if bits == 4 else lib.lowbit_q8_rows
    fn(flat.data_ptr(), packed.data_ptr(), s.data_ptr(), _ptr(b), offset_constant(bits), out.data_ptr(), flat.numel(), k,
       s.shape[1], g)
    return out.reshape(*ids.shape, k)


# ------------------------------------------------------------------------------- registry examples

def _example(seed: int, bits: int, group_size: int, m: int, k: int = 320, n: int = 48):
    g = torch.Generator().manual_seed(seed)
    n_groups = -(-k // (group_size or k))
    u = torch.randint(0, 2 ** bits, (n, k), generator=g, dtype=torch.uint8)
    s = (torch.rand(n, n_groups, generator=g) * 0.1 + 0.01).half()
    b = -s.float() * (2 ** (bits - 1)) + torch.randn(n, n_groups, generator=g) * 0.01
    x, bias = torch.randn(m, k, generator=g), torch.randn(n, generator=g)
    return x, pack_codes(u, bits), s.contiguous(), b.contiguous(), bias


def example_block_linear(seed: int) -> dict:
    """4-bit, K = 320 with g = 128 (a ragged last group of 64), M = 19 (more than one row tile)."""
    x, packed, s, b, bias = _example(seed, 4, 128, 19)
    args = (x, packed, s, b, 4, 128, bias)
    return {"fast": args, "reference": args, "exact": False, "tol": 1e-5}


def example_block_linear_m1(seed: int) -> dict:
    """The decoding path (M = 1), 4-bit g = 64; seed 1 has symmetric codes (offsets not stored)."""
    x, packed, s, b, bias = _example(seed, 4, 64, 1)
    args = (x, packed, s, None if seed % 2 else b, 4, 64, bias)
    return {"fast": args, "reference": args, "exact": False, "tol": 1e-5}


def example_block_linear_q8(seed: int) -> dict:
    """8-bit: seed 0 takes the row-tile path (M = 3), seed 1 the decoding path (M = 1)."""
    x, packed, s, b, bias = _example(seed, 8, 64, 3 if seed % 2 == 0 else 1)
    args = (x, packed, s, b, 8, 64, None)
    return {"fast": args, "reference": args, "exact": False, "tol": 1e-5}


def example_block_linear_a8(seed: int) -> dict:
    """W4A8: M = 1 (decoding) with g = 96 (three blocks per group, a ragged tail) for seed 0; M = 7
    (a tile of 4 rows and 3 single rows) with g = 32 (the small-group paths) for seed 1; seeds 2 and 3
    add M = 6 at g = 64 with stored offsets (small groups, two blocks each) and at g = 96 (the
    general tile)."""
    g, m, offsets = {0: (96, 1, True), 1: (32, 7, False), 2: (64, 6, True), 3: (96, 6, True)}[seed % 4]
    x, packed, s, b, bias = _example(seed, 4, g, m)
    args = (x, packed, s, b if offsets else None, 4, g, bias)
    return {"fast": args, "reference": args, "exact": False, "tol": 1e-5}


def example_quantize_blocks(seed: int) -> dict:
    """Activation codes are exact (same division-free formula); one block is all zeros."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 96, generator=g) * 4
    x[1, 32:64] = 0
    return {"fast": (x,), "reference": (x,), "exact": True}


def quantize_blocks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fast twin of :func:`quantize_blocks_ref` (the C prologue of :func:`block_linear_a8`)."""
    lib, _ = library()
    if lib is None:
        return quantize_blocks_ref(x)
    x2 = x.float().contiguous()
    m, k = x2.shape
    xq, d, sums = torch.empty(m, k, dtype=torch.int8), torch.empty(m, k // BLOCK), torch.empty(m, 1)
    lib.lowbit_quantize_blocks(x2.data_ptr(), xq.data_ptr(), d.data_ptr(), sums.data_ptr(), m, k, 1, k)
    return xq, d


def example_block_rows(seed: int) -> dict:
    """Embedding rows are exact: one product and one sum per element in both twins."""
    _, packed, s, b, _ = _example(seed, 4, 64, 1)
    ids = torch.tensor([[0, 47, 3], [3, 3, 12]])
    args = (ids, packed, s, None if seed % 2 else b, 4, 320, 64)
    return {"fast": args, "reference": args, "exact": True}
