"""One decoding step of a Llama-layout transformer in C: every layer for one new token, one call.

With one token per step the layer's arithmetic is small (SmolLM2: 3.5 M weights per layer) and a
Python loop of torch ops spends more time dispatching (norms, RoPE, attention over a few hundred
cached positions, SiLU, residual adds: ~25 ops per layer) than computing. :func:`llama_token_step`
runs, for each layer ``l`` and the residual stream ``h`` (H,):

    x = h / sqrt(mean(h^2) + eps) * w_in                               (RMSNorm, Zhang & Sennrich 2019)
    q | k | v = W_qkv x (+ b)                                          (block GEMV, lowbit.kernels.block_gemv)
    q, k = rope(q, pos), rope(k, pos)      rope(x)_i = x_i cos_i - x_{i+d/2} sin_i,  rope(x)_{i+d/2} = x_{i+d/2} cos + x_i sin
    K[l, pos] = k ;  V[l, pos] = v
    a_h = sum_t softmax_t(q_h . K[t, kv(h)] / sqrt(d)) V[t, kv(h)]    (t <= pos; kv(h) = h // (n_heads / n_kv))
    h = h + W_o a
    x = RMSNorm(h) * w_post ;  g | u = W_gu x ;  h = h + W_d (silu(g) * u)      [(silu(g) * u) H_I / sqrt(I)
                                                                                when the layer is rotated]

The bracket is QuaRot's online Hadamard before ``down_proj`` (:class:`lowbit.nn.hadamard.HadamardMLP`):
with ``I = m p``, ``H_I = H_m ⊗ H_p`` and the product viewed as ``X`` (m, p), ``x H_I = H_m^T X H_p`` —
Walsh-Hadamard butterflies on each row of ``X`` (as :func:`lowbit.kernels.hadamard.hadamard_transform`,
whose twin is the dense product), then the small dense ``H_m^T`` over the rows.

with the projections of :mod:`lowbit.kernels.block_gemv` (fp32 activations, or int8 per block of 32
when ``a8``; a projection with SINQ's input scales runs each part ``j`` of its rows on ``t_j * x``).
Each projection is a ``lb_proj`` record (codes, scale, offset, bias, shape, bits, input scales) built
once by :class:`lowbit.models.decode.Decoder`; the caches are that decoder's fp32 tensors of
(n_kv, max_len, head_dim) per layer. The reference twin is the decoder's torch forward
(``Decoder(..., kernel="reference")``); ``tests/test_decode.py`` checks that they agree.
"""

from __future__ import annotations

import ctypes

from lowbit.kernels import block_gemv, native

_STEP_SOURCE = r"""
typedef struct {
    const uint8_t* w; const uint16_t* s; const float* b; const float* bias;
    int64_t N, K, G, g; int64_t bits; float boff;
    const float* t; int64_t P; int64_t pn[4];  /* input scales (P, K) and each part's rows, or t = NULL */
} lb_proj;

typedef struct {
    const float* in_norm; const float* post_norm;
    lb_proj qkv, o, gu, down;
    float* kc; float* vc;   /* (n_kv, max_len, head_dim): max_len is the cache's current capacity */
    const float* down_hm; int64_t down_m;   /* online Hadamard before down: H_m (m, m) +-1, or NULL */
} lb_layer;

/* x (I) <- x H_I / sqrt(I), H_I = H_m kron H_p (p = I / m a power of two); tmp holds I floats. */
static void lb_hadamard(float* x, const float* hm, int64_t m, int64_t I, float* tmp) {
    const int64_t p = I / m;
    for (int64_t a = 0; a < m; ++a) {       /* X[a] H_p: butterflies (u, v) -> (u + v, u - v) */
        float* r = x + a * p;
        for (int64_t h = 1; h < p; h *= 2)
            for (int64_t blk = 0; blk < p; blk += 2 * h)
                for (int64_t i = blk; i < blk + h; ++i) {
                    float u = r[i], v = r[i + h];
                    r[i] = u + v; r[i + h] = u - v;
                }
    }
    const float norm = sqrtf((float)I);
    if (m > 1) {                              /* H_m^T X: row o = sum_a H_m[a, o] X[a] */
        for (int64_t o = 0; o < m; ++o) {
            float* y = tmp + o * p;
            for (int64_t b = 0; b < p; ++b) y[b] = 0.0f;
            for (int64_t a = 0; a < m; ++a) {
                const float c = hm[a * m + o];
                const float* r = x + a * p;
                for (int64_t b = 0; b < p; ++b) y[b] += c * r[b];
            }
        }
        for (int64_t i = 0; i < I; ++i) x[i] = tmp[i] / norm;
    } else {
        for (int64_t i = 0; i < I; ++i) x[i] /= norm;
    }
}

/* y = W x (+ bias) for one row x of K inputs; xq/d/X are scratch for the int8-activation path. With input
   scales (SINQ) part j of the rows computes W_j (t_j * x) (xs: K floats of scratch). */
static void lb_proj_apply(const lb_proj* p, const float* x, float* y, int a8, int8_t* xq, float* d, float* X,
                          float* xs, int nthreads) {
    if (p->t) {
        lb_proj part = *p;
        part.t = NULL;
        const int64_t row_bytes = p->bits == 4 ? p->K / 2 : p->K;
        int64_t r0 = 0;
        for (int64_t j = 0; j < p->P; ++j) {
            const float* tj = p->t + j * p->K;
            for (int64_t i = 0; i < p->K; ++i) xs[i] = tj[i] * x[i];
            part.N = p->pn[j];
            part.w = p->w + r0 * row_bytes;
            part.s = p->s + r0 * p->G;
            part.b = p->b ? p->b + r0 * p->G : NULL;
            part.bias = p->bias ? p->bias + r0 : NULL;
            lb_proj_apply(&part, xs, y + r0, a8, xq, d, X, NULL, nthreads);
            r0 += p->pn[j];
        }
        return;
    }
    if (a8 && p->bits == 4) {
        lowbit_quantize_blocks(x, xq, d, X, 1, p->K, p->G, p->g);
        lowbit_q4a8_linear(xq, d, X, p->w, p->s, p->b, p->boff, p->bias, y, 1, p->N, p->K, p->G, p->g, nthreads);
    } else if (p->bits == 4) {
        lowbit_q4_linear(x, p->w, p->s, p->b, p->boff, p->bias, y, X, 1, p->N, p->K, p->G, p->g, nthreads);
    } else {
        lowbit_q8_linear(x, p->w, p->s, p->b, p->boff, p->bias, y, X, 1, p->N, p->K, p->G, p->g, nthreads);
    }
}

static void lb_rms_norm(const float* h, const float* w, float* out, int64_t H, float eps) {
    float ss = 0.0f;
    int64_t i = 0;
#ifdef LB_AVX2
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= H; i += 8) { __m256 v = _mm256_loadu_ps(h + i); acc = _mm256_fmadd_ps(v, v, acc); }
    ss = lb_hsum(acc);
#endif
    for (; i < H; ++i) ss += h[i] * h[i];
    float r = 1.0f / sqrtf(ss / (float)H + eps);
    for (i = 0; i < H; ++i) out[i] = w[i] * (h[i] * r);
}

/* x[i] = silu(g[i]) * u[i] = g / (1 + e^-g) * u. The AVX2 path evaluates e^t as 2^n e^r with
   n = round(t / ln 2), r = t - n ln 2 (|r| <= ln2 / 2, ln 2 split in two for exactness) and e^r by
   its Taylor series to degree 7 (relative error < 1e-7 on that interval), t clamped to [-87, 88]. */
static void lb_silu_mul(const float* g, const float* u, float* x, int64_t I) {
    int64_t i = 0;
#ifdef LB_AVX2
    const __m256 lo = _mm256_set1_ps(-87.0f), hi = _mm256_set1_ps(88.0f), one = _mm256_set1_ps(1.0f);
    const __m256 log2e = _mm256_set1_ps(1.44269504088896341f);
    const __m256 ln2_hi = _mm256_set1_ps(0.693359375f), ln2_lo = _mm256_set1_ps(-2.12194440e-4f);
    for (; i + 8 <= I; i += 8) {
        __m256 gv = _mm256_loadu_ps(g + i);
        __m256 t = _mm256_min_ps(_mm256_max_ps(_mm256_sub_ps(_mm256_setzero_ps(), gv), lo), hi);
        __m256 n = _mm256_round_ps(_mm256_mul_ps(t, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        __m256 r = _mm256_fnmadd_ps(n, ln2_lo, _mm256_fnmadd_ps(n, ln2_hi, t));
        __m256 p = _mm256_set1_ps(1.0f / 5040.0f);
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720.0f));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
        p = _mm256_fmadd_ps(p, r, one);
        p = _mm256_fmadd_ps(p, r, one);
        __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
        __m256 ex = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
        __m256 sg = _mm256_div_ps(gv, _mm256_add_ps(one, ex));
        _mm256_storeu_ps(x + i, _mm256_mul_ps(sg, _mm256_loadu_ps(u + i)));
    }
#endif
    for (; i < I; ++i) x[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

/* q . k over one head (hd values). */
static inline float lb_dot(const float* a, const float* b, int64_t n) {
    int64_t i = 0;
    float acc = 0.0f;
#ifdef LB_AVX2
    __m256 v0 = _mm256_setzero_ps(), v1 = v0;
    for (; i + 16 <= n; i += 16) {
        v0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), v0);
        v1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), v1);
    }
    for (; i + 8 <= n; i += 8) v0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), v0);
    acc = lb_hsum(_mm256_add_ps(v0, v1));
#endif
    for (; i < n; ++i) acc += a[i] * b[i];
    return acc;
}

static void lb_rope(float* x, const float* cos, const float* sin, int64_t hd) {
    int64_t half = hd / 2;
    for (int64_t i = 0; i < half; ++i) {
        float x1 = x[i], x2 = x[i + half];
        x[i] = x1 * cos[i] - x2 * sin[i];
        x[i + half] = x2 * cos[i + half] + x1 * sin[i + half];
    }
}

/* scratch must hold scratch_floats(...) floats (2 max(H, I) + 2 I + H + (2 nh + 2 nkv) hd + nh max_len + 2 (max(H, I) / 32 + 1)) and max(H, I) bytes. */
void lowbit_llama_token(const lb_layer* layers, int64_t L, float* h, int64_t pos, const float* cos_t,
                        const float* sin_t, int64_t H, int64_t I, int64_t nh, int64_t nkv, int64_t hd,
                        int64_t max_len, float eps, int a8, float* scratch, int8_t* qscratch, int nthreads) {
    float* x = scratch;                    /* (max(H, I)) normed input / silu product */
    float* qkv = x + (H > I ? H : I);      /* ((nh + 2 nkv) hd) */
    float* att = qkv + (nh + 2 * nkv) * hd; /* (nh hd) */
    float* gu = att + nh * hd;             /* (2 I) */
    float* tmp = gu + 2 * I;               /* (H) */
    float* scores = tmp + H;               /* (nh, max_len) */
    float* d = scores + nh * max_len;      /* (max(H, I) / 32) block scales */
    float* X = d + (H > I ? H : I) / 32 + 1; /* group sums */
    float* xs = X + (H > I ? H : I) / 32 + 1; /* (max(H, I)) input times a part's input scales */
    const float* cs = cos_t + pos * hd;
    const float* sn = sin_t + pos * hd;
    const float scale = 1.0f / sqrtf((float)hd);
    const int64_t group = nh / nkv, T = pos + 1;
    for (int64_t l = 0; l < L; ++l) {
        const lb_layer* ly = layers + l;
        lb_rms_norm(h, ly->in_norm, x, H, eps);
        lb_proj_apply(&ly->qkv, x, qkv, a8, qscratch, d, X, xs, nthreads);
        float* q = qkv;
        float* k = qkv + nh * hd;
        float* v = k + nkv * hd;
        for (int64_t j = 0; j < nh; ++j) lb_rope(q + j * hd, cs, sn, hd);
        for (int64_t j = 0; j < nkv; ++j) {
            lb_rope(k + j * hd, cs, sn, hd);
            memcpy(ly->kc + (j * max_len + pos) * hd, k + j * hd, hd * sizeof(float));
            memcpy(ly->vc + (j * max_len + pos) * hd, v + j * hd, hd * sizeof(float));
        }
        #pragma omp parallel for num_threads(nthreads) schedule(static) if (nh * T * hd >= 32768)
        for (int64_t j = 0; j < nh; ++j) {
            const float* kh = ly->kc + (j / group) * max_len * hd;
            const float* vh = ly->vc + (j / group) * max_len * hd;
            const float* qh = q + j * hd;
            float* sc = scores + j * max_len;
            float mx = -INFINITY;
            for (int64_t t = 0; t < T; ++t) {
                sc[t] = lb_dot(qh, kh + t * hd, hd) * scale;
                if (sc[t] > mx) mx = sc[t];
            }
            float tot = 0.0f;
            for (int64_t t = 0; t < T; ++t) { sc[t] = expf(sc[t] - mx); tot += sc[t]; }
            float inv = 1.0f / tot;
            float* out = att + j * hd;
            for (int64_t i = 0; i < hd; ++i) out[i] = 0.0f;
            for (int64_t t = 0; t < T; ++t) {
                float p = sc[t] * inv;
                for (int64_t i = 0; i < hd; ++i) out[i] += p * vh[t * hd + i];
            }
        }
        lb_proj_apply(&ly->o, att, tmp, a8, qscratch, d, X, xs, nthreads);
        for (int64_t i = 0; i < H; ++i) h[i] += tmp[i];
        lb_rms_norm(h, ly->post_norm, x, H, eps);
        lb_proj_apply(&ly->gu, x, gu, a8, qscratch, d, X, xs, nthreads);
        lb_silu_mul(gu, gu + I, x, I);
        if (ly->down_hm) lb_hadamard(x, ly->down_hm, ly->down_m, I, gu);  /* gu is free after the product */
        lb_proj_apply(&ly->down, x, tmp, a8, qscratch, d, X, xs, nthreads);
        for (int64_t i = 0; i < H; ++i) h[i] += tmp[i];
    }
}
"""

_SOURCE = block_gemv._C_SOURCE + _STEP_SOURCE


class Proj(ctypes.Structure):
    _fields_ = [("w", ctypes.c_void_p), ("s", ctypes.c_void_p), ("b", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                ("N", ctypes.c_int64), ("K", ctypes.c_int64), ("G", ctypes.c_int64), ("g", ctypes.c_int64),
                ("bits", ctypes.c_int64), ("boff", ctypes.c_float),
                ("t", ctypes.c_void_p), ("P", ctypes.c_int64), ("pn", ctypes.c_int64 * 4)]


class Layer(ctypes.Structure):
    _fields_ = [("in_norm", ctypes.c_void_p), ("post_norm", ctypes.c_void_p), ("qkv", Proj), ("o", Proj),
                ("gu", Proj), ("down", Proj), ("kc", ctypes.c_void_p), ("vc", ctypes.c_void_p),
                ("down_hm", ctypes.c_void_p), ("down_m", ctypes.c_int64)]


def library():
    """The compiled step (with the block GEMV kernels), or ``(None, why)``."""
    vp, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    return native.native_library("decode_step", _SOURCE, {
        "lowbit_llama_token": [vp, i64, vp, i64, vp, vp, i64, i64, i64, i64, i64, i64, f32, i32, vp, vp, i32],
    }, cflags=("-ffp-contract=off",))


def proj_record(packed, s, b, bias, bits: int, in_features: int, group_size: int, input_scale=None,
                parts: tuple[int, ...] = ()) -> Proj:
    """The C record of one projection (the tensors must outlive it: the decoder holds them); ``input_scale``
    fp32 (P, K) with ``parts`` the P parts' row counts (at most 4), or None."""
    g = group_size or in_features
    if input_scale is not None and (len(parts) != input_scale.shape[0] or not 1 <= len(parts) <= 4
                                    or sum(parts) != packed.shape[0]):
        raise ValueError(f"input scales {tuple(input_scale.shape)} do not match parts {parts} of {packed.shape[0]} rows")
    pn = (ctypes.c_int64 * 4)(*(parts if input_scale is not None else ()))
    return Proj(packed.data_ptr(), s.data_ptr(), None if b is None else b.data_ptr(),
                None if bias is None else bias.data_ptr(), packed.shape[0], in_features, s.shape[1], g, bits,
                block_gemv.offset_constant(bits), None if input_scale is None else input_scale.data_ptr(),
                0 if input_scale is None else len(parts), pn)


def scratch_floats(hidden: int, inter: int, n_heads: int, n_kv: int, head_dim: int, max_len: int) -> int:
    """Floats of scratch :func:`llama_token_step` needs (see the C source's layout)."""
    wide = max(hidden, inter)
    return wide + (n_heads + 2 * n_kv) * head_dim + n_heads * head_dim + 2 * inter + hidden + n_heads * max_len \
        + 2 * (wide // 32 + 1) + wide
