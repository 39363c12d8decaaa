"""Fold BatchNorm into the preceding convolution / linear layer (Jacob et al. 2018, section 3.2).

An eval-mode BN computes ``y = gamma (z - mu) / sqrt(var + eps) + beta`` on ``z = W x + b``; with
``k = gamma / sqrt(var + eps)`` (per output channel) this is one layer with

    W' = k W    (scaled along the output-channel axis),     b' = k (b - mu) + beta,

so the folded weights are what gets quantized and no BN runs at inference. The pairs are found on
the ``torch.fx`` graph (a conv whose only user is a BN); the BN module becomes ``nn.Identity``.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from lowbit.api import set_submodule
from lowbit.nn.static import FoldedBatchNorm

log = logging.getLogger(__name__)

_PAIRS = ((nn.Conv2d, nn.BatchNorm2d), (nn.Conv1d, nn.BatchNorm1d), (nn.Linear, nn.BatchNorm1d))


@torch.no_grad()
def fold_bn_into(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> None:
    """In place: ``layer`` (conv / linear) absorbs ``bn``'s running statistics and affine parameters."""
    k = bn.weight.float() / torch.sqrt(bn.running_var.float() + bn.eps) if bn.affine else \
        1.0 / torch.sqrt(bn.running_var.float() + bn.eps)  # (C,)
    beta = bn.bias.float() if bn.affine else torch.zeros_like(k)
    w = layer.weight
    w.copy_(w * k.reshape(-1, *([1] * (w.dim() - 1))).to(w.dtype))
    b = layer.bias if layer.bias is not None else torch.zeros_like(k)
    new_bias = (k * (b.float() - bn.running_mean.float()) + beta).to(w.dtype)
    if layer.bias is None:
        layer.bias = nn.Parameter(new_bias)
    else:
        layer.bias.copy_(new_bias)


def find_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(layer name, bn name) pairs where the BN directly and only consumes the layer's output."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return []
    import torch.fx

    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as exc:  # untraceable models keep their BNs in float
        log.warning("BN folding skipped: %s is not fx-traceable (%s)", type(model).__name__, exc)
        return []
    mods = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(mods.get(node.target), nn.modules.batchnorm._BatchNorm):
            continue
        src = node.args[0]
        if getattr(src, "op", None) != "call_module" or len(src.users) != 1:
            continue
        layer, bn = mods[src.target], mods[node.target]
        if any(isinstance(layer, lt) and type(bn) is bt for lt, bt in _PAIRS):
            pairs.append((src.target, node.target))
    return pairs


def fold_batchnorms(model: nn.Module) -> list[tuple[str, str]]:
    """Fold every foldable (layer, BN) pair of an eval-mode ``model`` in place; returns the pairs."""
    pairs = find_bn_pairs(model)
    for layer_name, bn_name in pairs:
        bn = model.get_submodule(bn_name)
        if bn.training or bn.running_mean is None:
            log.warning("BN %s not folded: needs eval mode with running statistics", bn_name)
            continue
        fold_bn_into(model.get_submodule(layer_name), bn)
        set_submodule(model, bn_name, FoldedBatchNorm())
        log.debug("folded %s into %s", bn_name, layer_name)
    return pairs
