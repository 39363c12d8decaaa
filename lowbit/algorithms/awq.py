"""AWQ (Lin et al. 2023, "AWQ: Activation-aware Weight Quantization for LLM Compression and
Acceleration"): protect the weights that meet large activations by scaling, not by keeping them
in float.

For linears that read the same input ``x`` (K channels), with per-channel activation magnitude
``a_j = mean_tokens |x_j|``, AWQ scales input channel ``j`` of the weights up and the activation down:

    y = (x / s) Q(W * s)^T,      s_j = a_j^alpha / sqrt(max(a^alpha) * min(a^alpha))

and picks ``alpha`` on a grid in [0, 1) to minimise ``||block(x) - block_q(x)||^2`` where the block
is what follows (sec. 3.2: the attention for q/k/v, the MLP for gate/up, the linear itself for
down_proj). ``1 / s`` is folded into the op that produces ``x``: the RMSNorm weight before q/k/v and
before gate/up (exact with pre-norm), the rows of up_proj before down_proj (exact: the SiLU gate
multiplies up's output elementwise). Under grouped-query attention v_proj has fewer rows than o_proj has
inputs, so o_proj gets only the clipping search by default; ``value_scales=True`` folds o_proj's input scales
into v_proj's rows, one scale per v row shared by the query heads that read it (:class:`KVTie`; our extension, not
the paper's: on SmolLM2's held-out calibration windows it does not pay, bench/results/w4_heldout.md).
Then a clipping search per linear and group: ``max|W|`` is shrunk by a ratio in [0.5, 1] chosen to
minimise the group's output error on a token sample (q/k are skipped, as in the paper: their
errors are squashed by the softmax). The result is stored by RTN in ``WeightOnlyQLinear`` (or with
double-quantized scales), so the int4 kernels and save/load apply.

Decoder layers are processed sequentially (``sequential.py``): each layer's statistics come from the
outputs of the already-quantized layers before it.

Across ``torch.distributed`` ranks (``torchrun ... -m lowbit quantize --scheme awq``; helpers in
``ranks.py``): rank ``r`` runs windows ``r, r + W, ...``. The search windows' per-channel ``sum |x|``
and token counts are summed in window order (each window's term broadcast by its owner); each alpha's
loss is the window-ordered sum of per-window squared errors (every rank evaluates the block on its
windows for all alphas, then one gather per search); the clipping search's token sample is drawn by
global row index from one seeded generator on every rank and its rows gathered from their owners;
the clipping searches of a layer's linears go round-robin to ranks (linear ``k`` on rank ``k mod W``)
and the clipped weights are broadcast; folding and RTN storage run on every rank (the same inputs,
the same result). So 1 and W ranks give bit-identical layers; they differ from one plain process by
float summation order (a mean over the concatenated windows there), which can move a chosen alpha.
``rounding="gptq"`` continues with ``gptq_ranks.py``'s step.

``gguf="q4_0" | "q4_1" | "q8_0"`` runs AWQ on llama.cpp's grid from the start (blocks of 32 along the
input): the scale and clipping searches fake-quantize with ggml's reference rounding
(:func:`lowbit.nn.gguf_linear.ggml_quantize`: Q4_0 ``d = w[argmax |w|] / -8``, codes ``[-8, 7]``; Q4_1
``d = (max - min) / 15`` with the float min; Q8_0 ``d = absmax / 127``; ``d`` and the min stored fp16),
and the final linears are stored by :func:`~lowbit.nn.gguf_linear.linear_on_ggml_grid`, so ``lowbit export
--format gguf`` writes their codes unchanged ("exact"). With ``rounding="gptq"`` only ``q4_0`` (GPTQ's
``gguf`` option): GPTQ then picks Q4_0's scales and codes itself. ``bits`` / ``group_size`` /
``symmetric`` must be the type's (4 / 32 / True for q4_0, 4 / 32 / False for q4_1, 8 / 32 / True for q8_0),
as ``GPTQConfig(gguf=...)`` requires; every quantized linear needs ``in_features % 32 == 0``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.algorithms._calib import LM_CALIB_WINDOW, calibration_info, capture_inputs
from lowbit.algorithms._llm import (effective_group_size, layer_linears, layer_prefix, lm_calibration, n_tokens,
                                   require_llama_layout,
                                   widest_input)
from lowbit.algorithms._weights import check_weight_fields, weight_scheme_name
from lowbit.algorithms.gptq import (
    DEFAULT_CALIB_WINDOWS,
    GPTQConfig,
    check_enough_tokens,
    make_gptq_process,
    scheme_attention_hessian,
    scheme_residual_weights,
)
from lowbit.algorithms.hqq import HQQConfig, hqq_linear, hqq_quantize
from lowbit.algorithms.sinkhorn import sinkhorn_column_scales
from lowbit.algorithms.ranks import (broadcast_from, collective_guard, gather_batches, local_indices, ordered_sum,
                                    ranks_active, require_batches, shard, with_world_size, world_rank)
from lowbit.algorithms.sequential import process_layerwise, run_layer
from lowbit.api import QuantizeReport, name_selected, register_handler
from lowbit.config import BaseConfig, option_bool, register_config, register_scheme
from lowbit.core import choose_qparams, dequantize, per_channel, per_group, quantize
from lowbit.errors import ConfigError
from lowbit.nn import WeightOnlyQLinear, weight_format
from lowbit.nn.double_quant import DoubleQuantQLinear, double_quant_roundtrip
from lowbit.nn.gguf_linear import GGML_BLOCK, GGML_TYPES, ggml_quantize, linear_on_ggml_grid

log = logging.getLogger(__name__)

CLIP_RATIOS = 20  # shrink ratios 1.0, 0.975, ..., 0.525 (the paper's grid: 0.5..1 in 20 steps)
CLIP_MIN_RATIO = 0.5
NO_CLIP = ("self_attn.q_proj", "self_attn.k_proj")
ROUNDINGS = ("rtn", "gptq", "gptaq")
CALIBRATION_FREE_ROUNDINGS = ("hqq", "sinq")  # AWQConfig.init values that replace RTN (with rounding "rtn")
# gguf type -> the (bits, group_size, symmetric) it is; fmt None and double_quant False for all
GGUF_FIELDS = {"q4_0": (4, GGML_BLOCK, True), "q4_1": (4, GGML_BLOCK, False), "q8_0": (8, GGML_BLOCK, True)}


@register_config("awq")
@dataclass(frozen=True)
class AWQConfig(BaseConfig):
    bits: int = 4
    group_size: int = 128  # 0 = per channel; falls back to a divisor of in_features (see _llm.py)
    symmetric: bool = True
    fmt: str | None = None  # a codebook instead of int{bits}, e.g. "nf4"
    double_quant: bool = False
    n_grid: int = 20  # alpha in {0, 1/n, ..., (n-1)/n}
    # the clipping search; None: on for rounding "rtn" / "gptq", off for "gptaq" (whose float stream must pass the
    # exact, unclipped transform: held-out calibration KL 0.195 without vs 0.237 with, bench/results/w4_heldout.md)
    clip: bool | None = None
    search_tokens: int = 2048  # calibration tokens used by the scale search (whole windows)
    clip_tokens: int = 512  # tokens sampled for the clipping search
    n_calib: int | None = None  # None: the windows search_tokens needs (GPTQ's default with rounding="gptq")
    kernel: str = "auto"
    rounding: str = "rtn"  # "gptq": GPTQ's error-compensating rounding of the scaled, clipped layer; "gptaq": GPTAQ's
    # rounding "gptq" / "gptaq": the GPTQ step's group parameters (GPTQConfig.init, e.g. "mse"); rounding "rtn":
    # "hqq" replaces RTN by HQQ (lowbit.algorithms.hqq) in the searches and the stored codes (the ``awq-hqq`` scheme),
    # "sinq" by RTN on SINQ's Sinkhorn-normalised weights W / t, t stored per layer (lowbit.algorithms.sinkhorn)
    init: str = "minmax"
    gguf: str | None = None  # "q4_0" | "q4_1" | "q8_0": ggml's grid and rounding (rounding="gptq": "q4_0" only)
    duo_scaling: bool = False  # s = a^alpha / w^(1 - alpha) (AutoAWQ's variant; awq_scales) instead of a^alpha
    # each window's first tokens left out of the statistics, losses and clip samples (an ablation: SmolLM2's first
    # token is its attention sink, residual stream ~2e4; leaving it out raised held-out calibration KL 0.382 -> 0.648)
    sink_tokens: int = 0
    attention_hessian: bool = False  # the GPTQ / GPTAQ step's v_proj Hessian of attention-mixed inputs (GPTQConfig)
    residual_weights: bool = False  # the GPTQ / GPTAQ step's o_proj / down_proj tokens weighted by 1 / ms(residual)
    attention_scales: bool = True  # False: no scale search for q/k/v (input_layernorm untouched); the MLP's stay
    value_scales: bool = False  # o_proj's input scales folded into v_proj's rows, shared per KV head (KVTie)

    def __post_init__(self):
        check_weight_fields(self.bits, self.group_size, self.fmt, self.double_quant)
        if self.n_grid < 1:
            raise ConfigError(f"n_grid must be >= 1, got {self.n_grid}")
        if self.sink_tokens < 0:
            raise ConfigError(f"sink_tokens must be >= 0, got {self.sink_tokens}")
        if self.rounding not in ROUNDINGS:
            raise ConfigError(f"rounding must be one of {', '.join(ROUNDINGS)}, got {self.rounding!r}")
        if self.attention_hessian and self.rounding == "rtn":
            raise ConfigError("awq attention_hessian=True shapes the GPTQ step's v_proj Hessian: it needs rounding "
                              "'gptq' or 'gptaq'")
        if self.residual_weights and self.rounding == "rtn":
            raise ConfigError("awq residual_weights=True shapes the GPTQ step's o_proj / down_proj Hessians: it needs "
                              "rounding 'gptq' or 'gptaq'")
        if self.init not in ("minmax", *CALIBRATION_FREE_ROUNDINGS) and self.rounding == "rtn":
            raise ConfigError(f"awq init={self.init!r} chooses the GPTQ step's group parameters: it needs rounding "
                              "'gptq' or 'gptaq' (plain AWQ's clipping search chooses its ranges; init 'hqq' / "
                              "'sinq' round with HQQ / SINQ instead of RTN)")
        if self.final_rounding and (self.fmt or self.double_quant or self.gguf):
            raise ConfigError(f"awq init={self.init!r} ({self.init.upper()}'s rounding) stores int codes with their "
                              "own scales (and zero-points): no fmt, double_quant or gguf (use rounding 'gptq' for "
                              "GPTQ with HQQ group parameters)")
        if self.gguf is not None:
            if self.gguf not in GGUF_FIELDS:
                raise ConfigError(f"awq gguf must be one of {', '.join(GGML_TYPES)}, got {self.gguf!r}")
            bits, group, sym = GGUF_FIELDS[self.gguf]
            if (self.bits, self.group_size, self.symmetric, self.fmt, self.double_quant) != (bits, group, sym, None,
                                                                                             False):
                raise ConfigError(f"awq gguf={self.gguf!r} needs bits={bits}, group_size={group}, "
                                  f"{'symmetric' if sym else 'affine'}, no fmt or double_quant; got bits={self.bits}, "
                                  f"group_size={self.group_size}, symmetric={self.symmetric}, fmt={self.fmt!r}, "
                                  f"double_quant={self.double_quant}")
            if self.rounding != "rtn" and self.gguf != "q4_0":
                raise ConfigError(f"awq-{self.rounding} gguf={self.gguf!r}: GPTQ rounds on ggml's grid for 'q4_0' only "
                                  "(q8_0 and q4_1 need no option: --bits 8 / --affine at --group-size 32)")

    @property
    def final_rounding(self) -> str | None:
        """"hqq" / "sinq": that rounding instead of RTN in the scale / clipping searches and the stored codes
        (``init`` of that name with rounding "rtn"); None: RTN (or the GPTQ step)."""
        return self.init if self.init in CALIBRATION_FREE_ROUNDINGS and self.rounding == "rtn" else None

    @property
    def clips(self) -> bool:
        """Whether the clipping search runs (``clip``, or its default for the rounding)."""
        return self.rounding != "gptaq" if self.clip is None else self.clip

    def calibration_windows(self) -> int:
        """512-token windows to calibrate on: n_calib, else what the scale search (and GPTQ) need."""
        if self.n_calib:
            return self.n_calib
        search = max(1, self.search_tokens // LM_CALIB_WINDOW)
        return max(search, DEFAULT_CALIB_WINDOWS) if self.rounding != "rtn" else search

    def gptq_config(self) -> GPTQConfig:
        """The GPTQ settings of the ``rounding="gptq"`` / ``"gptaq"`` step (same bits, groups, format, layers)."""
        return GPTQConfig(bits=self.bits, group_size=self.group_size, symmetric=self.symmetric, fmt=self.fmt,
                          double_quant=self.double_quant, kernel=self.kernel, include=self.include,
                          exclude=self.exclude, gguf=self.gguf, asymmetric_calib=self.rounding == "gptaq",
                          init=self.init, attention_hessian=self.attention_hessian,
                          residual_weights=self.residual_weights)

    @property
    def format_name(self) -> str:
        return weight_format(self.bits, self.symmetric, self.fmt)

    @property
    def scheme(self) -> str:
        rounding = self.final_rounding or self.rounding
        method = "awq" if rounding == "rtn" else f"awq-{rounding}"
        name = weight_scheme_name(method, self.bits, self.group_size, self.symmetric, self.fmt, self.double_quant)
        default = self.rounding != "gptaq"
        name += "" if self.clips == default else ("-clip" if self.clips else "-noclip")
        init = "" if self.init == "minmax" or self.final_rounding else f"-{self.init}init"
        return f"{name}{'-ggml' if self.gguf else ''}{init}" \
               f"{'-duo' if self.duo_scaling else ''}{f'-sink{self.sink_tokens}' if self.sink_tokens else ''}" \
               f"{'-attnh' if self.attention_hessian else ''}{'-resw' if self.residual_weights else ''}" \
               f"{'' if self.attention_scales else '-noattnscales'}{'-voscales' if self.value_scales else ''}"


# ------------------------------------------------------------------------------- the math


def fake_quant_weight(w: torch.Tensor, config: AWQConfig, group_size: int) -> torch.Tensor:
    """RTN ``dequantize(quantize(w))`` (N, K) with the stored scale precision (fp16 or double-quant);
    with ``config.gguf``, ggml's reference rounding: ``d * q`` (Q4_0, Q8_0) or ``d * u + m`` (Q4_1) per
    block of 32, ``d`` and ``m`` fp16 (:func:`ggml_quantize`)."""
    if config.gguf:
        if group_size != GGML_BLOCK:
            raise ConfigError(f"{config.gguf} needs groups of {GGML_BLOCK}, got {group_size}")
        n, k = w.shape
        codes, d, m = ggml_quantize(w, config.gguf)
        deq = codes.float().reshape(n, k // GGML_BLOCK, GGML_BLOCK) * d.float()[..., None]  # (N, K/32, 32)
        if m is not None:
            deq = deq + m.float()[..., None]
        return deq.reshape(n, k).to(w.dtype)
    if config.final_rounding:  # HQQ's fitted (fp16) scales and zero-points, or RTN on SINQ's W / t
        hqq = _hqq_config(config, group_size)
        t = sinkhorn_column_scales(w, hqq.sinkhorn_iters)[0] if hqq.sinkhorn else None
        codes, qp, _ = hqq_quantize(w if t is None else w.float() / t, config.bits, group_size, config.symmetric,
                                    hqq.iters, integer_zero_point=hqq.sinkhorn and not config.symmetric)
        deq = dequantize(codes, qp)
        return (deq if t is None else deq * t).to(w.dtype)
    gran = per_group(group_size) if group_size else per_channel(0)
    qp = choose_qparams(w, config.format_name, config.symmetric, gran)
    qp.scale = double_quant_roundtrip(qp.scale) if config.double_quant else qp.scale.to(torch.float16).float()
    return dequantize(quantize(w, qp), qp)


def awq_scales(act_mean: torch.Tensor, alpha: float, weight_mean: torch.Tensor | None = None) -> torch.Tensor:
    """``s = a^alpha / sqrt(max * min)`` (K,), normalised so the scales straddle 1; with ``weight_mean``
    (duo scaling) ``s = a^alpha / w^(1 - alpha)`` before the normalisation, ``w`` the per-input-channel
    mean of ``|W|`` relative to its group's max (:func:`weight_magnitude`): channels whose weights are
    already large are scaled up less."""
    s = act_mean.clamp_min(1e-4).pow(alpha)
    if weight_mean is not None:
        s = (s / (weight_mean.pow(1 - alpha) + 1e-4)).clamp_min(1e-4)
    return s / (s.max() * s.min()).sqrt()


def weight_magnitude(weights: list[torch.Tensor], groups: list[int]) -> torch.Tensor:
    """Mean over the rows of the stacked weights of ``|w| / max|w|`` in each row's group, per input
    channel (K,): the weight side of duo scaling."""
    rel = []
    for w, g in zip(weights, groups):
        n, k = w.shape
        g = g or k
        a = F.pad(w.abs().float(), (0, (-k) % g)).reshape(n, -1, g)  # (N, G, g); a ragged group zero-padded
        rel.append((a / (a.amax(-1, keepdim=True) + 1e-6)).reshape(n, -1)[:, :k])
    return torch.cat(rel).mean(0)


class KVTie:
    """Scales of o_proj's input channels that v_proj's rows can absorb under grouped-query attention.

    o_proj's input is ``H`` query heads of ``d`` channels; query head ``h`` reads KV head ``h // r`` (``r = H /
    n_kv`` query heads per KV head), so channel ``(h, j)`` carries v's output row ``(h // r, j)``. A scale folded
    into that row divides all ``r`` channels at once: the ``K = H d`` statistics are averaged over each KV head's
    query heads and broadcast back (``__call__``), and :meth:`to_kv` reads the ``n_kv d`` row scales off."""

    def __init__(self, kv_features: int, in_features: int, head_dim: int):
        if in_features % kv_features or kv_features % head_dim:
            raise ConfigError(f"awq value_scales: o_proj's {in_features} inputs are not whole copies of v_proj's "
                              f"{kv_features} outputs in heads of {head_dim}")
        self.n_kv, self.r, self.d = kv_features // head_dim, in_features // kv_features, head_dim

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        """(H d,) -> (H d,): each channel replaced by its mean over the query heads of its KV head."""
        m = t.reshape(self.n_kv, self.r, self.d).mean(1, keepdim=True)  # (n_kv, 1, d)
        return m.expand(self.n_kv, self.r, self.d).reshape(-1)

    def to_kv(self, s: torch.Tensor) -> torch.Tensor:
        """(H d,) tied scales -> (n_kv d,): one per v row."""
        return s.reshape(self.n_kv, self.r, self.d)[:, 0].reshape(-1)


def _head_dim(attn: nn.Module) -> int:
    """The attention's head dimension (transformers' ``head_dim``, else hidden / heads from its config)."""
    d = getattr(attn, "head_dim", None)
    if d is None:
        cfg = attn.config
        d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return int(d)


def search_scale(x_mean: torch.Tensor, linears: list[nn.Linear], block, ref, config: AWQConfig,
                 groups: list[int], reduce=None, tie=None) -> tuple[torch.Tensor, float, float]:
    """Grid search of alpha: the (K,) scales minimising the block's output MSE, the alpha and its loss.

    ``tie`` (K,) -> (K,): makes the statistics equal where the scales must be equal (:class:`KVTie`); the
    scales of equal statistics are equal, since :func:`awq_scales` is elementwise up to a common factor.

    ``reduce`` (across ranks): ``block()`` and ``ref`` are lists of this rank's per-window outputs, and
    ``reduce(sse)`` turns the per-window sums of squared errors of every alpha, ``sse`` (n_grid, windows
    here), into the n_grid losses over every rank's windows (:meth:`_Spread.losses`)."""
    originals = [m.weight.detach().clone() for m in linears]
    w_mean = weight_magnitude(originals, groups) if config.duo_scaling else None
    if tie is not None:
        x_mean, w_mean = tie(x_mean), None if w_mean is None else tie(w_mean)
    losses: list = []
    try:
        for k in range(config.n_grid):
            s = awq_scales(x_mean, k / config.n_grid, w_mean)
            for m, w, g in zip(linears, originals, groups):
                m.weight.data = fake_quant_weight(w * s, config, g) / s
            out = block()
            if reduce is None:
                losses.append(float(((out - ref) ** 2).mean()))
            else:  # (windows here,)
                losses.append(torch.stack([((o - r) ** 2).sum() for o, r in zip(out, ref)]) if out
                              else torch.zeros(0))
    finally:
        for m, w in zip(linears, originals):
            m.weight.data = w
    if reduce is not None:
        losses = reduce(torch.stack(losses))
    best = (None, float("inf"))
    for k, loss in enumerate(losses):  # the first of equal losses, as a running strict minimum
        if loss < best[1]:
            best = (k, loss)
    if best[0] is None:
        return None, 0.0, float("inf")
    alpha = best[0] / config.n_grid
    return awq_scales(x_mean, alpha, w_mean), alpha, best[1]


def search_clip(w: torch.Tensor, x: torch.Tensor, config: AWQConfig, group_size: int) -> torch.Tensor:
    """Per (row, group) clipping of ``max|w|`` minimising that group's output error on tokens ``x`` (S, K)."""
    n, k = w.shape
    g = group_size or k
    wg = w.reshape(n, k // g, g)  # (N, G, g)
    xg = x.reshape(-1, k // g, g)  # (S, G, g)
    ref = torch.einsum("sgk,ngk->ngs", xg, wg)  # (N, G, S): each group's contribution to each output
    absmax = wg.abs().amax(dim=-1, keepdim=True)  # (N, G, 1)
    best_err = torch.full((n, k // g), float("inf"))
    best_max = absmax.clone()
    for i in range(CLIP_RATIOS):
        cur = absmax * (1 - i * (1 - CLIP_MIN_RATIO) / CLIP_RATIOS)
        clipped = torch.maximum(torch.minimum(wg, cur), -cur).reshape(n, k)
        q = fake_quant_weight(clipped, config, group_size).reshape(n, k // g, g)
        err = ((torch.einsum("sgk,ngk->ngs", xg, q) - ref) ** 2).mean(dim=-1)  # (N, G)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_max = torch.where(better[..., None], cur, best_max)
    return torch.maximum(torch.minimum(wg, best_max), -best_max).reshape(n, k)


# ------------------------------------------------------------------------------- the handler


class _Spread:
    """AWQ's ``n_search`` search windows, window ``b`` on rank ``b mod W`` (all of them in one process):
    every statistic is reduced in window order (:mod:`lowbit.algorithms.ranks`), so one process and any
    number of ranks compute the same floats."""

    def __init__(self, n_search: int):
        self.n = n_search

    def mean_abs(self, xs: list[torch.Tensor], channels: int) -> torch.Tensor:
        """Per-channel ``mean |x|`` (C,) over every search window's tokens."""
        flat = [t.reshape(-1, channels) for t in xs]  # (tokens, C) per window
        total = ordered_sum([t.abs().sum(dim=0) for t in flat], self.n, (channels,))
        count = ordered_sum([torch.tensor(t.shape[0], dtype=torch.int64) for t in flat], self.n, (), torch.int64)
        return total / int(count)

    def losses(self, sse: torch.Tensor, numel: int) -> list[float]:
        """Per-alpha mean squared error from ``sse`` (n_grid, windows here); ``numel``: one window's output size."""
        total = ordered_sum(list(sse.T), self.n, (sse.shape[0],))  # (n_grid,)
        return [float(v) for v in total / (numel * self.n)]

    def sample_rows(self, xs, gen: torch.Generator, k: int, channels: int) -> torch.Tensor:
        """``k`` token rows (k, C) drawn uniformly from every search window's tokens, windows concatenated in
        order (``xs``: this rank's windows, (tokens, C) each): the same rows (and generator state) on every
        rank and at every world size."""
        per = xs[0].shape[0] if xs else None  # tokens per window (one window length: sequential.py)
        per = int(broadcast_from(torch.tensor(per or 0, dtype=torch.int64), 0))  # rank 0 always has a window
        idx = torch.randperm(per * self.n, generator=gen)[:k]  # global row r: window r // per, row r % per
        mine = [x[idx[idx // per == b] % per] for b, x in zip(local_indices(self.n), xs)]
        out = torch.empty(idx.shape[0], channels)
        for b, rows in enumerate(gather_batches(mine, self.n)):
            out[(idx // per == b).nonzero().squeeze(1)] = rows
        return out


def make_awq_process(config: AWQConfig, prefix: str, report: QuantizeReport, stats: dict, norm_offset: float,
                     n_batches: int):
    """The per-layer AWQ step for Llama-layout blocks; ``norm_offset`` 1.0 for norms computing ``x (1 + w)``.

    ``n_batches``: the number of calibration windows over all ranks (the layer receives this rank's
    windows ``r, r + W, ...``; all of them in one process)."""

    def selected(name: str) -> bool:
        return name_selected(name, config.include, config.exclude)

    def process(i: int, layer: nn.Module, inputs: list, kwargs: dict) -> None:
        t0 = time.perf_counter()
        linears = {n: m for n, m in layer_linears(layer).items() if selected(f"{prefix}.{i}.{n}")}
        if not linears:
            return
        for n, m in linears.items():
            if config.gguf and m.in_features % GGML_BLOCK:
                raise ConfigError(f"awq gguf={config.gguf!r}: {prefix}.{i}.{n} has in_features={m.in_features}, "
                                  f"not a multiple of ggml's block of {GGML_BLOCK}; exclude it or drop --gguf")
        attn, mlp = layer.self_attn, layer.mlp
        # Whole windows for the search (attention needs full sequences), up to search_tokens.
        per_window = max(1, inputs[0].shape[-2] * inputs[0].shape[0])
        # the first n_search windows over all ranks; this rank's share of them
        spread = _Spread(max(1, min(n_batches, config.search_tokens // per_window)))
        n_win = len(local_indices(spread.n))
        watch = {"self_attn.q_proj": attn.q_proj, "self_attn.o_proj": attn.o_proj,
                 "mlp.gate_proj": mlp.gate_proj, "mlp.down_proj": mlp.down_proj}
        seen: dict[str, list] = {n: [] for n in watch}
        with capture_inputs({f"{prefix}.{i}.{n}": m for n, m in watch.items()},
                            lambda f, x: seen[f[len(f"{prefix}.{i}."):]].append(x)):
            run_layer(layer, inputs[:n_win], kwargs, i, keep=False)
        hidden, inter = mlp.gate_proj.in_features, mlp.down_proj.in_features
        x_attn = seen["self_attn.q_proj"]  # normed inputs (B, T, C) per window
        skip = config.sink_tokens
        if skip >= inputs[0].shape[-2]:
            raise ConfigError(f"awq sink_tokens={skip} leaves no token of a {inputs[0].shape[-2]}-token window")
        scored = max(1, (inputs[0].shape[-2] - skip) * inputs[0].shape[0])  # tokens per window in the losses
        flat = lambda xs: [x[:, skip:].reshape(-1, x.shape[-1]) for x in xs]  # noqa: E731  (tokens, K) per window
        # per window: each window's terms are reduced in window order
        x_mlp, x_down, x_o = (flat(seen[n]) for n in ("mlp.gate_proj", "mlp.down_proj", "self_attn.o_proj"))
        apply = lambda f, xs: [f(x) for x in xs]  # noqa: E731
        g = lambda m: effective_group_size(m.in_features, config.group_size)  # noqa: E731
        info: dict = {}
        s_qkv = torch.ones(hidden)  # what q/k/v's input is divided by once folded
        s_gu = torch.ones(hidden)

        with torch.no_grad(), collective_guard(f"AWQ at decoder layer {i}"):
            def reducer(numel: int):
                return lambda sse: spread.losses(sse, numel)

            # 1. input_layernorm -> q, k, v, judged on the attention output.
            qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
            if config.attention_scales and all(n in linears for n in ("self_attn.q_proj", "self_attn.k_proj",
                                                                          "self_attn.v_proj")):
                def attn_block():
                    return [attn(hidden_states=x, **_attn_kwargs(kwargs))[0][:, skip:] for x in x_attn]
                ref = attn_block()
                s, alpha, loss = search_scale(spread.mean_abs(flat(x_attn), hidden), qkv, attn_block, ref, config,
                                              [g(m) for m in qkv], reducer(scored * attn.o_proj.out_features))
                _fold(layer.input_layernorm.weight, qkv, s, norm_offset)
                s_qkv = s
                info["qkv_alpha"] = alpha
            # 2. post_attention_layernorm -> gate, up, judged on the MLP output.
            gu = [mlp.gate_proj, mlp.up_proj]
            if all(n in linears for n in ("mlp.gate_proj", "mlp.up_proj")):
                ref = apply(mlp, x_mlp)
                s, alpha, loss = search_scale(spread.mean_abs(x_mlp, hidden), gu,
                                              lambda: apply(mlp, x_mlp), ref, config, [g(m) for m in gu],
                                              reducer(scored * mlp.down_proj.out_features))
                _fold(layer.post_attention_layernorm.weight, gu, s, norm_offset)
                s_gu = s
                info["gate_up_alpha"] = alpha
            # 2b. v -> o, judged on o_proj's output. o_proj's input channel (query head h, dim j) is v's output row
            # (kv head of h, j): under grouped-query attention the query heads sharing a KV head share its scales.
            if config.value_scales and "self_attn.v_proj" in linears and "self_attn.o_proj" in linears:
                o, v = attn.o_proj, attn.v_proj
                tie = KVTie(v.out_features, o.in_features, _head_dim(attn))
                ref = apply(o, x_o)
                s, alpha, loss = search_scale(spread.mean_abs(x_o, o.in_features), [o], lambda: apply(o, x_o), ref,
                                              config, [g(o)], reducer(scored * o.out_features), tie=tie)
                s_kv = tie.to_kv(s)  # (n_kv * d,)
                v.weight.data /= s_kv[:, None]  # rows of v = channels of o's input, once per KV head
                if v.bias is not None:
                    v.bias.data /= s_kv
                o.weight.data *= s[None, :]
                x_o = apply(lambda x: x / s, x_o)
                info["o_alpha"] = alpha
            # 3. up -> down, judged on down_proj's output (the input seen by down is act(gate) * up / s).
            if "mlp.down_proj" in linears and "mlp.up_proj" in linears:
                dn = mlp.down_proj
                ref = apply(dn, x_down)
                s, alpha, loss = search_scale(spread.mean_abs(x_down, inter), [dn],
                                              lambda: apply(dn, x_down), ref, config, [g(dn)],
                                              reducer(scored * dn.out_features))
                mlp.up_proj.weight.data /= s[:, None]  # rows of up = channels of down's input
                dn.weight.data *= s[None, :]
                x_down = apply(lambda x: x / s, x_down)
                info["down_alpha"] = alpha
            # 4. clipping search (across ranks: linear k's on rank k mod W, then broadcast), then RTN storage.
            x_qkv = apply(lambda x: x / s_qkv, flat(x_attn))
            x_gu = apply(lambda x: x / s_gu, x_mlp)
            xs = {"self_attn.v_proj": x_qkv, "self_attn.o_proj": x_o, "mlp.gate_proj": x_gu,
                  "mlp.up_proj": x_gu, "mlp.down_proj": x_down}
            gen = torch.Generator().manual_seed(i)
            world, rank = world_rank()
            for k, (n, m) in enumerate(linears.items()):
                w = m.weight.detach().float()
                if config.clips and n not in NO_CLIP:
                    x = spread.sample_rows(xs[n], gen, config.clip_tokens, m.in_features)
                    if k % world == rank:
                        w = search_clip(w, x, config, g(m))
                    w = broadcast_from(w.contiguous(), k % world)  # a no-op in one process
                m.weight.data = w
                if config.rounding == "rtn":
                    layer.set_submodule(n, _store(m, config, g(m)))
                    report.layers[f"{prefix}.{i}.{n}"] = layer.get_submodule(n).spec()
        info["seconds"] = time.perf_counter() - t0
        stats[f"{prefix}.{i}"] = info

    if config.rounding == "rtn":
        return process
    # rounding="gptq": the layer stays float after scaling and clipping; GPTQ then collects Hessians
    # of its (now scaled) inputs in one more pass and rounds with error compensation.
    # rounding="gptaq": the same with GPTAQ's asymmetric calibration; the float stream it matches runs through
    # each layer as AWQ leaves it (the scaling is exact, so without clipping that is the fp32 model's stream).
    if config.rounding == "gptaq":
        if ranks_active():
            raise ConfigError(f"{config.scheme}: GPTAQ runs in one process only, not across torchrun ranks")
        gptq_step = make_gptq_process(config.gptq_config(), prefix, report, stats)

        def scale_then_gptaq(i: int, layer: nn.Module, inputs: list, kwargs: dict, fp_inputs: list) -> None:
            process(i, layer, inputs, kwargs)
            gptq_step(i, layer, inputs, kwargs, fp_inputs)

        scale_then_gptaq.float_stream = True
        return scale_then_gptaq
    if not ranks_active():
        gptq_step = make_gptq_process(config.gptq_config(), prefix, report, stats)
    else:
        from lowbit.algorithms._llm import LLAMA_INPUT_GROUPS
        from lowbit.algorithms.gptq_ranks import make_gptq_ranks_process

        gptq_step = make_gptq_ranks_process(config.gptq_config(), prefix, report, stats, n_batches,
                                            LLAMA_INPUT_GROUPS)

    def scale_then_gptq(i: int, layer: nn.Module, inputs: list, kwargs: dict) -> None:
        process(i, layer, inputs, kwargs)
        gptq_step(i, layer, inputs, kwargs)

    return scale_then_gptq


def _attn_kwargs(kwargs: dict) -> dict:
    return {k: kwargs[k] for k in ("position_embeddings", "attention_mask", "position_ids") if k in kwargs}


def _fold(norm_weight: torch.Tensor, linears: list[nn.Linear], s: torch.Tensor, offset: float = 0.0) -> None:
    """``(offset + norm.weight) /= s`` and ``W[:, j] *= s_j`` for every consumer: the product is unchanged."""
    norm_weight.data = (offset + norm_weight.data) / s - offset
    for m in linears:
        m.weight.data *= s[None, :]


def _hqq_config(config: AWQConfig, group_size: int) -> HQQConfig:
    """The HQQ / SINQ settings of ``config.final_rounding``: the ``hqq`` / ``sinq`` schemes' (hqq_linear stores)."""
    sinq = config.final_rounding == "sinq"
    return HQQConfig(bits=config.bits, group_size=group_size, symmetric=config.symmetric, kernel=config.kernel,
                     **(dict(iters=0, sinkhorn=True) if sinq else {}))


def _store(m: nn.Linear, config: AWQConfig, group_size: int) -> nn.Module:
    if config.gguf:  # ggml's codes and fp16 d (and m): WeightOnlyQLinear, or BlockMinQLinear for q4_1
        return linear_on_ggml_grid(m, config.gguf, config.kernel)
    if config.final_rounding:
        return hqq_linear(m, _hqq_config(config, group_size), group_size)[0]
    if config.double_quant:
        return DoubleQuantQLinear.from_float(m, config.bits, group_size, config.symmetric, config.fmt, config.kernel)
    return WeightOnlyQLinear.from_float(m, config.bits, group_size, config.symmetric, config.fmt, config.kernel)


@register_handler(AWQConfig)
def _quantize_awq(model: nn.Module, config: AWQConfig, calibration_data=None) -> QuantizeReport:
    # By default only the windows the scale search (and GPTQ) use: more would run through every layer for nothing.
    batches, source = lm_calibration(model, calibration_data, config.calibration_windows())
    if config.rounding != "rtn":
        check_enough_tokens(batches, widest_input(model), batches[0].shape[-1])
    offset = require_llama_layout(model, config.scheme)
    prefix = layer_prefix(model)
    report = QuantizeReport()
    stats: dict = {}
    t0 = time.perf_counter()
    # One process is world size 1 of the same path (every ranks helper is the identity without a process
    # group): per-window statistics summed in window order, so 1 process and N ranks are bit-identical.
    require_batches(len(batches), "AWQ")
    process = make_awq_process(config, prefix, report, stats, offset, n_batches=len(batches))
    process_layerwise(model, shard(batches), process, desc=config.scheme)
    report.extra["awq"] = {"seconds": time.perf_counter() - t0, "n_tokens": n_tokens(batches), "layers": stats,
                           "world_size": world_rank()[0]}
    model.lowbit_calibration = with_world_size(calibration_info(batches, source))
    return report


def _awq_options(options: dict, symmetric: bool) -> AWQConfig:
    """The AWQ family's options: ``--gguf`` (llama.cpp's grid: blocks of 32, bits and symmetry follow the type), or
    bits / group size / grid, ``symmetric`` the family member's default grid."""
    if options.get("gguf"):
        gguf = options["gguf"]
        if gguf not in GGUF_FIELDS:
            raise ConfigError(f"awq gguf must be one of {', '.join(GGML_TYPES)}, got {gguf!r}")
        bits, group, sym = GGUF_FIELDS[gguf]
        return AWQConfig(bits=bits, group_size=group, symmetric=sym, gguf=gguf, kernel=options.get("kernel", "auto"))
    return AWQConfig(bits=int(options.get("bits", 4)), group_size=int(options.get("group_size", 128)),
                     symmetric=option_bool(options.get("symmetric", symmetric)), kernel=options.get("kernel", "auto"))


@register_scheme("awq", "AWQ weight-only: activation-aware channel scales folded into the norms + clipping "
                 "search, decoder layers one at a time: --bits --group-size --symmetric/--affine (affine by default, "
                 "as AutoAWQ); --gguf q4_0|q4_1|q8_0 fits llama.cpp's grid; causal LMs only",
                 options=("bits", "group_size", "symmetric", "kernel", "gguf"), models=("smollm2",))
def _awq_scheme(options: dict) -> AWQConfig:
    # affine by default (stop 33): SmolLM2 W4 g128 held-out calibration KL 0.278 affine vs 0.382 symmetric (Zen 5;
    # 0.2835 vs 0.4070 on stop 41's AVX2 CPU)
    # (bench/results/w4_heldout.md); on the three texts affine AWQ is below symmetric AWQ's perplexity on every one
    # (bench/results/hqq_full.md). AWQConfig itself keeps symmetric=True, the issue-18 tables' grid.
    return _awq_options(options, symmetric=False)


@register_scheme("awq-gptq", "AWQ's channel scales and clipping, then GPTQ's error-compensating rounding of the "
                 "transformed layer: --bits --group-size --symmetric/--affine; --gguf q4_0 fits llama.cpp's Q4_0 "
                 "grid; causal LMs only",
                 options=("bits", "group_size", "symmetric", "kernel", "gguf", "attention_hessian", "residual_weights",
                          "attention_scales"),
                 models=("smollm2",))
def _awq_gptq_scheme(options: dict) -> AWQConfig:
    # the residual weights stay off here: held-out calibration KL 0.253 -> 0.260 with them (docs/llm.md)
    return dataclasses.replace(_awq_options(options, symmetric=True), rounding="gptq",
                               attention_hessian=scheme_attention_hessian(options),
                               residual_weights=scheme_residual_weights(options, default=False),
                               attention_scales=option_bool(options.get("attention_scales", True)))


@register_scheme("awq-hqq", "AWQ's channel scales and clipping search with HQQ's rounding (fp16 scales and zero-points "
                 "fitted to the weights) instead of RTN's: --bits --group-size --symmetric/--affine (affine by "
                 "default: HQQ's own setting); causal LMs only",
                 options=("bits", "group_size", "symmetric", "kernel"), models=("smollm2",))
def _awq_hqq_scheme(options: dict) -> AWQConfig:
    # bench/results/w4_heldout.md (SmolLM2 W4 g128, held-out calibration KL): affine AWQ 0.278, AWQ+HQQ 0.210 (0.252
    # without the clipping search); symmetric AWQ+HQQ 0.505, above plain AWQ's (HQQ can only move the scale there)
    config = dataclasses.replace(_awq_options(options, symmetric=False), init="hqq")
    if config.symmetric:
        log.warning("awq-hqq with a symmetric grid: HQQ can only fit the scale there, which measured worse than AWQ's "
                    "own rounding; `--scheme awq --symmetric` (or awq-hqq --affine) is the better choice")
    return config


@register_scheme("awq-gptaq", "AWQ's channel scales (no clipping), then GPTAQ's rounding of the transformed layer "
                 "(each linear matches the fp32 model's outputs from the quantized model's inputs) with MSE-searched "
                 "group scales: --bits --group-size --symmetric/--affine; one process; causal LMs only",
                 options=("bits", "group_size", "symmetric", "kernel", "attention_hessian", "residual_weights",
                          "attention_scales"),
                 models=("smollm2",))
def _awq_gptaq_scheme(options: dict) -> AWQConfig:
    # init "mse": held-out calibration KL 0.195 vs 0.208 with min-max (SmolLM2 W4 g128, bench/results/w4_heldout.md);
    # the residual weights: 0.190 -> 0.187 (docs/llm.md)
    return dataclasses.replace(_awq_options(options, symmetric=True), rounding="gptaq", init="mse",
                               attention_hessian=scheme_attention_hessian(options),
                               residual_weights=scheme_residual_weights(options),
                               attention_scales=option_bool(options.get("attention_scales", True)))
