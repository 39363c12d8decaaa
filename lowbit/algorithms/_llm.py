"""What every LLM method shares: finding the decoder layers of a Llama-style model, the linears of a
layer, the group-size policy, and the calibration batches with their hygiene checks.

Group-size policy: a group of ``g`` input columns needs ``g | in_features``. SmolLM2's hidden size
is 576 = 4.5 x 128, so "g128" cannot cover the 576-wide q/k/v/o/gate/up inputs; they fall back to
the largest kernel-friendly divisor not above ``g`` (64), and the 1536-wide down_proj keeps 128.
Every table that says "g128" for SmolLM2 means this mix (see :func:`effective_group_size`).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from lowbit.errors import CalibrationError, ConfigError
from lowbit.models import adapters
from lowbit.models.adapters import LLAMA_GROUPS

log = logging.getLogger(__name__)

GROUP_FALLBACKS = (256, 128, 64, 32, 16, 8)  # tried in order, largest first, when g does not divide K
OVERLAP_WARN = 0.01  # warn when more than 1% of the calibration 8-grams occur in the evaluation text

# Linears of a Llama decoder layer, by the input they share (one Hessian / one smoothing factor each).
LLAMA_INPUT_GROUPS = tuple(names for names, _ in LLAMA_GROUPS)
LLAMA_GROUP_NORMS = tuple(norm for _, norm in LLAMA_GROUPS)
LLM_METHODS = "the LLM methods (gptq, awq, smoothquant)"


def effective_group_size(in_features: int, group_size: int) -> int:
    """``group_size`` if it divides ``in_features``, else the largest of :data:`GROUP_FALLBACKS` below
    it that does; 0 (per channel) stays 0."""
    if group_size <= 0 or in_features % group_size == 0:
        return max(group_size, 0)
    for g in GROUP_FALLBACKS:
        if g < group_size and in_features % g == 0:
            return g
    raise ConfigError(f"no group size <= {group_size} divides in_features={in_features}; use --group-size 0")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ``ModuleList`` of decoder layers of a causal LM (``CausalLM`` or a bare HF model), found
    through its family's row in :mod:`lowbit.models.adapters`."""
    return adapters.decoder_layers(model, LLM_METHODS)


def input_groups(model: nn.Module) -> tuple[tuple[str, ...], ...]:
    """Names (inside a decoder layer) of the linears grouped by the input they share."""
    return tuple(names for names, _ in adapters.adapter_for(model, LLM_METHODS).input_groups)


def group_norms(model: nn.Module) -> tuple[str | None, ...]:
    """For each of :func:`input_groups`' groups, the name of the norm module feeding it (None: a residual writer's
    group, which reads another linear's output)."""
    return tuple(norm for _, norm in adapters.adapter_for(model, LLM_METHODS).input_groups)


def require_llama_layout(model: nn.Module, method: str) -> float:
    """Check the model's blocks have Llama's layout (norm -> q/k/v, norm -> gate/up -> down), which
    ``method`` folds scales into; returns the norm offset of the family (1.0 for Gemma's ``1 + w``)."""
    row = adapters.adapter_for(model, method)
    if row.input_groups != LLAMA_GROUPS:
        llama_like = sorted(f for f, r in adapters.ADAPTERS.items() if r.input_groups == LLAMA_GROUPS)
        raise ConfigError(f"{method} folds scales into Llama-layout blocks (input_layernorm -> q/k/v_proj, "
                          f"post_attention_layernorm -> gate/up_proj -> down_proj): families "
                          f"{', '.join(llama_like)}; {row.family!r} is laid out differently. Use gptq or rtn.")
    return row.norm_offset


def layer_prefix(model: nn.Module) -> str:
    """Dotted name of the layers list inside ``model`` (e.g. ``lm.model.layers``)."""
    layers = decoder_layers(model)
    for name, mod in model.named_modules():
        if mod is layers:
            return name
    raise ConfigError("decoder layers not found among the model's modules")


def layer_linears(layer: nn.Module) -> dict[str, nn.Linear]:
    """The float ``nn.Linear`` modules of one decoder layer, by their name inside the layer."""
    return {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}


def lm_calibration(model: nn.Module, calibration_data, n: int | None = None) -> tuple[list[torch.Tensor], str]:
    """Calibration batches (token ids (1, T) each) and their source; checks overlap with the eval text."""
    from lowbit.algorithms._calib import default_calibration
    from lowbit.data import lm_calib_default

    adapters.require_causal_lm(model, "GPTQ, AWQ, SmoothQuant and the RTN guard calibrate on token windows")
    if calibration_data is None:
        batches = default_calibration(model, n)
        source = f"lowbit.data.lm_calib_text('{lm_calib_default()}') ({getattr(model, 'model_name', 'model')})"
    else:
        batches, source = list(calibration_data), "user"
    batches = [b if isinstance(b, torch.Tensor) else torch.as_tensor(b) for b in batches]
    if not batches:
        raise CalibrationError("calibration data is empty: give at least one batch of token ids")
    for b in batches:
        if b.is_floating_point() or b.dim() not in (1, 2):
            raise CalibrationError(f"LM calibration batches must be token ids (B, T), got {tuple(b.shape)} {b.dtype}")
    batches = [b[None] if b.dim() == 1 else b for b in batches]
    warn_if_overlaps_eval(model, batches)
    return batches, source


def warn_if_overlaps_eval(model: nn.Module, batches: list[torch.Tensor]) -> float | None:
    """Largest fraction of calibration word 8-grams found in one LM evaluation text (licence,
    held-out docs, science); a warning above 1%."""
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        return None
    import lowbit.data
    from lowbit.data import overlap

    text = [tok.decode(b.reshape(-1).tolist()) for b in batches]
    worst, name = 0.0, None
    for fn in ("lm_eval_text", "lm_heldout_text", "lm_science_text"):
        frac = overlap(text, getattr(lowbit.data, fn)())
        if frac > worst:
            worst, name = frac, fn
    if worst > OVERLAP_WARN:
        log.warning("calibration text overlaps the evaluation text: %.1f%% of its 8-grams appear in "
                    "%s(); perplexity will look better than it is", 100 * worst, name)
    return worst


def widest_input(model: nn.Module) -> int:
    """The largest ``in_features`` among the decoder layers' linears (works on a ``meta`` skeleton too)."""
    return max(m.in_features for layer in decoder_layers(model) for m in layer_linears(layer).values())


def n_tokens(batches: list[torch.Tensor]) -> int:
    return int(sum(b.numel() for b in batches))
