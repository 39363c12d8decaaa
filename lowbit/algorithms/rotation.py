"""Hadamard rotations folded into a Llama-layout causal LM (QuaRot: Ashkboos et al. 2024, arXiv 2404.00456).

Why: the residual stream of an LLM has a few channels whose values are 10-100x the others; a
per-token grid of 4 bits spends all its levels on them and rounds every other channel to zero.
An orthogonal rotation ``Q`` spreads each outlier over all channels (the rotated vector's entries
are sums of ±x_j / sqrt(n)), so the per-token range shrinks to a few standard deviations while
``(x Q)(W Q)^T = x W^T`` keeps the network's function exactly.

Hadamard matrices (``lowbit.core.hadamard``: Sylvester 2^k, Paley I for 12, Kronecker products;
SmolLM2 needs 576 = 12·12·4 for the residual, 1536 = 12·128 for the MLP, 64 for the head dim),
normalised by ``1 / sqrt(n)``; the fast transform is ``lowbit.kernels.hadamard`` (dense ``*_ref`` twin).

The residual rotation is QuaRot's randomised Hadamard ``Q = D H / sqrt(n)`` with ``D`` a seeded
random ±1 diagonal. Row-vector convention throughout (``y = x W^T``, ``W`` of shape (out, in)).

What :func:`rotate_model` does to a Llama-layout model (every step leaves the function unchanged):

1. Fold each RMSNorm's weight ``g`` into the linears that read it: ``W <- W diag(g)`` for q/k/v
   (input_layernorm) and gate/up (post_attention_layernorm); the norms' weights become 1
   (``RMSNorm(x Q) = RMSNorm(x) Q`` holds only for a weightless norm). The final norm: an untied
   LM head takes its ``g`` the same way; a head **tied** to the embedding stays tied (one table
   ``E Q`` for both) and the final norm becomes :class:`lowbit.nn.hadamard.RotatedRMSNorm`, which
   applies ``g`` in the unrotated basis with two fast transforms per token (``rms(x) Q^T diag(g) Q``)
   instead of a second vocab x hidden matrix (SmolLM2: 49152 x 576 x 4 B = 113 MB).
2. Rotate the residual stream with ``Q``: ``E <- E Q``; readers (q/k/v, gate/up, an untied head)
   ``W <- W Q``; writers (o_proj, down_proj) ``W <- Q^T W``, ``b <- b Q``.
3. Value/out pair per head (head dim d): ``W_v[h] <- H_d^T W_v[h]`` (v's output rows of head h),
   ``W_o[:, h] <- W_o[:, h] H_d`` (o_proj's input columns of every query head reading it). Folded,
   nothing at run time; the V cache then holds rotated values.
4. Online Hadamard on down_proj's input: the MLP becomes :class:`HadamardMLP`, which computes
   ``down((act(gate x) * up x) H)`` with ``W_down <- W_down H`` (``(h H)(W H)^T = h W^T``). The
   intermediate product has no norm before it, so this one cannot be folded; it runs as a fast
   Walsh-Hadamard transform (``n log n``) per token.

For a 4-bit KV cache QuaRot also rotates queries and keys after RoPE (``q k^T = (q H)(k H)^T``) so
keys are quantized in the rotated basis; :mod:`lowbit.nn.kv_cache` does that inside the cache
(``rotate=True``: keys and values quantized as ``x H``, attention reads ``deq(.) H^T``, which is the
same product as rotating the query).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from lowbit.core.hadamard import hadamard, hadamard_pm1, paley_hadamard, random_hadamard, sylvester_hadamard
from lowbit.errors import ConfigError
from lowbit.kernels.hadamard import hadamard_transform, hadamard_transform_ref, hadamard_transform_t
from lowbit.nn.hadamard import HadamardMLP, RotatedRMSNorm, rotation_modules

log = logging.getLogger(__name__)

FOLD_DTYPE = torch.float64  # folds are computed in float64, then cast back to the weights' dtype
# rotated vs unrotated fp32 logits: each fold is exact in real arithmetic; float32 rounding of the
# rotated weights (sums of 576 terms) leaves ~1e-6 relative error per layer
FOLD_ATOL = 1e-3


# ------------------------------------------------------------------------------ folding


def _fold_rows_in(linear: nn.Linear, m: torch.Tensor) -> None:
    """A reader of the rotated stream: ``W <- W m`` (m (in, in))."""
    linear.weight.data = (linear.weight.data.to(FOLD_DTYPE) @ m).to(linear.weight.dtype)


def _fold_out(linear: nn.Linear, m: torch.Tensor) -> None:
    """A writer to the rotated stream: ``W <- m^T W``, ``b <- b m`` (m (out, out))."""
    linear.weight.data = (m.t() @ linear.weight.data.to(FOLD_DTYPE)).to(linear.weight.dtype)
    if linear.bias is not None:
        linear.bias.data = (linear.bias.data.to(FOLD_DTYPE) @ m).to(linear.bias.dtype)


def _fold_norm(norm: nn.Module, readers: list[nn.Linear], offset: float) -> None:
    """``W <- W diag(offset + g)`` for every reader; the norm's effective weight becomes 1."""
    g = (offset + norm.weight.data).to(FOLD_DTYPE)
    if getattr(norm, "bias", None) is not None:
        raise ConfigError("rotation folds RMSNorm weights only; this norm has a bias (LayerNorm): not supported")
    for lin in readers:
        lin.weight.data = (lin.weight.data.to(FOLD_DTYPE) * g).to(lin.weight.dtype)
    norm.weight.data.fill_(1.0 - offset)


def _head_dims(cfg) -> tuple[int, int, int]:
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return heads, kv, d


def untie_head(model: nn.Module) -> bool:
    """Give a tied LM head its own copy of the embedding table (and say so in the config, so a saved
    folder rebuilds untied); True if it was tied. ``lowbit.load`` calls it for folders rotated with
    ``tie_head=False`` (and those saved before the tied form existed) loaded into a tied architecture."""
    from lowbit.models.adapters import adapter_for, backbone

    row = adapter_for(model, "rotation")
    lm = backbone(model)
    emb, head = lm.get_submodule(row.embeddings), lm.get_submodule(row.head)
    if head.weight is not emb.weight:
        return False
    head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=emb.weight.requires_grad)
    lm.config.tie_word_embeddings = False
    if hasattr(lm.config, "get_text_config"):
        lm.config.get_text_config().tie_word_embeddings = False
    return True


def rotate_model(model: nn.Module, seed: int = 0, online_down: bool = True, rotate_values: bool = True,
                 tie_head: bool = True) -> dict:
    """Fold norms and QuaRot rotations into a float Llama-layout causal LM, in place (see module doc).

    ``tie_head=False`` unties a tied LM head and folds the final norm into it (no online op at the
    head, one more vocab x hidden matrix). Returns what was done (recorded in the quantization
    report). The model must be float (rotate before quantizing)."""
    from lowbit.algorithms._llm import decoder_layers, require_llama_layout
    from lowbit.models.adapters import adapter_for, backbone

    offset = require_llama_layout(model, "rotation")
    row = adapter_for(model, "rotation")
    lm = backbone(model)
    cfg = lm.config
    if getattr(model, "lowbit_rotation", None):
        raise ConfigError("model is already rotated")
    layers = decoder_layers(model)
    quantized = [n for n, m in model.named_modules() if hasattr(m, "qweight")]
    if quantized:
        raise ConfigError(f"rotate a float model, before quantizing ({quantized[0]} is already quantized)")
    emb = lm.get_submodule(row.embeddings)
    head = lm.get_submodule(row.head)
    final_norm = lm.model.norm
    hidden = cfg.hidden_size
    heads, kv_heads, d = _head_dims(cfg)
    q = random_hadamard(hidden, seed)  # (hidden, hidden), orthogonal
    with torch.no_grad():
        tied = head.weight is emb.weight
        untied = tied and not tie_head and untie_head(model)  # the head will be E diag(g) Q, the embedding E Q
        emb.weight.data = (emb.weight.data.to(FOLD_DTYPE) @ q).to(emb.weight.dtype)  # a tied head reads it too
        if head.weight is emb.weight:  # tied: g stays in the final norm, applied in the unrotated basis
            lm.model.norm = RotatedRMSNorm.from_norm(final_norm, offset)
        else:
            _fold_norm(final_norm, [head], offset)
            _fold_rows_in(head, q)
        hd = hadamard(d, FOLD_DTYPE)
        for layer in layers:
            a, mlp = layer.self_attn, layer.mlp
            _fold_norm(layer.input_layernorm, [a.q_proj, a.k_proj, a.v_proj], offset)
            _fold_norm(layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj], offset)
            for lin in (a.q_proj, a.k_proj, a.v_proj, mlp.gate_proj, mlp.up_proj):
                _fold_rows_in(lin, q)
            _fold_out(a.o_proj, q)
            _fold_out(mlp.down_proj, q)
            if rotate_values:
                _fold_out(a.v_proj, torch.block_diag(*[hd] * kv_heads))  # v_h <- v_h H per KV head
                _fold_rows_in(a.o_proj, torch.block_diag(*[hd] * heads))  # o's input columns of every head
            if online_down:
                inter = mlp.down_proj.in_features
                _fold_rows_in(mlp.down_proj, hadamard(inter, FOLD_DTYPE))
                layer.mlp = HadamardMLP(mlp.gate_proj, mlp.up_proj, mlp.down_proj, getattr(cfg, "hidden_act", "silu"))
    info = {"method": "quarot-hadamard", "seed": seed, "hidden": hidden, "online_down": online_down,
            "rotate_values": rotate_values, "head_dim": d, "untied_head": untied, "tied_head": tied and not untied}
    model.lowbit_rotation = info
    log.info("rotated %s: residual %d (seed %d), values per head %d, online down_proj %s%s", getattr(
        model, "model_name", "model"), hidden, seed, d, online_down,
        ", LM head untied" if untied else ", LM head tied (final norm rotated online)" if tied else "")
    return info


def rotation_specs(model: nn.Module) -> dict[str, dict]:
    """``{name: spec}`` of every module with an online rotation (:class:`HadamardMLP`,
    :class:`RotatedRMSNorm`), recorded before their linears in metadata.json so load rebuilds them first."""
    names = set(rotation_modules(model))
    return {n: m.spec() for n, m in model.named_modules() if n in names}


__all__ = ["hadamard", "hadamard_pm1", "random_hadamard", "paley_hadamard", "sylvester_hadamard",
           "hadamard_transform", "hadamard_transform_ref", "hadamard_transform_t", "HadamardMLP", "rotate_model",
           "untie_head", "rotation_specs", "RotatedRMSNorm", "FOLD_ATOL"]
