"""Fused C kernel for HQQ's half-quadratic rounds (:mod:`lowbit.algorithms.hqq`), one group at a time.

The torch version (``hqq_quantize(..., backend="torch")``, alias ``hqq_quantize_ref``) runs every
round as ~20 passes over the whole ``(N, G, g)`` weight: each pass streams the full tensor through
memory. Here each group's ``g`` weights stay in L1 for all its rounds (codes, residual, shrinkage,
four sums, parameter step), groups are spread over OpenMP threads, and a group that has stopped
improving leaves the loop (``patience``), so no other group pays for it.

Same math as the torch rounds, step for step (the module docstring of ``hqq`` states it). Two things
differ below float rounding: ``|r|^(p-1) / beta`` is ``2^((p-1) log2|r| - log2 beta)`` from short
series (``log2 m = (2/ln 2) atanh((m-1)/(m+1))`` to ``s^9``, ``2^f = e^(f ln 2)`` to ``f^7``; relative
error ~1e-7, torch's ``exp``/``log`` differ by a few ulp as well), and the per-group sums are
accumulated in another order. The parameters are rounded to fp16 every round, which absorbs most of
that; where a rounding boundary is crossed the two paths may pick different (equally good) candidates,
so the twin test compares errors with a tolerance and codes on almost every weight
(tests/test_hqq.py). Given the same ``(s, z)``, the codes are computed by the same torch expression.
"""

from __future__ import annotations

import ctypes
import logging

import torch

from lowbit.kernels import native

log = logging.getLogger(__name__)

# mode bits of lowbit_hqq_groups
FIT_ZERO, FIT_SCALE, INTEGER_ZERO, KEEP_BEST = 1, 2, 4, 8

_C_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#define HQQ_EPS 1e-12f

static inline float f16r(float x) { return (float)(_Float16)x; }  /* round to fp16 (RNE), back to fp32 */

typedef union { float f; int32_t i; } fbits;
static inline float bits_to_f(int32_t b) { fbits x; x.i = b; return x.f; }
static inline int32_t f_to_bits(float f) { fbits x; x.f = f; return x.i; }

/* 2^(e * log2(a) - l2b) for a >= HQQ_EPS (a normal float): |r|^(p-1) / beta with e = p - 1. */
static inline float pow_shrink(float a, float e, float l2b) {
    int32_t b = f_to_bits(a);                                    /* a > 0: the sign bit is 0 */
    float ex = (float)((b >> 23) - 127);
    float m = bits_to_f((b & 0x7fffff) | 0x3f800000);            /* mantissa in [1, 2) */
    float big = m > 1.41421356f ? 1.0f : 0.0f;                   /* -> [sqrt(1/2), sqrt(2)) */
    m = m * (1.0f - 0.5f * big);
    ex = ex + big;
    float s = (m - 1.0f) / (m + 1.0f), s2 = s * s;               /* log2 m = (2/ln2) atanh(s) */
    float l = s * (2.8853900817779268f + s2 * (0.9617966939259756f + s2 * (0.5770780163555854f
              + s2 * (0.4121985831111324f + s2 * 0.3205988979753252f))));
    float y = e * (ex + l) - l2b;
    y = y < -126.0f ? -126.0f : (y > 126.0f ? 126.0f : y);
    float n = rintf(y);
    float f = (y - n) * 0.6931471805599453f;                     /* 2^(y-n) = e^f, |f| <= 0.35 */
    float p = 1.0f + f * (1.0f + f * (0.5f + f * (0.16666667f + f * (0.041666668f + f * (0.008333334f
              + f * (0.0013888889f + f * 0.0001984127f))))));
    return p * bits_to_f(((int32_t)n + 127) << 23);
}

static void hqq_group(const float *w, int64_t L, float s0, float z0, float *u, float *q,
                      int64_t iters, float e, float l2b, float l2k, float relax, float qmin, float qmax,
                      int mode, int64_t patience, float *out_s, float *out_z, float *out_err, float *out_err0,
                      int32_t *out_rounds) {
    const int fit_zero = mode & 1, fit_scale = mode & 2, int_zp = mode & 4, keep_best = mode & 8;
    const float count = (float)L, s0sq = s0 * s0;
    float err0 = 0.0f;
    #pragma omp simd reduction(+:err0)
    for (int64_t k = 0; k < L; k++) {
        float c = rintf(w[k] / s0 + z0);
        c = c < qmin ? qmin : (c > qmax ? qmax : c);
        float d = w[k] - s0 * (c - z0);
        err0 += d * d;
        u[k] = w[k] / s0;
    }
    float best_s = s0, best_z = z0, best_err = err0, sigma = 1.0f, z = z0, l2beta = l2b;
    int64_t stall = 0, it;
    for (it = 0; it <= iters; it++) {
        const float inv = 1.0f / sigma, sz = sigma * z;
        float rr = 0.0f;
        #pragma omp simd reduction(+:rr)
        for (int64_t k = 0; k < L; k++) {
            float c = rintf(z + u[k] * inv);
            c = c < qmin ? qmin : (c > qmax ? qmax : c);
            q[k] = c;
            float r = (sz - c * sigma) + u[k];
            rr += r * r;
        }
        if (it) {  /* score the previous round's (sigma, z) */
            float err = rr * s0sq;
            int better = keep_best ? err < best_err : 1;
            if (better) { best_s = s0 * sigma; best_z = z; best_err = err; stall = 0; }
            else stall++;
            if (patience > 0 && stall >= patience) break;
        }
        if (it == iters) break;
        float sq = 0.0f, sv = 0.0f, sqq = 0.0f, sqv = 0.0f;
        #pragma omp simd reduction(+:sq, sv, sqq, sqv)
        for (int64_t k = 0; k < L; k++) {
            float c = q[k];
            float r = (sz - c * sigma) + u[k];
            float a = fabsf(r);
            float t = pow_shrink(a > HQQ_EPS ? a : HQQ_EPS, e, l2beta);
            float sh = a - t;
            float v = u[k] - copysignf(sh > 0.0f ? sh : 0.0f, r);   /* v = w - W_e; 0 where r = 0 */
            sq += c; sv += v; sqq += c * c; sqv += c * v;
        }
        float new_s = sigma, new_z = z;
        if (fit_zero && !fit_scale) {
            new_z = (sq - sv / sigma) / count;
        } else if (!fit_zero) {
            new_s = sqq > 0.0f ? sqv / (sqq > HQQ_EPS ? sqq : HQQ_EPS) : sigma;
        } else {
            float mq = sq / count, mv = sv / count;
            float cov = sqv / count - mq * mv, var = sqq / count - mq * mq;
            int ok = (var > HQQ_EPS) && (cov > 0.0f);
            new_s = ok ? cov / (var > HQQ_EPS ? var : HQQ_EPS) : sigma;
            new_z = ok ? mq - mv / new_s : z;
            if (int_zp) {
                new_z = rintf(new_z);
                float num = sqv - new_z * sv, den = sqq - 2.0f * new_z * sq + new_z * new_z * count;
                new_s = den > HQQ_EPS ? num / (den > HQQ_EPS ? den : HQQ_EPS) : new_s;
            }
        }
        if (fit_scale) {
            new_s = sigma + relax * (new_s - sigma);
            if (new_s > 0.0f) {
                float st = f16r(s0 * new_s);
                st = st < 6.103515625e-05f ? 6.103515625e-05f : st;   /* smallest normal fp16 */
                sigma = st / s0;
            }
        }
        if (fit_zero) {
            if (!int_zp) new_z = f16r(z + relax * (new_z - z));
            z = new_z < qmin ? qmin : (new_z > qmax ? qmax : new_z);
        }
        l2beta += l2k;
    }
    *out_s = best_s; *out_z = best_z; *out_err = best_err; *out_err0 = err0;
    *out_rounds = (int32_t)(it < iters ? it : iters);
}

/* w: (N, K) row-major; groups of g contiguous columns, the last one ragged if g does not divide K.
   s0, z0, out_*: (N, G). */
void lowbit_hqq_groups(const float *w, int64_t N, int64_t K, int64_t g, const float *s0, const float *z0,
                       float *out_s, float *out_z, float *out_err, float *out_err0, int32_t *out_rounds,
                       int64_t iters, float lp, float log2_beta, float log2_kappa, float relax,
                       float qmin, float qmax, int mode, int64_t patience, int nthreads) {
    const int64_t G = (K + g - 1) / g;
    #pragma omp parallel num_threads(nthreads)
    {
        float *u = (float *)malloc(sizeof(float) * 2 * g), *q = u + g;
        #pragma omp for schedule(dynamic, 4)
        for (int64_t n = 0; n < N; n++) {
            for (int64_t j = 0; j < G; j++) {
                int64_t L = (j + 1) * g <= K ? g : K - j * g, o = n * G + j;
                hqq_group(w + n * K + j * g, L, s0[o], z0[o], u, q, iters, lp - 1.0f, log2_beta, log2_kappa,
                          relax, qmin, qmax, mode, patience, out_s + o, out_z + o, out_err + o, out_err0 + o,
                          out_rounds + o);
            }
        }
        free(u);
    }
}
"""


def native_library() -> tuple[ctypes.CDLL | None, str]:
    """The compiled kernel (built on first use, cached by source and CPU), or ``(None, why)``."""
    vp, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    return native.native_library("hqq_fit", _C_SOURCE, {
        "lowbit_hqq_groups": [vp, i64, i64, i64, vp, vp, vp, vp, vp, vp, vp, i64, f32, f32, f32, f32, f32, f32,
                              i32, i64, i32],
    }, cflags=("-ffp-contract=off", "-fno-trapping-math", "-fno-math-errno", "-fopenmp-simd"))


def hqq_groups(w: torch.Tensor, g: int, s0: torch.Tensor, z0: torch.Tensor, iters: int, lp: float, beta: float,
               kappa: float, relax: float, qmin: float, qmax: float, mode: int, patience: int
               ) -> tuple[torch.Tensor, ...] | None:
    """Run the rounds of every group of ``w`` (N, K) from the start ``s0, z0`` (N, G): returns each group's
    chosen ``(s, z)``, its squared error, RTN's squared error and the rounds it ran (all (N, G)), or
    ``None`` where the kernel could not be built (the caller runs the torch rounds)."""
    import math

    lib, _ = native_library()
    if lib is None:
        return None
    w = w.detach().to(torch.float32).contiguous()
    N, K = w.shape
    s0 = s0.to(torch.float32).contiguous()
    z0 = z0.to(torch.float32).contiguous()
    out = [torch.empty_like(s0) for _ in range(4)] + [torch.empty(s0.shape, dtype=torch.int32)]
    lib.lowbit_hqq_groups(w.data_ptr(), N, K, g, s0.data_ptr(), z0.data_ptr(), *(t.data_ptr() for t in out),
                          iters, lp, math.log2(beta), math.log2(kappa), relax, qmin, qmax, mode, patience,
                          torch.get_num_threads())
    return tuple(out)
