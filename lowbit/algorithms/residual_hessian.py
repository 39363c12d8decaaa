"""Token weights for the GPTQ Hessian of a layer's residual writers (o_proj, down_proj): each token's error as the
next norm sees it.

A residual writer adds its output ``y_t = W x_t`` to the residual stream, ``r_t = h_t + y_t``, and the next block
reads ``r_t`` only through an RMS (or layer) norm, ``r / rms(r)`` times the norm's weight. To first order a weight
error ``dW`` therefore reaches the next block as ``dW x_t / rms(r_t)`` (less its component along ``r_t``, dropped
here), so the loss to minimise is ``sum_t ||dW x_t||^2 / ms(r_t)``, ``ms`` the mean square over the hidden size:
GPTQ's Hessian of the inputs scaled token by token, ``H = sum_t x_t x_t^T / ms(r_t)``, with ``r_t`` the residual
*after* the add (the input of the next norm; the layer's output for the last writer). The plain Hessian weighs
every token's absolute error alike.

Why it matters: LLMs park a few tokens with massive residual activations (the attention sink; Sun et al. 2024,
"Massive activations in large language models", arXiv 2402.17762). On SmolLM2 the first token's residual has rms
~940 from layer 11 on against 5-30 for the others; down_proj 11 (which writes it) and 28 (which removes most of it)
see inputs of norm ~2980 / ~2370 at that token against ~6 / ~47 elsewhere, so their plain Hessians are 100 % / 83 %
that one token, and GPTQ spends the layer on an error the norm divides by ~940. PrefixQuant (Chen et al. 2024,
arXiv 2410.05265) drops such tokens from calibration; here they keep the weight the norm gives their error.

Where the residual is read: for a writer group of the family's adapter (a group without an input norm), the input of
the next group's norm, else the layer's output. Layers with sandwich norms (Gemma 2 / 3: ``post_feedforward_layernorm``,
which normalises a writer's output *before* the add) are not derived here: their writers keep the plain Hessian.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from lowbit.algorithms._calib import capture_inputs

log = logging.getLogger(__name__)

SANDWICH_NORM = "post_feedforward_layernorm"  # a layer with it normalises its writers' outputs before the add


def residual_sources(layer: nn.Module, groups) -> dict[str, nn.Module | None]:
    """For each residual writer of ``layer`` (the linears of a group of ``groups`` without an input norm, by name
    inside the layer): the norm module whose input is the residual after the writer's add, or None for the layer's
    output. ``groups``: the family adapter's ``(names, norm)`` rows in layer order. Empty for sandwich-norm layers."""
    if hasattr(layer, SANDWICH_NORM):
        return {}
    out: dict[str, nn.Module | None] = {}
    for k, (names, norm) in enumerate(groups):
        if norm is not None:
            continue
        nxt = groups[k + 1][1] if k + 1 < len(groups) else None
        source = layer.get_submodule(nxt) if nxt is not None else None
        out.update({n: source for n in names})
    return out


def inverse_rms(r: torch.Tensor) -> torch.Tensor:
    """``1 / rms(r)`` over the last axis, (..., 1) in fp32: the factor the next norm applies to a token's residual."""
    return torch.rsqrt(r.detach().float().pow(2).mean(-1, keepdim=True).clamp_min(1e-12))


@contextmanager
def residual_scales(layer: nn.Module, sources: dict[str, nn.Module | None],
                    fn: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    """While active, each forward of ``layer`` calls ``fn(name, s)`` for each writer ``name`` of ``sources``
    (:func:`residual_sources`), ``s = 1 / rms(r)`` (B, T, 1) of the residual after that writer's add."""
    by_source: dict[int, list[str]] = {}
    modules: dict[int, nn.Module | None] = {}
    for n, m in sources.items():
        by_source.setdefault(id(m), []).append(n)
        modules[id(m)] = m

    def emit(key: int, r: torch.Tensor) -> None:
        s = inverse_rms(r)
        for n in by_source[key]:
            fn(n, s)

    handles = []
    for key, m in modules.items():
        if m is None:
            handles.append(layer.register_forward_hook(
                lambda mod, args, out, key=key: emit(key, out[0] if isinstance(out, tuple) else out)))
        else:
            handles.append(m.register_forward_pre_hook(lambda mod, args, key=key: emit(key, args[0])))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def residual_weighted_inputs(layer: nn.Module, writers: dict[str, nn.Module], sources: dict[str, nn.Module | None],
                             fn: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    """While active, each forward of ``layer`` calls ``fn(key, x * s)`` for each ``key, module`` of ``writers``:
    ``x`` the module's input (B, T, K), ``s`` (B, T, 1) the inverse rms of the residual after its add.
    ``sources`` maps the same keys to :func:`residual_sources`' entries."""
    pending: dict[str, torch.Tensor] = {}

    def scale(key: str, s: torch.Tensor) -> None:
        x = pending.pop(key, None)
        if x is None:
            raise RuntimeError(f"{key}: the residual after its add was seen before its input")
        fn(key, x.float() * s)

    with capture_inputs(writers, pending.__setitem__), residual_scales(layer, sources, scale):
        yield
    if pending:
        raise RuntimeError(f"no residual reached the norm after {', '.join(pending)}")


__all__ = ["inverse_rms", "residual_scales", "residual_sources", "residual_weighted_inputs"]
