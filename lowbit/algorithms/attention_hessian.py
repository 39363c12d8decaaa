"""Attention-mixed inputs for the value projection's GPTQ Hessian (BoA's attention-aware Hessian, Kim et al. 2025,
arXiv 2406.13474, for the value projection).

A value projection's error reaches the model only through the attention that mixes it. Head ``h``'s output at
query ``i`` is ``o_hi = sum_j a_hij W_h x_j`` (``W_h`` the head's rows of ``W_v``, ``x_j`` the v_proj inputs), so a
weight error ``dW`` changes it by ``dW_h z_hi`` with ``z_hi = sum_j a_hij x_j``, the attention-weighted mix of the
inputs. GPTQ's loss for v_proj is therefore ``sum_h,i ||dW_h z_hi||^2``: the Hessian of the *mixed* inputs ``z``,
not of ``x``. One Hessian serves every row: each query head's ``z`` is added for all heads' rows (on SmolLM2 this
scored as one Hessian per KV head did). Plain GPTQ weighs the attention sink (the first token, which almost every
query attends to and whose value vector therefore reaches every output) as 1 of 512 tokens; ``z`` weighs it by
the attention the other tokens give it.

The attention probabilities come from a probe registered with transformers' ``AttentionInterface``: while
:func:`mixed_value_inputs` is active, the layer's attention dispatches to the probe, which runs the model's own
implementation (so the layer's outputs are unchanged) and recomputes ``softmax(q k^T * scaling + mask)`` when that
implementation returns no probabilities (sdpa). Attention modules that do not dispatch through the interface give
plain inputs, with a warning; layers without a ``v_proj`` (fused projections) keep GPTQ's plain Hessian.
"""

from __future__ import annotations

import logging
import math
import sys
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

log = logging.getLogger(__name__)

PROBE = "lowbit_attention_probe"
_RECORDERS: dict[int, Callable[[torch.Tensor], None]] = {}  # id(attention module) -> probabilities callback
_ORIGINAL: dict[int, str] = {}  # id(config) -> the implementation the probe stands in for


def attention_probs(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None,
                    scaling: float | None) -> torch.Tensor:
    """``softmax(q k^T * scaling + mask)`` in fp32: (B, H, Tq, Tk) from ``query`` (B, H, Tq, d) and ``key``
    (B, Hkv, Tk, d) (grouped-query: each KV head serves ``H / Hkv`` query heads). ``mask``: None (causal; the
    last ``Tq`` of ``Tk`` positions query), boolean (True = attend) or additive."""
    H, Hkv = query.shape[1], key.shape[1]
    key = key.repeat_interleave(H // Hkv, dim=1)  # (B, H, Tk, d)
    scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    scores = (query.float() @ key.float().transpose(-1, -2)) * scale  # (B, H, Tq, Tk)
    tq, tk = scores.shape[-2:]
    if mask is None:
        future = torch.ones(tq, tk, dtype=torch.bool, device=scores.device).triu(tk - tq + 1)  # (Tq, Tk)
        scores = scores.masked_fill(future, float("-inf"))
    elif mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask[..., :tk], float("-inf"))
    else:
        scores = scores + mask[..., :tk].float()
    return torch.softmax(scores, dim=-1)


def _additive(mask: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """``mask`` as the additive (B or 1, 1, Tq, Tk) mask eager attention adds: None means causal."""
    tq, tk = query.shape[-2], key.shape[-2]
    if mask is None:
        mask = torch.ones(tq, tk, dtype=torch.bool, device=query.device).tril(tk - tq)[None, None]
    if mask.dtype != torch.bool:
        return mask
    low = torch.finfo(query.dtype).min
    return torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(~mask, low)


def _probe(module: nn.Module, query, key, value, attention_mask, *args, **kwargs):
    """The attention function the probe registers: the model's own implementation, recording the probabilities."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    original = _ORIGINAL.get(id(module.config), "sdpa")
    if original in ALL_ATTENTION_FUNCTIONS:
        out = ALL_ATTENTION_FUNCTIONS[original](module, query, key, value, attention_mask, *args, **kwargs)
    else:  # "eager": the family's own eager function, which also returns the probabilities; it adds the mask, and
        # the mask the model built for the probe's name may be boolean or None (causal)
        eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward")
        out = eager(module, query, key, value, _additive(attention_mask, query, key), *args, **kwargs)
    record = _RECORDERS.get(id(module))
    if record is not None:
        probs = out[1] if isinstance(out, tuple) and len(out) > 1 and out[1] is not None else attention_probs(
            query, key, attention_mask, kwargs.get("scaling"))
        record(probs.detach())
    return out


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if PROBE not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(PROBE, _probe)


def value_projection(attn: nn.Module) -> nn.Module | None:
    """The attention module's value projection (``v_proj``), or None (fused projections, no config)."""
    v = getattr(attn, "v_proj", None)
    return v if isinstance(v, nn.Module) and hasattr(attn, "config") else None


def mixed_value_linear(layer: nn.Module, linears: dict[str, nn.Module], owner: dict[str, str],
                       enabled: bool) -> tuple[nn.Module | None, str | None]:
    """The decoder layer's attention module and the name (a key of ``linears``) of its v_proj when ``enabled`` and
    selected, else ``(attn, None)``; that v_proj becomes the owner of its own Hessian in ``owner`` (in place)."""
    attn = getattr(layer, "self_attn", None)
    v = value_projection(attn) if enabled and attn is not None else None
    name = next((n for n, m in linears.items() if m is v), None) if v is not None else None
    if name is not None:
        owner[name] = name
    return attn, name


@contextmanager
def mixed_value_inputs(attn: nn.Module, fn: Callable[[torch.Tensor], None],
                       transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Iterator[None]:
    """While active, each forward of the attention module ``attn`` calls ``fn(z)`` with ``z`` (B * H * T, K): its
    v_proj's inputs mixed by each head's attention probabilities, ``z[b, h, i] = sum_j a[b, h, i, j] x[b, j]``
    (module docstring). ``transform(x)`` is applied to the inputs first (the run-time activation grid of a W/A
    preset). Where the attention yields no probabilities, ``fn`` gets the plain inputs (B * T, K) and a warning."""
    v = value_projection(attn)
    if v is None:
        raise ValueError(f"{type(attn).__name__} has no v_proj / config: no attention-mixed inputs")
    _register()
    pending: list[torch.Tensor] = []
    warned: list[bool] = []

    def flush_plain() -> None:
        while pending:
            x = pending.pop()
            if not warned:
                warned.append(True)
                log.warning("%s: no attention probabilities reached the probe (the module does not dispatch through "
                            "transformers' AttentionInterface); its v_proj gets the plain Hessian",
                            type(attn).__name__)
            fn(x.reshape(-1, x.shape[-1]))

    def take_input(module, args):
        flush_plain()
        x = args[0].detach()
        pending.append(transform(x) if transform is not None else x)

    def take_probs(probs: torch.Tensor) -> None:
        if not pending:
            return
        x = pending.pop().float()  # (B, Tk, K)
        z = probs.float() @ x[:, None]  # (B, H, Tq, Tk) @ (B, 1, Tk, K) -> (B, H, Tq, K)
        fn(z.reshape(-1, z.shape[-1]))  # (B * H * Tq, K)

    config = attn.config
    original = config._attn_implementation
    hook = v.register_forward_pre_hook(take_input)
    _RECORDERS[id(attn)] = take_probs
    _ORIGINAL[id(config)] = original
    config._attn_implementation = PROBE
    try:
        yield
        flush_plain()
    finally:
        config._attn_implementation = original
        _RECORDERS.pop(id(attn), None)
        _ORIGINAL.pop(id(config), None)
        hook.remove()


__all__ = ["attention_probs", "mixed_value_inputs", "mixed_value_linear", "value_projection"]
