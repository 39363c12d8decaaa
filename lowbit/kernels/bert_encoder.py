"""A whole W8A8-dynamic BERT sentence encoder in one C call: embeddings, every layer, pooling.

At batch 1 a MiniLM sentence is ~15 tokens and each of its 36 linears is ~2 M multiply-adds: the
torch forward (compiled or not) spends most of its time dispatching ~240 ops, and
``scaled_dot_product_attention`` with a padding mask is slow for 32-wide heads at any batch.
:func:`bert_encode` runs, for the real tokens only (padding positions are dropped before the first
layer; they change no real token's result: attention gives them zero weight and pooling skips them):

    e = Wq[id] s[id] + Tq[tt] s[tt] + Pq[pos] s[pos]     (int8 rows x per-row scale: QEmbedding)
    h = LN(e)                                             LN(x) = (x - mean) / sqrt(var + eps) * g + b
    per layer:
      q, k, v = lin_q(h), lin_k(h), lin_v(h)              lin = W8A8 dynamic (lowbit.kernels.int8_gemm:
                                                          per-token codes of h * smooth_inv, exact int32
                                                          product, y = acc * s_x s_W + bias)
      a_i = sum_j softmax_j(q_i . k_j / sqrt(d)) v_j      per head, j over the sentence's real tokens
      h1 = LN(lin_o(a) + h)
      h  = LN(lin_2(gelu(lin_1(h1))) + h1)                gelu(x) = x / 2 (1 + erf(x / sqrt 2))
    out_b = mean_t h[b, t] over real tokens, / max(||.||_2, 1e-12) when normalizing

The integer products are the linear kernel's (exact); LayerNorm, softmax, erf and the order of
float sums differ from torch's in the last bits, and an activation code on a rounding boundary can
then flip, so the twin (the torch forward, ``SentenceEncoder(..., fused=False)``) agrees to
:data:`EMBEDDING_COS_TOL`, not bit for bit. One OpenMP region covers the whole call; the stages
(codes, GEMM tiles, attention heads, LayerNorm rows) are work-shared with a barrier between them.
"""

from __future__ import annotations

import ctypes
import weakref
import logging

import torch

from lowbit.errors import ConfigError
from lowbit.kernels import int8_gemm, native

log = logging.getLogger(__name__)

# The fused encoder and the torch forward agree to 1 - cos <= this per sentence embedding: float sums
# in another order move activation codes across rounding boundaries, as they do between the torch
# forward's own eager and compiled runs (MiniLM, 256 sentences: 1 - cos up to 4.9e-4 / mean 1.5e-4
# eager vs compiled, 7.2e-4 / 1.6e-4 fused vs eager); a wrong mask, layer or scale costs > 1e-2.
EMBEDDING_COS_TOL = 1e-3

_ENCODER_SOURCE = r"""
#ifdef _OPENMP
#include <omp.h>
#define LB_TID() omp_get_thread_num()
#else
#define LB_TID() 0
#endif

typedef struct { const int8_t* w; const int32_t* corr; const float* ws; const float* bias; const float* si;
                 int64_t N, K; } lb_lin;
typedef struct { lb_lin q, k, v, o, f1, f2; const float *ln1_w, *ln1_b, *ln2_w, *ln2_b; float eps1, eps2; } lb_layer;
typedef struct { const int8_t *wq, *pq, *tq; const float *wsc, *psc, *tsc; const float *ln_w, *ln_b; float eps;
                 int64_t vocab, n_pos, n_types; } lb_embed;

static float lb_sum(const float* x, int64_t n) {
    int64_t i = 0;
    float s = 0.0f;
#if defined(__AVX512F__)
    __m512 acc = _mm512_setzero_ps();
    for (; i + 16 <= n; i += 16) acc = _mm512_add_ps(acc, _mm512_loadu_ps(x + i));
    s = _mm512_reduce_add_ps(acc);
#endif
    for (; i < n; ++i) s += x[i];
    return s;
}

static float lb_sqdev(const float* x, float mean, int64_t n) {
    int64_t i = 0;
    float s = 0.0f;
#if defined(__AVX512F__)
    __m512 acc = _mm512_setzero_ps(), mu = _mm512_set1_ps(mean);
    for (; i + 16 <= n; i += 16) { __m512 d = _mm512_sub_ps(_mm512_loadu_ps(x + i), mu); acc = _mm512_fmadd_ps(d, d, acc); }
    s = _mm512_reduce_add_ps(acc);
#endif
    for (; i < n; ++i) { float d = x[i] - mean; s += d * d; }
    return s;
}

/* y = (x - mean) / sqrt(var + eps) * g + b over one row of H (biased variance, as torch). y may be x. */
static void lb_layernorm(const float* x, const float* g, const float* b, float eps, float* y, int64_t H) {
    float mean = lb_sum(x, H) / (float)H;
    float r = 1.0f / sqrtf(lb_sqdev(x, mean, H) / (float)H + eps);
    for (int64_t i = 0; i < H; ++i) y[i] = (x[i] - mean) * r * g[i] + b[i];
}

/* x[i] = e^(x[i] - mx) for i < n, in place; returns their sum. */
static float lb_softmax_exp(float* x, float mx, int64_t n) {
    int64_t i = 0;
    float s = 0.0f;
#if defined(__AVX512F__)
    __m512 acc = _mm512_setzero_ps(), vm = _mm512_set1_ps(mx);
    for (; i < n; i += 16) {
        __mmask16 k = n - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1u);
        __m512 e = _mm512_maskz_mov_ps(k, lb_exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + i), vm)));
        _mm512_mask_storeu_ps(x + i, k, e);
        acc = _mm512_add_ps(acc, e);
    }
    s = _mm512_reduce_add_ps(acc);
#else
    for (; i < n; ++i) { x[i] = expf(x[i] - mx); s += x[i]; }
#endif
    return s;
}

/* One head of one sentence: rows q, k, v at stride H (head offset applied by the caller), L tokens,
   d = head size. kt: scratch (d, LP) for k transposed (zero columns past L), s: scratch (LP,), acc: (d,).
   Accumulators stay in registers: 4 partial sums over the head dimension for q.k (16 keys a vector),
   2 over keys x 2 vectors of the head dimension for p.v. */
static void lb_attend(const float* q, const float* k, const float* v, float* out, int64_t H, int64_t L, int64_t d,
                      float scale, float* kt, float* s, float* acc) {
    const int64_t LP = (L + 15) / 16 * 16;
    for (int64_t c = 0; c < d; ++c) {
        for (int64_t j = 0; j < L; ++j) kt[c * LP + j] = k[j * H + c];
        for (int64_t j = L; j < LP; ++j) kt[c * LP + j] = 0.0f;
    }
    for (int64_t i = 0; i < L; ++i) {
        const float* qi = q + i * H;
        float* oi = out + i * H;
#if defined(__AVX512F__)
        (void)acc;
        for (int64_t j0 = 0; j0 < LP; j0 += 16) {
            __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            const float* kc = kt + j0;
            int64_t c = 0;
            for (; c + 4 <= d; c += 4) {
                a0 = _mm512_fmadd_ps(_mm512_set1_ps(qi[c]), _mm512_loadu_ps(kc + c * LP), a0);
                a1 = _mm512_fmadd_ps(_mm512_set1_ps(qi[c + 1]), _mm512_loadu_ps(kc + (c + 1) * LP), a1);
                a2 = _mm512_fmadd_ps(_mm512_set1_ps(qi[c + 2]), _mm512_loadu_ps(kc + (c + 2) * LP), a2);
                a3 = _mm512_fmadd_ps(_mm512_set1_ps(qi[c + 3]), _mm512_loadu_ps(kc + (c + 3) * LP), a3);
            }
            for (; c < d; ++c) a0 = _mm512_fmadd_ps(_mm512_set1_ps(qi[c]), _mm512_loadu_ps(kc + c * LP), a0);
            _mm512_storeu_ps(s + j0, _mm512_mul_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)),
                                                   _mm512_set1_ps(scale)));
        }
        float mx = -INFINITY;
        for (int64_t j = 0; j < L; ++j) mx = s[j] > mx ? s[j] : mx;
        const __m512 inv = _mm512_set1_ps(1.0f / lb_softmax_exp(s, mx, L));
        for (int64_t c0 = 0; c0 < d; c0 += 32) {
            const int64_t r0 = d - c0, r1 = d - c0 - 16;
            const __mmask16 k0 = r0 >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << r0) - 1u);
            const __mmask16 k1 = r1 >= 16 ? (__mmask16)0xffff : (r1 <= 0 ? (__mmask16)0 : (__mmask16)((1u << r1) - 1u));
            __m512 b00 = _mm512_setzero_ps(), b01 = b00, b10 = b00, b11 = b00;
            int64_t j = 0;
            for (; j + 2 <= L; j += 2) {
                const float* v0 = v + j * H + c0;
                const float* v1 = v0 + H;
                const __m512 p0 = _mm512_set1_ps(s[j]), p1 = _mm512_set1_ps(s[j + 1]);
                b00 = _mm512_fmadd_ps(p0, _mm512_maskz_loadu_ps(k0, v0), b00);
                b01 = _mm512_fmadd_ps(p0, _mm512_maskz_loadu_ps(k1, v0 + 16), b01);
                b10 = _mm512_fmadd_ps(p1, _mm512_maskz_loadu_ps(k0, v1), b10);
                b11 = _mm512_fmadd_ps(p1, _mm512_maskz_loadu_ps(k1, v1 + 16), b11);
            }
            if (j < L) {
                const float* v0 = v + j * H + c0;
                const __m512 p0 = _mm512_set1_ps(s[j]);
                b00 = _mm512_fmadd_ps(p0, _mm512_maskz_loadu_ps(k0, v0), b00);
                b01 = _mm512_fmadd_ps(p0, _mm512_maskz_loadu_ps(k1, v0 + 16), b01);
            }
            _mm512_mask_storeu_ps(oi + c0, k0, _mm512_mul_ps(_mm512_add_ps(b00, b10), inv));
            _mm512_mask_storeu_ps(oi + c0 + 16, k1, _mm512_mul_ps(_mm512_add_ps(b01, b11), inv));
        }
#else
        for (int64_t j = 0; j < LP; ++j) s[j] = 0.0f;
        for (int64_t c = 0; c < d; ++c) {  /* s_j += q_ic k_jc, vectorised over j */
            const float qc = qi[c];
            const float* kr = kt + c * LP;
            for (int64_t j = 0; j < LP; ++j) s[j] += qc * kr[j];
        }
        float mx = -INFINITY;
        for (int64_t j = 0; j < L; ++j) { s[j] *= scale; mx = s[j] > mx ? s[j] : mx; }
        const float inv = 1.0f / lb_softmax_exp(s, mx, L);
        for (int64_t c = 0; c < d; ++c) acc[c] = 0.0f;
        for (int64_t j = 0; j < L; ++j) {
            const float p = s[j];
            const float* vj = v + j * H;
            for (int64_t c = 0; c < d; ++c) acc[c] += p * vj[c];
        }
        for (int64_t c = 0; c < d; ++c) oi[c] = acc[c] * inv;
#endif
    }
}

static inline void lb_gemm_tile(const lb_lin* p, int64_t t, int64_t M, const int8_t* q, const uint8_t* a,
                                const float* sx, float* y, int epi, const float* res) {
    lb_run_tile(t, M, p->N, (p->K + 3) / 4 * 4, q, a, sx, p->w, p->corr, p->ws, p->bias, y, epi, res);
}

/* ids, mask, tt: (B, T) int64 (tt may be NULL); out (B, H). Returns 0, -1 (no memory) or -2 (an id,
   position or token type out of its table). pool: 0 = masked mean (the only one here). */
int lowbit_bert_encode(const lb_embed* E, const lb_layer* LY, int64_t n_layers, int64_t H, int64_t n_heads,
                       int64_t I, const int64_t* ids, const int64_t* mask, const int64_t* tt, int64_t B, int64_t T,
                       int normalize, float* out, int nthreads) {
    /* gather the real tokens: sentence b owns rows off[b] .. off[b] + len[b] - 1 */
    int64_t M = 0;
    for (int64_t i = 0; i < B * T; ++i) M += mask[i] != 0;
    const int64_t MP = lb_rows_padded(M > 0 ? M : 1), H4 = (H + 3) / 4 * 4, I4 = (I + 3) / 4 * 4;
    const int64_t d = H / n_heads, LP = (T + 15) / 16 * 16;
    const int64_t ncode = (3 * H4 > I4 ? 3 * H4 : I4) * MP;
    size_t fl = (size_t)(7 * MP * H + MP * I + 3 * MP) + (size_t)nthreads * (size_t)(d * LP + LP + d);
    size_t il = (size_t)(2 * (B + 1) + 3 * MP);
    char* mem = (char*)malloc(fl * sizeof(float) + il * sizeof(int64_t) + 2 * (size_t)ncode + 64);
    if (!mem) return -1;
    int64_t* off = (int64_t*)mem;          /* (B + 1,) */
    int64_t* len = off + (B + 1);          /* (B + 1,) */
    int64_t* tid = len + (B + 1);          /* (MP,) token id */
    int64_t* tpos = tid + MP;              /* (MP,) position */
    int64_t* ttyp = tpos + MP;             /* (MP,) token type */
    /* floats: seven (MP, H) buffers, F (MP, I), s_x of three code sets, per-thread attention scratch */
    float *X = (float*)(ttyp + MP), *Q = X + MP * H, *K = Q + MP * H, *V = K + MP * H, *C = V + MP * H;
    float *Y = C + MP * H, *X1 = Y + MP * H, *F = X1 + MP * H, *sx = F + MP * I, *scratch = sx + 3 * MP;
    int8_t* qc = (int8_t*)(scratch + (size_t)nthreads * (size_t)(d * LP + LP + d));
    uint8_t* ac = (uint8_t*)(qc + ncode);
    int bad = 0;
    {
        int64_t m = 0;
        for (int64_t b = 0; b < B; ++b) {
            off[b] = m;
            for (int64_t t = 0; t < T; ++t) {
                if (!mask[b * T + t]) continue;
                int64_t id = ids[b * T + t], ty = tt ? tt[b * T + t] : 0;
                if (id < 0 || id >= E->vocab || t >= E->n_pos || ty < 0 || ty >= E->n_types) bad = 1;
                tid[m] = id; tpos[m] = t; ttyp[m] = ty; ++m;
            }
            len[b] = m - off[b];
        }
    }
    if (bad) { free(mem); return -2; }
    const float scale = 1.0f / sqrtf((float)d);
    const int64_t ntH = lb_tiles(M, H), ntI = lb_tiles(M, I);
    #pragma omp parallel num_threads(nthreads)
    {
        float* sc = scratch + (size_t)LB_TID() * (size_t)(d * LP + LP + d);
        /* embeddings, LayerNorm, then the first layer's q/k/v codes, row by row */
        #pragma omp for schedule(static)
        for (int64_t m = 0; m < MP; ++m) {
            if (m < M) {
                const int8_t *w = E->wq + tid[m] * H, *ty = E->tq + ttyp[m] * H, *ps = E->pq + tpos[m] * H;
                const float sw = E->wsc[tid[m]], st = E->tsc[ttyp[m]], sp = E->psc[tpos[m]];
                float* x = X + m * H;
                for (int64_t c = 0; c < H; ++c) x[c] = ((float)w[c] * sw + (float)ty[c] * st) + (float)ps[c] * sp;
                lb_layernorm(x, E->ln_w, E->ln_b, E->eps, x, H);
            }
            if (n_layers > 0) {
                lb_code_row(X, LY[0].q.si, m, M, H, H4, qc, ac, sx);
                lb_code_row(X, LY[0].k.si, m, M, H, H4, qc + MP * H4, ac + MP * H4, sx + MP);
                lb_code_row(X, LY[0].v.si, m, M, H, H4, qc + 2 * MP * H4, ac + 2 * MP * H4, sx + 2 * MP);
            }
        }
        for (int64_t l = 0; l < n_layers; ++l) {
            const lb_layer* ly = LY + l;
            #pragma omp for schedule(static)
            for (int64_t t = 0; t < 3 * ntH; ++t) {
                const int64_t j = t / ntH;
                const lb_lin* p = j == 0 ? &ly->q : (j == 1 ? &ly->k : &ly->v);
                float* y = j == 0 ? Q : (j == 1 ? K : V);
                lb_gemm_tile(p, t % ntH, M, qc + j * MP * H4, ac + j * MP * H4, sx + j * MP, y, LB_EPI_NONE, 0);
            }
            #pragma omp for schedule(dynamic, 1)
            for (int64_t bh = 0; bh < B * n_heads; ++bh) {
                const int64_t b = bh / n_heads, hh = bh % n_heads, o = off[b] * H + hh * d;
                if (len[b] > 0)
                    lb_attend(Q + o, K + o, V + o, C + o, H, len[b], d, scale, sc, sc + d * LP, sc + d * LP + LP);
            }
            #pragma omp for schedule(static)
            for (int64_t m = 0; m < MP; ++m) lb_code_row(C, ly->o.si, m, M, H, H4, qc, ac, sx);
            #pragma omp for schedule(static)
            for (int64_t t = 0; t < ntH; ++t) lb_gemm_tile(&ly->o, t, M, qc, ac, sx, Y, LB_EPI_RES, X);
            #pragma omp for schedule(static)
            for (int64_t m = 0; m < MP; ++m) {
                if (m < M) lb_layernorm(Y + m * H, ly->ln1_w, ly->ln1_b, ly->eps1, X1 + m * H, H);
                lb_code_row(X1, ly->f1.si, m, M, H, H4, qc, ac, sx);
            }
            #pragma omp for schedule(static)
            for (int64_t t = 0; t < ntI; ++t) lb_gemm_tile(&ly->f1, t, M, qc, ac, sx, F, LB_EPI_GELU, 0);
            #pragma omp for schedule(static)
            for (int64_t m = 0; m < MP; ++m) lb_code_row(F, ly->f2.si, m, M, I, I4, qc, ac, sx);
            #pragma omp for schedule(static)
            for (int64_t t = 0; t < ntH; ++t) lb_gemm_tile(&ly->f2, t, M, qc, ac, sx, Y, LB_EPI_RES, X1);
            #pragma omp for schedule(static)
            for (int64_t m = 0; m < MP; ++m) {
                if (m < M) lb_layernorm(Y + m * H, ly->ln2_w, ly->ln2_b, ly->eps2, X + m * H, H);
                if (l + 1 < n_layers) {
                    const lb_layer* nx = ly + 1;
                    lb_code_row(X, nx->q.si, m, M, H, H4, qc, ac, sx);
                    lb_code_row(X, nx->k.si, m, M, H, H4, qc + MP * H4, ac + MP * H4, sx + MP);
                    lb_code_row(X, nx->v.si, m, M, H, H4, qc + 2 * MP * H4, ac + 2 * MP * H4, sx + 2 * MP);
                }
            }
        }
        /* masked mean over each sentence's real tokens, then L2 normalisation */
        #pragma omp for schedule(static)
        for (int64_t b = 0; b < B; ++b) {
            float* o = out + b * H;
            for (int64_t c = 0; c < H; ++c) o[c] = 0.0f;
            for (int64_t m = off[b]; m < off[b] + len[b]; ++m)
                for (int64_t c = 0; c < H; ++c) o[c] += X[m * H + c];
            const float cnt = len[b] > 0 ? (float)len[b] : 1e-9f;
            for (int64_t c = 0; c < H; ++c) o[c] = o[c] / cnt;
            if (normalize) {
                float nn = 0.0f;
                for (int64_t c = 0; c < H; ++c) nn += o[c] * o[c];
                nn = sqrtf(nn);
                nn = nn > 1e-12f ? nn : 1e-12f;
                for (int64_t c = 0; c < H; ++c) o[c] = o[c] / nn;
            }
        }
    }
    free(mem);
    return 0;
}
"""

_SOURCE = int8_gemm._C_SOURCE + _ENCODER_SOURCE
_VP = ctypes.c_void_p
_I64 = ctypes.c_int64
_ARGS = [_VP, _VP, _I64, _I64, _I64, _I64, _VP, _VP, _VP, _I64, _I64, ctypes.c_int, _VP, ctypes.c_int]


class _Lin(ctypes.Structure):
    _fields_ = [("w", _VP), ("corr", _VP), ("ws", _VP), ("bias", _VP), ("si", _VP), ("N", _I64), ("K", _I64)]


class _Layer(ctypes.Structure):
    _fields_ = [("q", _Lin), ("k", _Lin), ("v", _Lin), ("o", _Lin), ("f1", _Lin), ("f2", _Lin),
                ("ln1_w", _VP), ("ln1_b", _VP), ("ln2_w", _VP), ("ln2_b", _VP),
                ("eps1", ctypes.c_float), ("eps2", ctypes.c_float)]


class _Embed(ctypes.Structure):
    _fields_ = [("wq", _VP), ("pq", _VP), ("tq", _VP), ("wsc", _VP), ("psc", _VP), ("tsc", _VP),
                ("ln_w", _VP), ("ln_b", _VP), ("eps", ctypes.c_float),
                ("vocab", _I64), ("n_pos", _I64), ("n_types", _I64)]


def library():
    """The compiled encoder (``(lib, "")``) or ``(None, why)``; built like the linear kernel (no FMA contraction)."""
    return native.native_library("bert_encoder", _SOURCE, {"lowbit_bert_encode": _ARGS},
                                 cflags=int8_gemm.VARIANT_FLAGS["native"])


def _f32c(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 and t.is_contiguous() else t.detach().float().contiguous()


def _version(t: torch.Tensor) -> int:
    return -1 if t.is_inference() else t._version  # inference tensors have no version counter


def w8a8_bert_parts(encoder, kernel_only: bool = True) -> tuple[list | None, str]:
    """The modules of a W8A8-dynamic BERT sentence encoder with mean pooling, ``([tables, emb_norm,
    [(linears, norms) per layer]], "")``, or ``(None, why not)``: what the fused encoder and the fused
    ONNX graph (``lowbit.io.onnx_bert``) read. ``kernel_only``: also refuse linears that ask for the
    reference kernel (the fused encoder honours that request; an exporter need not)."""
    from torch import nn

    from lowbit.nn import DynamicQLinear
    from lowbit.nn.qembedding import QEmbedding

    bert = getattr(encoder, "bert", None)
    cfg = getattr(bert, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) != "bert":
        return None, "not a BERT backbone"
    if getattr(encoder, "pooling", None) != "mean":
        return None, f"pooling {getattr(encoder, 'pooling', None)!r} (mean pooling only)"
    if (cfg.hidden_act != "gelu" or getattr(cfg, "position_embedding_type", "absolute") != "absolute"
            or cfg.is_decoder or cfg.hidden_size % cfg.num_attention_heads):
        return None, "config outside erf GELU, absolute positions, encoder only"
    emb = bert.embeddings
    tables = (emb.word_embeddings, emb.position_embeddings, getattr(emb, "token_type_embeddings", None))
    if not all(isinstance(t, QEmbedding) for t in tables) or not isinstance(emb.LayerNorm, nn.LayerNorm):
        return None, "embeddings are not int8 QEmbedding tables"
    layers = []
    for layer in bert.encoder.layer:
        att = layer.attention
        lins = (att.self.query, att.self.key, att.self.value, att.output.dense,
                layer.intermediate.dense, layer.output.dense)
        if not all(isinstance(m, DynamicQLinear) and (m.kernel != "reference" or not kernel_only) for m in lins):
            return None, "a linear is not a W8A8-dynamic DynamicQLinear" + (
                " (or asks for the reference kernel)" if kernel_only else "")
        lns = (att.output.LayerNorm, layer.output.LayerNorm)
        if not all(isinstance(n, nn.LayerNorm) and n.weight is not None and n.bias is not None for n in lns):
            return None, "a LayerNorm without affine weights"
        layers.append((lins, lns))
    return [tables, emb.LayerNorm, layers], ""


def _slots(src) -> list[tuple[dict, str, torch.Tensor | None]]:
    """(owner's buffer or parameter dict, name, tensor) for every tensor the fused encoder reads."""
    tables, ln, layers = src
    out = [(tab._buffers, n, tab._buffers[n]) for tab in tables for n in ("qweight", "scale")]
    out += [(ln._parameters, n, ln._parameters[n]) for n in ("weight", "bias")]
    for lins, lns in layers:
        out += [(m._buffers, n, m._buffers.get(n)) for m in lins for n in ("qweight_t", "w_scale", "bias", "smooth_inv")]
        out += [(n_._parameters, n, n_._parameters[n]) for n_ in lns for n in ("weight", "bias")]
    return out


# Bumped whenever any module registers a submodule (a swap may replace a module the fused encoder
# reads); with the per-tensor identity and version checks this keeps a cached encoder honest.
_generation = [0]
_hooked = []


def _bump(module, name, submodule):
    _generation[0] += 1


class FusedBertEncoder:
    """The C encoder bound to one quantized :class:`lowbit.models.encoder.SentenceEncoder`'s tensors.

    ``__call__(input_ids, attention_mask, token_type_ids) -> (B, H)`` sentence embeddings. Built by
    :func:`fused_encoder`, which rebuilds it when any source tensor is replaced or modified in place.
    """

    def __init__(self, encoder, src, lib):
        from lowbit.kernels import int8_dynamic

        tables, ln, layers = src
        cfg = encoder.bert.config
        if not _hooked:
            _hooked.append(torch.nn.modules.module.register_module_module_registration_hook(_bump))
        self.generation = _generation[0]
        slots = _slots(src)
        self._owners = [(d, n) for d, n, _ in slots]
        self._ids = [id(t) for _, _, t in slots]
        self._tensors = [t for _, _, t in slots if t is not None and not t.is_inference()]  # no version counter
        self._versions = [t._version for t in self._tensors]
        self.mode = (encoder.pooling, encoder.normalize)
        self._hookable = list(encoder.bert.modules())  # a module swap bumps the generation: the list stays current
        self.fn, self.normalize = lib.lowbit_bert_encode, bool(encoder.normalize)
        self.h, self.heads, self.inter = cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size
        keep = []  # every tensor whose address the C structs hold

        def ptr(t):
            if t is None:
                return None
            keep.append(t)
            return t.data_ptr()

        def lin(m) -> _Lin:
            packed = int8_dynamic.packed_weight(m.qweight_t)
            if packed.fn is None:
                raise ConfigError("the int8 kernel cannot run these weight codes exactly (-128 on AVX2)")
            return _Lin(ptr(packed.w), ptr(packed.corr), ptr(_f32c(m.w_scale)),
                        ptr(None if m.bias is None else _f32c(m.bias)),
                        ptr(None if m.smooth_inv is None else _f32c(m.smooth_inv)), m.out_features, m.in_features)

        word, pos, typ = tables
        self.embed = _Embed(ptr(word.qweight.contiguous()), ptr(pos.qweight.contiguous()), ptr(typ.qweight.contiguous()),
                            ptr(_f32c(word.scale)), ptr(_f32c(pos.scale)), ptr(_f32c(typ.scale)),
                            ptr(_f32c(ln.weight)), ptr(_f32c(ln.bias)), float(ln.eps),
                            word.num_embeddings, pos.num_embeddings, typ.num_embeddings)
        arr = (_Layer * max(1, len(layers)))()
        for i, (lins, (ln1, ln2)) in enumerate(layers):
            arr[i] = _Layer(*(lin(m) for m in lins), ptr(_f32c(ln1.weight)), ptr(_f32c(ln1.bias)),
                            ptr(_f32c(ln2.weight)), ptr(_f32c(ln2.bias)), float(ln1.eps), float(ln2.eps))
        self.layers, self.n_layers, self._keep = arr, len(layers), keep
        self._embed_ref, self._layers_ref = ctypes.byref(self.embed), arr

    def valid(self, encoder) -> bool:
        """Whether the modules and tensors it was built from are still the encoder's, unmodified (~10 us)."""
        return (self.generation == _generation[0] and self.mode == (encoder.pooling, encoder.normalize)
                and [id(d.get(n)) for d, n in self._owners] == self._ids
                and [t._version for t in self._tensors] == self._versions)

    def hooked(self) -> bool:
        """Whether a forward hook would see the backbone's modules run (per-layer error, calibration
        taps): the fused call runs none of them, so the torch forward must (~5 us)."""
        from torch.nn.modules import module as _m

        return bool(_m._global_forward_hooks or _m._global_forward_pre_hooks
                    or any(m._forward_hooks or m._forward_pre_hooks for m in self._hookable))

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        ids = input_ids.to(torch.int64).contiguous()
        mask = attention_mask.to(torch.int64).contiguous()
        if mask.shape != ids.shape or ids.dim() != 2:
            raise ConfigError(f"input_ids {tuple(ids.shape)} and attention_mask {tuple(mask.shape)} must be the same (B, T)")
        tt = None if token_type_ids is None else token_type_ids.to(torch.int64).contiguous()
        b, t = ids.shape
        out = torch.empty(b, self.h)
        rc = self.fn(self._embed_ref, self._layers_ref, self.n_layers, self.h, self.heads, self.inter,
                     ids.data_ptr(), mask.data_ptr(), None if tt is None else tt.data_ptr(), b, t,
                     int(self.normalize), out.data_ptr(), torch.get_num_threads())
        if rc == -2:
            raise ConfigError(f"a token id, token type or position (sequence length {t}) is outside the "
                              "model's embedding tables")
        if rc:
            raise MemoryError(f"fused encoder: no memory for the activations of {b} x {t} tokens")
        return out


def fused_encoder(encoder) -> tuple[FusedBertEncoder | None, str]:
    """The fused encoder for ``encoder`` (cached, rebuilt when its tensors change) or ``(None, why not)``."""
    cached = _cache.get(encoder)
    if cached is not None and cached.valid(encoder):
        return (None, _HOOKED) if cached.hooked() else (cached, "")
    src, why = w8a8_bert_parts(encoder)
    if src is None:
        _cache.pop(encoder, None)
        return None, why
    lib, why = library()
    if lib is None:
        return None, why
    lib.lowbit_bert_encode.restype = ctypes.c_int
    try:
        runner = FusedBertEncoder(encoder, src, lib)
    except ConfigError as exc:
        return None, str(exc)
    _cache[encoder] = runner
    if runner.hooked():
        return None, _HOOKED
    log.info("fused C encoder for %s: %d layers, hidden %d", getattr(encoder, "model_name", "?"),
             runner.n_layers, runner.h)
    return runner, ""


_cache: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_HOOKED = "forward hooks on the backbone's modules (the fused call would not run them)"
