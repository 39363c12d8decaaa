"""A W8A8-dynamic BERT sentence encoder as a hand-built ONNX graph of ONNX Runtime's fused kernels.

The traced export (:mod:`lowbit.io.onnx_encoder`) writes lowbit's per-token arithmetic as ~12 small ONNX
ops per linear; ONNX Runtime runs each as its own kernel (~8 us apiece at batch 1), so that graph is
slower than ORT's own ``quantize_dynamic`` model whatever its GEMMs do, and ORT has no fused kernel for
per-token codes. This module writes the same quantized model (lowbit's int8 weight codes and scales,
unchanged) as the ops ORT has fused CPU kernels for (``com.microsoft`` contrib operators; ONNX
operator spec otherwise; the contrib ops as documented in ONNX Runtime's ContribOperators.md) — ~18 nodes
per layer where ORT's own int8 graph has ~40:

    e = Cast(Gather(Wq, ids)) * Gather(s_w, ids) + P[:T]     P = position + token-type-0 rows (fp32)
    h = LayerNormalization(e)
    per layer:
      u, s, z = DynamicQuantizeLinear(h * f_qkv)               uint8, one scale / zero-point per tensor
      a = QAttention(u, [Wq|Wk|Wv], b_qkv, s, [s_q|s_k|s_v], mask, z)   int8 GEMM + softmax(q k^T / sqrt(d)) v
      h1 = LayerNormalization(DynamicQuantizeMatMul(a, Wo, s_o, 0, b_o) + h)
      x = Gelu(DynamicQuantizeMatMul(h1 * f_1, W1, s_1, 0, b_1)) * f_2
      r = max(ReduceMax(x, last axis), eps)                      one factor per token
      h = LayerNormalization(DynamicQuantizeMatMul(x / r, W2, s_2) * r + b_2 + h1)
    out = masked mean of h over the real tokens, L2-normalised

``f`` are the layers' SmoothQuant factors (``smooth_inv``). The out-projection's are folded into V's
rows (the attention output is a weighted sum of V's output channels, so ``a * f = softmax(.) (v * f)``:
V's scales and bias times ``f``, codes unchanged); the others stay one Mul each (the LayerNorm before
them also feeds the residual, so they cannot fold into it). Q, K and V share one activation
quantization when they share their SmoothQuant factors (lowbit's default,
:func:`lowbit.algorithms.smoothing.layer_smoothing_factors`); a model with per-linear factors gets
three ``DynamicQuantizeMatMul`` and a ``MultiHeadAttention`` instead.

Activations are quantized per tensor (``DynamicQuantizeLinear``: ``s = (max(0, max x) - min(0, min x))
/ 255``, uint8 asymmetric) — coarser than lowbit's per-token codes. The second FFN linear's input (the
GELU output, where a few tokens carry most of the range) loses most under one scale per tensor:
``down="rownorm"`` (the default) divides each token by its own maximum first and multiplies the
product back (exact in real arithmetic), so its quantization behaves like per-token codes at the cost
of three elementwise ops; ``down="per-tensor"`` skips that (faster, lower fidelity).

Weights are int8 (ORT's u8s8 GEMM), as in ORT's own ``quantize_dynamic`` models: exact on CPUs with
VNNI; on plain AVX2 ORT's u8s8 kernel adds pairs of products in int16 with saturation (ORT's docs
suggest ``reduce_range`` there), so the export checks the file in ORT on the exporting machine.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lowbit.errors import ConfigError
from lowbit.io.onnx_common import write_onnx
from lowbit.kernels.bert_encoder import w8a8_bert_parts
from lowbit.nn import DynamicQLinear

log = logging.getLogger(__name__)

OPSET = 17
MS_DOMAIN = "com.microsoft"
DOWN_MODES = ("rownorm", "per-tensor")
ROW_EPS = 1e-6  # floor of a token's maximum in the row-normalised FFN input (GELU rows are never all <= 0)
MASK_MIN_COUNT = 1e-9  # sentence-transformers' floor on the number of real tokens in mean pooling


def bert_parts(encoder) -> tuple[dict | None, str]:
    """The modules this graph reads (:func:`lowbit.kernels.bert_encoder.w8a8_bert_parts`, any kernel
    setting), ``(parts, "")``, or ``(None, why not)``."""
    src, why = w8a8_bert_parts(encoder, kernel_only=False)
    if src is None:
        return None, why
    tables, ln, layers = src
    return {"tables": tables, "ln": ln, "layers": layers, "config": encoder.bert.config,
            "normalize": bool(encoder.normalize)}, ""


def _np(t: torch.Tensor, dtype=np.float32) -> np.ndarray:
    return t.detach().cpu().numpy().astype(dtype, copy=False)


class _Graph:
    """Nodes and initializers under construction (unique names from a counter)."""

    def __init__(self):
        self.nodes, self.inits, self._n = [], [], 0

    def name(self, stem: str) -> str:
        self._n += 1
        return f"{stem}_{self._n}"

    def const(self, stem: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        name = self.name(stem)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, domain: str | None = None, **attrs):
        from onnx import helper

        outs = [self.name(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, domain=domain, **attrs))
        return outs[0] if n_out == 1 else outs

    def mul(self, x: str, factor: torch.Tensor | None) -> str:
        return x if factor is None else self.op("Mul", [x, self.const("smooth_inv", _np(factor))])

    def layer_norm(self, x: str, ln: nn.LayerNorm) -> str:
        return self.op("LayerNormalization", [x, self.const("ln_w", _np(ln.weight)), self.const("ln_b", _np(ln.bias))],
                       axis=-1, epsilon=float(ln.eps))


def _smooth(m: DynamicQLinear) -> torch.Tensor | None:
    return None if m.smooth_inv is None else m.smooth_inv.detach().float()


def _row_factor(m: DynamicQLinear, factor: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(w_scale, bias)`` with each output channel times ``factor`` (a folded SmoothQuant factor of the next layer)."""
    f = 1.0 if factor is None else factor
    scale = m.w_scale.detach().float() * f
    return scale, None if m.bias is None else m.bias.detach().float() * f


def _int8_linear(g: _Graph, x: str, m: DynamicQLinear, factor: torch.Tensor | None = None, bias: bool = True) -> str:
    """``DynamicQuantizeMatMul(x, W, s_W, 0[, b])``: per-tensor uint8 codes of ``x``, int8 codes (K, N) of W."""
    scale, b = _row_factor(m, factor)
    inputs = [x, g.const("w", _np(m.qweight_t, np.int8)), g.const("w_scale", _np(scale)),
              g.const("w_zp", np.zeros(m.out_features, np.int8))]
    if bias and b is not None:
        inputs.append(g.const("bias", _np(b)))
    return g.op("DynamicQuantizeMatMul", inputs, domain=MS_DOMAIN)


def _rownorm_linear(g: _Graph, x: str, m: DynamicQLinear) -> str:
    """``DynamicQuantizeMatMul(x / r, W) * r + b``, ``r = max(max_k x, eps)`` per token: per-tensor codes of
    rows scaled alike."""
    r = g.op("Max", [g.op("ReduceMax", [x], axes=[-1], keepdims=1), g.const("row_eps", np.array(ROW_EPS, np.float32))])
    y = g.op("Mul", [_int8_linear(g, g.op("Div", [x, r]), m, bias=False), r])
    return y if m.bias is None else g.op("Add", [y, g.const("bias", _np(m.bias))])


def _attention(g: _Graph, h: str, lins, fold: torch.Tensor | None, heads: int, key_mask: str) -> tuple[str, bool]:
    """Q/K/V projections and attention: ``QAttention`` on shared codes, else three GEMMs + ``MultiHeadAttention``."""
    q, k, v = lins
    factors = [_smooth(m) for m in lins]
    shared = all(f is None for f in factors) or (
        all(f is not None for f in factors) and torch.equal(factors[0], factors[1])
        and torch.equal(factors[0], factors[2]))
    if not shared:  # per-linear SmoothQuant factors: each projection quantizes its own input
        qkv = [_int8_linear(g, g.mul(h, f), m, fold if m is v else None) for m, f in zip(lins, factors)]
        return g.op("MultiHeadAttention", [*qkv, "", key_mask], domain=MS_DOMAIN, num_heads=heads), False
    u, s, z = g.op("DynamicQuantizeLinear", [g.mul(h, factors[0])], n_out=3)
    rows = [_row_factor(m, fold if m is v else None) for m in lins]
    w = torch.cat([m.qweight_t for m in lins], dim=1)  # (K, 3H): [Wq | Wk | Wv], QAttention's layout
    scale = torch.cat([r[0] for r in rows])  # (3H,)
    bias = torch.cat([r[1] if r[1] is not None else torch.zeros(m.out_features) for r, m in zip(rows, lins)])
    inputs = [u, g.const("w_qkv", _np(w, np.int8)), g.const("b_qkv", _np(bias)), s, g.const("w_scale", _np(scale)),
              key_mask, z, g.const("w_zp", np.zeros(1, np.int8))]
    return g.op("QAttention", inputs, domain=MS_DOMAIN, num_heads=heads), True


def build_bert_graph(encoder, down: str = "rownorm"):
    """``(onnx.ModelProto, summary)`` of a W8A8-dynamic BERT sentence encoder (see the module docstring)."""
    from onnx import TensorProto, helper

    if down not in DOWN_MODES:
        raise ConfigError(f"down must be one of {DOWN_MODES}, got {down!r}")
    parts, why = bert_parts(encoder)
    if parts is None:
        raise ConfigError(f"the fused ONNX graph needs a W8A8-dynamic BERT encoder with mean pooling: {why}")
    cfg = parts["config"]
    g = _Graph()
    word, pos, typ = parts["tables"]
    rows = g.op("Gather", [g.const("word_q", _np(word.qweight, np.int8)), "input_ids"], axis=0)  # (B, T, H) int8
    row_scale = g.op("Gather", [g.const("word_scale", _np(word.scale.detach().float()[:, None])), "input_ids"],
                     axis=0)  # (B, T, 1)
    e = g.op("Mul", [g.op("Cast", [rows], to=TensorProto.FLOAT), row_scale])
    with torch.no_grad():  # the graph's inputs carry no token types: every token has type 0
        p_table = pos.qweight.float() * pos.scale[:, None] + typ.qweight[0].float() * typ.scale[0]  # (P, H)
    t_len = g.op("Shape", ["input_ids"], start=1, end=2)  # (1,) = T
    p_rows = g.op("Slice", [g.const("positions", _np(p_table)), g.const("zero", np.array([0], np.int64)), t_len,
                            g.const("axis0", np.array([0], np.int64))])  # (T, H)
    h = g.layer_norm(g.op("Add", [e, p_rows]), parts["ln"])
    key_mask = g.op("Cast", ["attention_mask"], to=TensorProto.INT32)  # (B, T)
    heads, shared = cfg.num_attention_heads, 0
    for (q, k, v, o, f1, f2), (ln1, ln2) in parts["layers"]:
        att, one = _attention(g, h, (q, k, v), _smooth(o), heads, key_mask)  # o's factors folded into V
        shared += one
        h1 = g.layer_norm(g.op("Add", [_int8_linear(g, att, o), h]), ln1)
        x = g.mul(g.op("Gelu", [_int8_linear(g, g.mul(h1, _smooth(f1)), f1)], domain=MS_DOMAIN), _smooth(f2))
        y = _rownorm_linear(g, x, f2) if down == "rownorm" else _int8_linear(g, x, f2)
        h = g.layer_norm(g.op("Add", [y, h1]), ln2)
    mask = g.op("Unsqueeze", [g.op("Cast", ["attention_mask"], to=TensorProto.FLOAT),
                              g.const("axis2", np.array([2], np.int64))])  # (B, T, 1)
    axis1 = g.const("axis1", np.array([1], np.int64))
    total = g.op("ReduceSum", [g.op("Mul", [h, mask]), axis1], keepdims=0)  # (B, H)
    count = g.op("Max", [g.op("ReduceSum", [mask, axis1], keepdims=0),
                         g.const("min_count", np.array(MASK_MIN_COUNT, np.float32))])  # (B, 1)
    pooled = g.op("Div", [total, count])
    out = g.op("LpNormalization", [pooled], axis=-1, p=2) if parts["normalize"] else pooled
    g.nodes.append(helper.make_node("Identity", [out], ["sentence_embedding"]))
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "sequence"])
              for n in ("input_ids", "attention_mask")]
    outputs = [helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, ["batch", cfg.hidden_size])]
    graph = helper.make_graph(g.nodes, "lowbit_bert_w8a8_fused", inputs, outputs, g.inits)
    model = helper.make_model(graph, producer_name="lowbit",
                              opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)])
    model.ir_version = 8
    n = len(parts["layers"])
    return model, {"graph": "fused", "layers": n, "int8_linears": 6 * n, "int8_embeddings": 1,
                   "shared_qkv_layers": shared, "down": down}


def export_bert_onnx(encoder, path: str | Path, down: str = "rownorm", overwrite: bool = False) -> dict:
    """Write :func:`build_bert_graph`'s model to ``path`` atomically; returns a summary (counts, bytes, ops)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise ConfigError(f"{path} exists (use --force / overwrite=True to replace it)")
    model, info = build_bert_graph(encoder, down)
    size, ops = write_onnx(model, path)
    log.info("exported %s: %s, %.2f MB", path, info, size / 1e6)
    return {"path": str(path), "bytes": size, **info, "ops": ops}
