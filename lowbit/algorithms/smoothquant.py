"""SmoothQuant for LLMs (Xiao et al. 2023) and the weight/activation presets built on it.

Activations of LLMs have a few outlier channels that ruin per-token int8; SmoothQuant divides
channel ``j`` of the activation by ``s_j = a_j^alpha / w_j^(1-alpha)`` (``smoothing.py``) and
multiplies the weights' input column ``j`` by it. On a Llama decoder (pre-norm) the division is
folded away exactly, so smoothing costs nothing at run time:

- q/k/v read ``RMSNorm(x) = g * x_hat``: ``g /= s`` (one ``s`` for the three, from their stacked weights);
- gate/up read the post-attention RMSNorm: same fold;
- down_proj reads ``silu(gate) * up``: the rows of up_proj are divided by ``s`` (elementwise product);
- o_proj reads the attention output; with grouped-query attention v_proj has fewer rows than o_proj
  has inputs, so its ``1 / s`` stays in the module (``smooth_inv``, one multiply per input).

The residual stream itself is never rescaled. Then every decoder linear gets integer weights and
per-token integer activations: ``DynamicQLinear`` for W8A8 (the ``smoothquant`` scheme), otherwise
``WAQLinear`` with b-bit group-wise weights from RTN or GPTQ (the presets in ``presets.py``).
Non-Llama models (MiniLM) get the same recipe with every smoothing factor kept in the module.

Across ``torch.distributed`` ranks (``torchrun ... -m lowbit quantize --scheme smoothquant``): the
activation maxima come from each rank's share of the batches, all-reduced with ``max`` (exact,
``smoothing.py``); the GPTQ weight step of the W/A presets runs as ``gptq_ranks.py`` (windows
sharded, Hessians summed in window order, solves split); RTN weights are computed on every rank.
1 and W ranks give bit-identical modules; rank 0 alone writes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import nn

from lowbit.algorithms._calib import calibration_info, default_calibration
from lowbit.algorithms._llm import (decoder_layers, effective_group_size, layer_prefix, lm_calibration,
                                   require_llama_layout)
from lowbit.models.adapters import fold_scale_into_norm
from lowbit.algorithms._swap import Skip, swap_modules
from lowbit.algorithms.ranks import ranks_active, shard, with_world_size
from lowbit.algorithms.scale_tuning import DEFAULT_TUNE_LR, check_tuning_fields, finish_tuning, start_tuning
from lowbit.algorithms.smoothing import input_absmax, smoothing_factors
from lowbit.api import QuantizeReport, register_handler, select_modules
from lowbit.config import BaseConfig, register_config, register_scheme
from lowbit.errors import ConfigError
from lowbit.nn import DynamicQLinear
from lowbit.nn.wa_linear import ACT_BITS, WEIGHT_BITS, WAQLinear, fake_quantize_activations

log = logging.getLogger(__name__)

DEFAULT_ALPHA = 0.5  # the paper's default migration strength for most LLMs (used by the W/A presets)
# The `smoothquant` scheme's default: on SmolLM2 W8A8, alpha 0.5/0.6/0.7/0.8 gave +2.18/+0.31/+1.55/+1.95% ppl
# (bench/smoothquant_alpha.py, 2 eval windows: chosen on evaluation text, so it flatters the result).
SCHEME_ALPHA = 0.6
# auto = on Llama-layout causal LMs GPTAQ with the activation grid in the loop when rotated (lower KL on held-out
# calibration windows than GPTQ, SmolLM2 W4A4-rot 0.521 vs 0.640, W4A8-rot 0.171 vs 0.232: docs/rotation.md),
# GPTQ otherwise (one process or torchrun ranks); RTN on other models
WEIGHT_METHODS = ("rtn", "gptq", "gptaq", "auto")
ACT_CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)  # act_clip_search's candidates (act_clip joins them)
# WEIGHT_INIT_NOTE: with GPTAQ the group scales default to GPTQ's MSE search (held-out calibration KL, SmolLM2
# rotated, 16 windows: W4A4 0.521 -> 0.502, W4A8 0.171 -> 0.150; bench/results/wa_gptaq_heldout.log)


@register_config("wa")
@dataclass(frozen=True)
class WAConfig(BaseConfig):
    """Weights ``weight_bits`` (per group / channel) x activations ``act_bits`` per token, SmoothQuant first."""

    weight_bits: int = 8
    act_bits: int = 8
    group_size: int = 0  # 0 = per output channel
    symmetric: bool = True
    alpha: float | None = DEFAULT_ALPHA  # None = no smoothing
    weight_method: str = "rtn"
    n_calib: int | None = None  # None: 16 windows when GPTQ / GPTAQ quantize the weights (their default), else 8
    name: str | None = None  # the preset's name, for tables and metadata
    kernel: str = "auto"
    rotate: bool = False  # QuaRot Hadamard rotations folded in first (lowbit.algorithms.rotation); replaces smoothing
    rotate_seed: int = 0  # seed of the residual rotation's random sign diagonal
    act_clip: float = 1.0  # per-token activation grid over act_clip * max|x| (QuaRot clips A4 at 0.9)
    act_per_group: bool = False  # one activation grid per token and weight group (QuaRot-128G) instead of per token
    act_symmetric: bool = True  # False: affine per-token activation grids (zero-point corrected in int32)
    weight_init: str | None = None  # GPTQ / GPTAQ group scales (GPTQConfig.init); None: "mse" with GPTAQ, else "minmax"
    act_clip_search: bool | None = None  # GPTAQ: each input's act_clip from ACT_CLIP_GRID + act_clip, min
    # ||(Q_c(x) - x) W^T||; None = on with GPTAQ (held-out calibration KL W4A4-rot 0.502 -> 0.488; A8 keeps 1.0)
    tune_windows: int = 0  # > 0: then tune the weight scales end to end on that many windows (scale_tuning.py)
    tune_lr: float = DEFAULT_TUNE_LR
    tune_epochs: int = 1  # passes over the tuning windows
    tune_bf16: bool = False  # the tuning's forward / backward under bf16 autocast (~1.6x faster on CPUs with bf16)
    # GPTQ / GPTAQ weights (LLMs): v_proj's Hessian of attention-mixed inputs, and the residual writers' tokens weighted
    # by 1 / ms(residual after their add) (GPTQConfig.attention_hessian / residual_weights; off: the presets' results)
    attention_hessian: bool = False
    residual_weights: bool = False

    def __post_init__(self):
        check_tuning_fields(self.tune_windows, self.tune_lr, tune_epochs=self.tune_epochs)
        if self.tune_windows and (self.weight_bits, self.act_bits, self.group_size) == (8, 8, 0) and self.symmetric:
            raise ConfigError("W8A8 per channel runs DynamicQLinear (its int8 weights have no group scales): "
                              "tune_windows tunes the W4A8 / W4A4 / W2A8 presets' WAQLinear scales")
        if self.weight_bits not in WEIGHT_BITS or self.act_bits not in ACT_BITS:
            raise ConfigError(f"weight bits must be in {WEIGHT_BITS} and activation bits in {ACT_BITS}, "
                              f"got W{self.weight_bits}A{self.act_bits}")
        if self.alpha is not None and not 0 <= self.alpha <= 1:
            raise ConfigError(f"alpha must be in [0, 1] or None, got {self.alpha}")
        if self.weight_method not in WEIGHT_METHODS:
            raise ConfigError(f"weight_method must be one of {WEIGHT_METHODS}, got {self.weight_method!r}")
        if self.group_size < 0:
            raise ConfigError(f"group_size must be >= 0, got {self.group_size}")
        if not 0 < self.act_clip <= 1:
            raise ConfigError(f"act_clip must be in (0, 1], got {self.act_clip}")
        if self.weight_init not in (None, "minmax", "mse"):
            raise ConfigError(f"weight_init must be None, 'minmax' or 'mse', got {self.weight_init!r}")
        if self.act_clip_search and self.weight_method not in ("gptaq", "auto"):
            raise ConfigError("act_clip_search runs inside GPTAQ's activation-aware pass: weight_method 'gptaq' "
                              "or 'auto'")
        if (self.attention_hessian or self.residual_weights) and (self.weight_method == "rtn"
                                                                  or _is_w8a8(self, self.group_size)):
            raise ConfigError("attention_hessian / residual_weights shape GPTQ's Hessians, and this config has no GPTQ "
                              "step: they need weight_method 'gptq', 'gptaq' or 'auto', not 'rtn', and weights other "
                              "than W8A8's int8 per channel (rounded)")
        if self.rotate and self.alpha is not None:
            raise ConfigError("rotate replaces SmoothQuant (the rotation spreads the outlier channels that smoothing "
                              "migrates); pass alpha=None with rotate=True")

    @property
    def scheme(self) -> str:
        if self.name:
            return self.name
        gran = f"g{self.group_size}" if self.group_size else "pc"
        return (f"w{self.weight_bits}a{self.act_bits}-{gran}{'-sq' if self.alpha is not None else ''}"
                f"{'-rot' if self.rotate else ''}{'-ag' if self.act_per_group else ''}"
                f"{'-aa' if not self.act_symmetric else ''}{'-tuned' if self.tune_windows else ''}"
                f"{'-attnh' if self.attention_hessian else ''}{'-resw' if self.residual_weights else ''}")


def _is_w8a8(config: WAConfig, g: int) -> bool:
    return config.weight_bits == 8 and config.act_bits == 8 and g == 0 and config.symmetric


# ------------------------------------------------------------------------------- Llama path


def fold_llama_smoothing(model: nn.Module, batches: list, alpha: float) -> dict[str, torch.Tensor]:
    """Fold SmoothQuant factors into RMSNorms / up_proj; returns the o_proj factors to keep in modules."""
    offset = require_llama_layout(model, "smoothquant")
    prefix = layer_prefix(model)
    layers = decoder_layers(model)
    watch = {}
    for i, layer in enumerate(layers):
        watch[f"{prefix}.{i}.self_attn.q_proj"] = layer.self_attn.q_proj
        watch[f"{prefix}.{i}.self_attn.o_proj"] = layer.self_attn.o_proj
        watch[f"{prefix}.{i}.mlp.gate_proj"] = layer.mlp.gate_proj
        watch[f"{prefix}.{i}.mlp.down_proj"] = layer.mlp.down_proj
    stats = input_absmax(model, watch, batches)
    keep = {}
    with torch.no_grad():
        for i, layer in enumerate(layers):
            a, mlp = layer.self_attn, layer.mlp
            qkv = [a.q_proj, a.k_proj, a.v_proj]
            s = smoothing_factors(stats[f"{prefix}.{i}.self_attn.q_proj"], torch.cat([m.weight for m in qkv]), alpha)
            fold_scale_into_norm(layer.input_layernorm, s, offset)
            for m in qkv:
                m.weight *= s
            gu = [mlp.gate_proj, mlp.up_proj]
            s = smoothing_factors(stats[f"{prefix}.{i}.mlp.gate_proj"], torch.cat([m.weight for m in gu]), alpha)
            fold_scale_into_norm(layer.post_attention_layernorm, s, offset)
            for m in gu:
                m.weight *= s
            s = smoothing_factors(stats[f"{prefix}.{i}.mlp.down_proj"], mlp.down_proj.weight, alpha)
            mlp.up_proj.weight /= s[:, None]
            mlp.down_proj.weight *= s
            keep[f"{prefix}.{i}.self_attn.o_proj"] = smoothing_factors(
                stats[f"{prefix}.{i}.self_attn.o_proj"], a.o_proj.weight, alpha)
    return keep


def search_act_clip(x: torch.Tensor, weight: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                    default: float) -> float:
    """The activation clip ``c`` of ``ACT_CLIP_GRID`` (and ``default``) minimising the output error of the
    activation rounding, ``||(Q_c(x) - x) W^T||^2`` over the tokens of ``x`` (T, K) (W (N, K)); ties keep
    the larger ``c``. MSE-optimal clipping (as the MSE observers), weighted by the layer's weights."""
    x = x.reshape(-1, x.shape[-1]).float()  # (T, K)
    w = weight.detach().float()
    best, best_err = None, None
    for c in sorted(set(ACT_CLIP_GRID) | {default}, reverse=True):
        err = float(((fake_quantize_activations(x, bits, c, group_size, symmetric) - x) @ w.T).pow(2).sum())
        if best_err is None or err < best_err:
            best, best_err = c, err
    return best


def _quantize_llama(model: nn.Module, config: WAConfig, calibration_data) -> QuantizeReport:
    if config.tune_windows and ranks_active():
        raise ConfigError("tune_windows runs in one process (not across torchrun ranks)")
    if config.tune_windows and calibration_data is not None:
        calibration_data = list(calibration_data)  # read twice: tuning windows, then the method's
    tuning = start_tuning(model, calibration_data, config.tune_windows)  # fp32 targets, before any change
    method = config.weight_method
    if method == "auto":
        method = "gptaq" if config.rotate and not ranks_active() else "gptq"
    gptq_step = method in ("gptq", "gptaq") and not (config.weight_bits == 8 and config.group_size == 0)
    from lowbit.algorithms.gptq import DEFAULT_CALIB_WINDOWS

    # the GPTQ step takes GPTQ's own default (16 windows: the size its benches and defaults were measured at)
    batches, source = lm_calibration(model, calibration_data,
                                     config.n_calib or (DEFAULT_CALIB_WINDOWS if gptq_step else None))
    report = QuantizeReport()
    if config.rotate:  # QuaRot: Hadamard rotations folded into the float weights before any quantization
        from lowbit.algorithms.rotation import rotate_model, rotation_specs

        report.extra["rotation"] = rotate_model(model, config.rotate_seed)
        report.layers.update(rotation_specs(model))  # recorded before their linears: load rebuilds them first
    keep = fold_llama_smoothing(model, batches, config.alpha) if config.alpha is not None else {}
    weight_init = None
    clips: dict[str, float] = {}  # act_clip_search: full name of each input's owner linear -> its activation clip
    t0 = time.perf_counter()
    if gptq_step:
        from lowbit.algorithms.gptq import GPTQConfig, check_enough_tokens, make_gptq_process
        from lowbit.algorithms.sequential import process_layerwise

        from lowbit.algorithms._llm import group_norms, input_groups, widest_input

        check_enough_tokens(batches, widest_input(model), batches[0].shape[-1])
        weight_init = config.weight_init or ("mse" if method == "gptaq" else "minmax")  # see WEIGHT_INIT_NOTE
        if ranks_active() and weight_init != "minmax":
            raise ConfigError(f"weight_init={weight_init!r} runs in one process (not across torchrun ranks)")
        gcfg = GPTQConfig(bits=config.weight_bits, group_size=config.group_size, symmetric=config.symmetric,
                          include=config.include, exclude=config.exclude, asymmetric_calib=method == "gptaq",
                          init=weight_init, attention_hessian=config.attention_hessian,
                          residual_weights=config.residual_weights)

        # act_clip_search: one clip per input (the linears that share it, e.g. q/k/v, share its grid as they share
        # GPTAQ's Hessian), chosen on the layer's first calibration window against their stacked weights
        groups, lp = input_groups(model), layer_prefix(model)
        current: dict[str, float] = {}  # the layer in progress: its linears' names within the layer -> clip

        def siblings(short: str) -> tuple[str, ...]:
            return next((g for g in groups if short in g), (short,))

        def wrap(name, linear, codes, qp, g):  # o_proj: GPTQ saw unsmoothed inputs, so no smoothing there
            return WAQLinear.from_quantized(linear, codes, qp, g, config.act_bits, None, config.kernel,
                                            current.get(name, config.act_clip), config.act_per_group,
                                            config.act_symmetric)

        def act_quant(name, x):  # GPTAQ: the activations each WAQLinear will multiply (its run-time grid)
            g = effective_group_size(x.shape[-1], config.group_size) if config.act_per_group else 0
            if config.act_clip_search is not False and name not in clips:
                index, short = name[len(lp) + 1:].split(".", 1)
                members = [m for m in siblings(short)
                           if isinstance(model.get_submodule(f"{lp}.{index}.{m}"), nn.Linear)]
                weight = torch.cat([model.get_submodule(f"{lp}.{index}.{m}").weight for m in members])  # (N_all, K)
                clips[name] = search_act_clip(x, weight, config.act_bits, g, config.act_symmetric, config.act_clip)
                current.update({m: clips[name] for m in members})
            return fake_quantize_activations(x, config.act_bits, clips.get(name, config.act_clip), g,
                                             config.act_symmetric)

        stats: dict = {}
        if ranks_active() and method == "gptaq":
            raise ConfigError("weight_method='gptaq' runs in one process (not across torchrun ranks); use 'gptq'")
        if ranks_active():  # sharded windows, fixed-order Hessians, solves split (gptq_ranks.py)
            from lowbit.algorithms.gptq_ranks import make_gptq_ranks_process

            process = make_gptq_ranks_process(gcfg, layer_prefix(model), report, stats, len(batches),
                                              input_groups(model), wrap, norms=group_norms(model))
            process_layerwise(model, shard(batches), process, desc=config.scheme)
        else:
            process_layerwise(model, batches, make_gptq_process(
                gcfg, layer_prefix(model), report, stats, wrap, groups=input_groups(model), norms=group_norms(model),
                act_quant=act_quant if method == "gptaq" else None), desc=config.scheme)
        report.extra["gptq"] = {"layers": stats}
    else:
        prefix = layer_prefix(model) + "."

        def convert(name: str, m: nn.Linear):
            if not name.startswith(prefix):
                raise Skip("outside the decoder layers (LM head kept in float)")
            g = effective_group_size(m.in_features, config.group_size)
            if _is_w8a8(config, g):
                return DynamicQLinear.from_float(m, config.kernel, keep.get(name))
            return WAQLinear.from_float(m, config.weight_bits, g, config.symmetric, config.act_bits,
                                        keep.get(name), config.kernel, config.act_clip, config.act_per_group,
                                        config.act_symmetric)

        swap_modules(model, config, (nn.Linear,), convert, report)
    report.extra["wa"] = {"seconds": time.perf_counter() - t0, "weight_method": method, "alpha": config.alpha,
                          "weight_init": weight_init}
    if clips:
        report.extra["wa"]["act_clips"] = dict(clips)
    model.lowbit_calibration = with_world_size(calibration_info(batches, source))
    finish_tuning(model, tuning, config.tune_lr, report, config.tune_epochs, config.tune_bf16)
    return report


# ----------------------------------------------------------------------------- generic path


def _quantize_generic(model: nn.Module, config: WAConfig, calibration_data) -> QuantizeReport:
    if config.attention_hessian or config.residual_weights:
        raise ConfigError(f"{config.scheme}: attention_hessian / residual_weights shape the GPTQ step's Hessians, and "
                          "this model is not a Llama-layout causal LM (its weights are rounded, not solved)")
    if config.tune_windows:
        raise ConfigError("tune_windows tunes a causal LM against its next-token distribution: Llama-layout "
                          "causal LMs only")
    smooth = {}
    if config.alpha is not None:
        batches = list(calibration_data) if calibration_data is not None else default_calibration(model)
        source = "user" if calibration_data is not None else f"lowbit.data default for {model.model_name}"
        layers = dict(select_modules(model, (nn.Linear,), config.include, config.exclude))
        stats = input_absmax(model, layers, batches)
        smooth = {n: smoothing_factors(stats[n], layers[n].weight, config.alpha) for n in layers if n in stats}
        model.lowbit_calibration = with_world_size(calibration_info(batches, source))

    def convert(name: str, m: nn.Linear):
        g = effective_group_size(m.in_features, config.group_size)
        if _is_w8a8(config, g):
            return DynamicQLinear.from_float(m, config.kernel, smooth.get(name))
        return WAQLinear.from_float(m, config.weight_bits, g, config.symmetric, config.act_bits, smooth.get(name),
                                    config.kernel, config.act_clip, config.act_per_group, config.act_symmetric)

    return swap_modules(model, config, (nn.Linear,), convert)


@register_handler(WAConfig)
def _quantize_wa(model: nn.Module, config: WAConfig, calibration_data=None) -> QuantizeReport:
    """Llama-layout causal LMs: factors folded into the norms; any other model: kept in the modules."""
    if getattr(model, "task", None) == "causal-lm":
        try:
            require_llama_layout(model, "rotation" if config.rotate else "smoothquant")
        except ConfigError as why:
            if config.rotate:
                raise
            log.info("%s: generic path, smoothing factors kept inside the modules (%s)", config.scheme, why)
        else:
            return _quantize_llama(model, config, calibration_data)
    if config.rotate:
        raise ConfigError(f"rotate=True folds Hadamard rotations into a Llama-layout causal LM; "
                          f"{getattr(model, 'model_name', type(model).__name__)} is not one")
    return _quantize_generic(model, config, calibration_data)


@register_scheme("smoothquant", "SmoothQuant W8A8: outlier channels migrated into the weights (folded into the "
                 "RMSNorms on Llama) then int8 weights per channel x int8 activations per token: --alpha (0.6)",
                 options=("alpha", "kernel"))
def _smoothquant_scheme(options: dict) -> WAConfig:
    alpha = options.get("alpha", SCHEME_ALPHA)
    return WAConfig(alpha=None if alpha in (None, "none") else float(alpha), kernel=options.get("kernel", "auto"),
                    name="smoothquant-w8a8")
