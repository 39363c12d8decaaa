"""Integer-only all-MiniLM-L6-v2: from token ids to pooled hidden states with integer arithmetic only.

The BERT encoder of the sentence encoder rewritten with I-BERT operators (``lowbit.integer.ibert``),
int8 x int8 -> int32 matmuls (``int8_mm``: ``torch._int_mm``) and gemmlowp fixed-point
requantization (``lowbit.integer.fixed_point``). Scales come from one float calibration pass.

Per layer (``h`` = the previous LayerNorm's integer output, scale ``2^-f``)::

    x8  = requant(h)            per-channel multipliers: SmoothQuant factors s_j folded in, W * s_j
    q, k, v = requant(x8 @ Wqkv + b)                                   int8, per tensor
    p   = i_softmax(q k^T at scale s_q s_k / sqrt(d), mask)            codes 0..127 at 1/127
    c8  = requant(p v)                                                 int8, smoothed per channel
    h1  = i_layernorm(requant(c8 @ Wo + b) + requant(h))               residual add in int32
    g   = i_gelu(requant(x8' @ Wi + b))                                int16-range input codes
    h   = i_layernorm(requant(requant(g) @ W2 + b) + requant(h1))

Embeddings are int32 tables at the first LayerNorm's input scale (summed in integers). The output
boundary is the masked mean over tokens (integer sum and division); only then is the pooled
vector dequantized and L2-normalised (cosine similarity does not depend on the scale).
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from lowbit import kernels
from lowbit.algorithms.smoothing import smoothing_factors
from lowbit.algorithms.static import ALPHA_GRID, SAMPLE_ROWS, search_alpha
from lowbit.core import choose_qparams, int_format, per_channel, quantize
from lowbit.errors import CalibrationError
from lowbit.integer.fixed_point import INT32_MAX, INT32_MIN, multiply_by_quantized_multiplier, quantize_multipliers, \
    rounding_divide_by_pot
from lowbit.integer.ibert import i_gelu, i_layernorm, i_softmax, layernorm_constants
from lowbit.models.minilm import SentenceEncoder

log = logging.getLogger(__name__)

RES_BITS = 22  # residual sums (LayerNorm inputs) use |code| < 2^22 (keeps the variance exact in int64)
GELU_BITS = 14  # GELU input codes |q| < 2^14
PROB_MAX = 127  # softmax probabilities at scale 1/127
HEADROOM = 1.25  # calibrated absmax times this for the int32 points (no clipping needed there)


class Requant:
    """Offline: ``round(x * real)`` as integers, per tensor or per channel (last dim).

    ``bound`` is the largest ``|x|`` expected; when it exceeds int32 a rounding right shift by ``k``
    bits comes first and the multiplier absorbs ``2^k``."""

    def __init__(self, real: torch.Tensor | float, bound: int = INT32_MAX):
        real = torch.as_tensor(real, dtype=torch.float64)
        self.pre_shift = max(0, int(bound).bit_length() - 31)
        self.m0, self.shift = quantize_multipliers(real * 2.0**self.pre_shift)

    def __call__(self, x: torch.Tensor, qmin: int = INT32_MIN, qmax: int = INT32_MAX) -> torch.Tensor:
        x = x.to(torch.int64)
        if self.pre_shift:
            x = rounding_divide_by_pot(x, self.pre_shift)
        x = x.clamp(INT32_MIN, INT32_MAX)
        return multiply_by_quantized_multiplier(x, self.m0, self.shift).clamp(qmin, qmax)


class IntLinear:
    """int8 weights per output channel (SmoothQuant factors folded), int32 bias at the accumulator scale."""

    def __init__(self, linear: nn.Linear, s_x: float, smooth: torch.Tensor):
        w = linear.weight.detach().float() * smooth  # (N, K)
        qp = choose_qparams(w, int_format(8), symmetric=True, granularity=per_channel(0))
        self.w_t = quantize(w, qp).t().contiguous()  # (K, N) int8
        self.acc_scale = s_x * qp.scale.double()  # (N,)
        self.bias = torch.round(linear.bias.detach().double() / self.acc_scale).to(torch.int64)

    def __call__(self, mm, x8: torch.Tensor) -> torch.Tensor:
        """int8 codes (M, K) -> int64 accumulators with bias (M, N)."""
        return mm(x8, self.w_t).to(torch.int64) + self.bias


def _collect_stats(encoder: nn.Module, sentences: list[str]) -> dict[str, torch.Tensor]:
    """Float calibration: per-channel |input| max of each Linear, |output| max of Q/K/V and pre-GELU,
    |input| max of each LayerNorm."""
    bert = encoder.bert
    mods = {}
    for i, layer in enumerate(bert.encoder.layer):
        for n in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                  "attention.output.LayerNorm", "intermediate.dense", "output.dense", "output.LayerNorm"):
            mods[f"{i}.{n}"] = layer.get_submodule(n)
    mods["emb.LayerNorm"] = bert.embeddings.LayerNorm
    stats: dict[str, torch.Tensor] = {}

    def upd(key, v):
        stats[key] = torch.maximum(stats[key], v) if key in stats else v

    gen = torch.Generator().manual_seed(0)

    def make(name):
        def hook(mod, inputs, output):
            x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1])  # (tokens, K)
            upd(f"{name}.in_ch", x.abs().amax(dim=0))  # (K,)
            upd(f"{name}.out", output.detach().float().abs().amax())
            if isinstance(mod, nn.Linear):  # sampled rows for the per-layer SmoothQuant alpha search
                rows = x[torch.randperm(x.shape[0], generator=gen)[:SAMPLE_ROWS]]
                stats[f"{name}.rows"] = torch.cat([stats[f"{name}.rows"], rows]) if f"{name}.rows" in stats else rows

        return hook

    handles = [m.register_forward_hook(make(n)) for n, m in mods.items()]
    try:
        with torch.inference_mode():
            for i in range(0, len(sentences), 16):
                encoder.encode(sentences[i:i + 16], batch_size=16)
    finally:
        for h in handles:
            h.remove()
    return stats


class _IntLayer:
    """Constants of one BERT layer (see the module docstring)."""

    def __init__(self, layer, i: int, st: dict, s_prev: float, alpha: float, heads: int):
        att, p = layer.attention, f"{i}."
        q_l, k_l, v_l = att.self.query, att.self.key, att.self.value
        self.heads = heads
        self.head_dim = q_l.out_features // heads
        # --- QKV, input = previous LayerNorm output (scale s_prev, an int64 fixed-point value)
        wqkv = torch.cat([q_l.weight, k_l.weight, v_l.weight]).detach()
        qkv = nn.Linear(wqkv.shape[1], wqkv.shape[0])
        qkv.weight.data, qkv.bias.data = wqkv, torch.cat([q_l.bias, k_l.bias, v_l.bias]).detach()
        self.qkv, self.x_req = self._input(qkv, st[p + "attention.self.query.in_ch"], s_prev, alpha,
                                           rows=st[p + "attention.self.query.rows"])
        self.s_qkv = [float(st[p + f"attention.self.{n}.out"]) / 127 for n in ("query", "key", "value")]
        n = q_l.out_features
        self.qkv_req = [Requant(self.qkv.acc_scale[j * n:(j + 1) * n] / s) for j, s in enumerate(self.s_qkv)]
        self.s_scores = self.s_qkv[0] * self.s_qkv[1] / math.sqrt(self.head_dim)
        # --- attention output projection; its input is P V at scale s_v / 127
        ctx_ch = st[p + "attention.output.dense.in_ch"]
        self.wo, self.ctx_req = self._input(att.output.dense, ctx_ch, self.s_qkv[2] / PROB_MAX, alpha,
                                            rows=st[p + "attention.output.dense.rows"])
        self.s_ln1 = HEADROOM * float(st[p + "attention.output.LayerNorm.in_ch"].max()) / 2**RES_BITS
        self.wo_req = Requant(self.wo.acc_scale / self.s_ln1)
        self.res1_req = Requant(s_prev / self.s_ln1)
        ln1 = att.output.LayerNorm
        self.ln1 = layernorm_constants(ln1.weight, ln1.bias, self.s_ln1, ln1.eps)
        # --- FFN
        self.wi, self.x1_req = self._input(layer.intermediate.dense, st[p + "intermediate.dense.in_ch"],
                                           self.ln1["scale"], alpha, rows=st[p + "intermediate.dense.rows"])
        self.s_gelu_in = HEADROOM * float(st[p + "intermediate.dense.out"]) / 2**GELU_BITS
        self.gelu_in_req = Requant(self.wi.acc_scale / self.s_gelu_in)
        _, s_g = i_gelu(torch.zeros(1, dtype=torch.int64), self.s_gelu_in)
        q_one = abs(math.floor(1.0 / (s_g / (self.s_gelu_in / 2))))  # |floor(1 / S_erf)|
        self.gelu_sign = -1 if s_g < 0 else 1
        self.s_gelu_out = abs(s_g)
        self.w2, self.g_req = self._input(layer.output.dense, st[p + "output.dense.in_ch"], self.s_gelu_out, alpha,
                                          bound=2**GELU_BITS * 3 * q_one, rows=st[p + "output.dense.rows"])
        self.s_ln2 = HEADROOM * float(st[p + "output.LayerNorm.in_ch"].max()) / 2**RES_BITS
        self.w2_req = Requant(self.w2.acc_scale / self.s_ln2)
        self.res2_req = Requant(self.ln1["scale"] / self.s_ln2)
        ln2 = layer.output.LayerNorm
        self.ln2 = layernorm_constants(ln2.weight, ln2.bias, self.s_ln2, ln2.eps)

    @staticmethod
    def _input(linear: nn.Linear, act_absmax: torch.Tensor, s_in: float, alpha, bound: int = INT32_MAX,
               rows: torch.Tensor | None = None):
        """The IntLinear and the per-channel requantization of its input (scale s_in) to smoothed int8 codes.

        ``alpha="auto"`` picks the SmoothQuant strength per layer (``lowbit.algorithms.static.search_alpha``)."""
        if alpha == "auto":
            alpha = search_alpha(rows, act_absmax, linear.weight, ALPHA_GRID)[0]
        smooth = smoothing_factors(act_absmax, linear.weight, alpha) if alpha else torch.ones_like(act_absmax)
        s_x = float((act_absmax / smooth).max()) / 127
        lin = IntLinear(linear, s_x, smooth)
        return lin, Requant(s_in / (s_x * smooth.double()), bound)


class IntegerMiniLM(nn.Module):
    """Integer-only MiniLM sentence encoder (``encode`` / ``forward`` like :class:`SentenceEncoder`)."""

    model_name = "minilm"
    task = "encoder"

    def __init__(self, encoder: nn.Module, calibration: list[str], smooth_alpha: float | str = "auto",
                 kernel: str = "auto"):
        super().__init__()
        if not calibration:
            raise CalibrationError("integer MiniLM needs calibration sentences")
        self.tokenizer, self.max_seq_length = encoder.tokenizer, encoder.max_seq_length
        bert = encoder.bert
        self.embedding_dim = int(bert.config.hidden_size)  # encode() allocates (N, embedding_dim)
        st = _collect_stats(encoder, list(calibration))
        emb = bert.embeddings
        self.s_emb = HEADROOM * float(st["emb.LayerNorm.in_ch"].max()) / 2**RES_BITS
        tables = (emb.word_embeddings.weight, emb.position_embeddings.weight, emb.token_type_embeddings.weight)
        self.word, self.pos, self.type = (torch.round(t.detach().double() / self.s_emb).to(torch.int32) for t in tables)
        self.ln0 = layernorm_constants(emb.LayerNorm.weight, emb.LayerNorm.bias, self.s_emb, emb.LayerNorm.eps)
        heads = bert.config.num_attention_heads
        self.layers = []
        s_prev = self.ln0["scale"]
        for i, layer in enumerate(bert.encoder.layer):
            il = _IntLayer(layer, i, st, s_prev, smooth_alpha, heads)
            self.layers.append(il)
            s_prev = il.ln2["scale"]
        self.out_scale = s_prev
        self._mm = kernels.KERNELS["int8_mm"][kernels.resolve("int8_mm", kernel)]

    tokenize = SentenceEncoder.tokenize  # same tokenization and length-sorted batching as fp32
    encode = SentenceEncoder.encode

    def _layer(self, il: _IntLayer, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, c = h.shape
        mm = self._mm
        x8 = il.x_req(h, -127, 127).to(torch.int8).reshape(b * t, c)  # (B*T, C)
        acc = il.qkv(mm, x8)  # (B*T, 3C)
        q, k, v = (il.qkv_req[j](acc[:, j * c:(j + 1) * c], -127, 127).to(torch.int32)
                   .reshape(b, t, il.heads, il.head_dim).transpose(1, 2) for j in range(3))  # (B, H, T, d)
        scores = torch.matmul(q, k.transpose(-1, -2)).to(torch.int64)  # (B, H, T, T) exact int32 sums
        probs = i_softmax(scores, il.s_scores, mask[:, None, None, :], PROB_MAX).to(torch.int32)
        ctx = torch.matmul(probs, v).transpose(1, 2).reshape(b * t, c)  # (B*T, C) at s_v / 127
        c8 = il.ctx_req(ctx, -127, 127).to(torch.int8)
        res = il.wo_req(il.wo(mm, c8)) + il.res1_req(h.reshape(b * t, c))  # int32 at s_ln1
        h1 = i_layernorm(res, **il.ln1)  # (B*T, C) at ln1 scale
        x8 = il.x1_req(h1, -127, 127).to(torch.int8)
        g_in = il.gelu_in_req(il.wi(mm, x8), -(2**GELU_BITS), 2**GELU_BITS)
        g, _ = i_gelu(g_in, il.s_gelu_in)
        g8 = il.g_req(g * il.gelu_sign, -127, 127).to(torch.int8)
        res = il.w2_req(il.w2(mm, g8)) + il.res2_req(h1)
        return i_layernorm(res, **il.ln2).reshape(b, t, c)

    def forward_int(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (B, T) -> masked sum of the last hidden states (B, C) int64 and token counts (B, 1)."""
        b, t = input_ids.shape
        types = token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)
        e = self.word[input_ids].to(torch.int64) + self.pos[:t].to(torch.int64)[None] + self.type[types].to(torch.int64)
        h = i_layernorm(e, **self.ln0)  # (B, T, C)
        mask = attention_mask.to(torch.int64)
        for il in self.layers:
            h = self._layer(il, h, mask)
        summed = (h * mask[..., None]).sum(dim=1)  # (B, C)
        count = mask.sum(dim=1, keepdim=True).clamp(min=1)
        return torch.div(summed, count, rounding_mode="floor")

    def forward(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        pooled = self.forward_int(input_ids, attention_mask, token_type_ids)
        return nn.functional.normalize(pooled.double() * self.out_scale, dim=1).float()  # output boundary
