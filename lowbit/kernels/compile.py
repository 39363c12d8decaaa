"""Whole-network fusion with ``torch.compile`` (inductor), for inference.

Eager PyTorch runs a W8A8 linear as ~8 separate passes over the activations (abs, amax, divide,
round, clamp, cast, ``_int_mm``, rescale); inductor fuses the per-token quantization into one
kernel and the rescale + bias + GELU epilogue into another, which is where most of the speed-up
over fp32 comes from on CPU (measured in ``bench/minilm.py``).

:func:`compiled` returns a *view* of the model that shares every weight with the original and
runs its compute-heavy submodule compiled with dynamic shapes (batch and sequence length vary).
The original stays uncompiled, so ``lowbit.save`` and ``state_dict`` keys are unaffected.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

# Submodules that hold the network inside the real-model wrappers of lowbit.models.
_INNER = ("bert", "lm")


def compiled(model: nn.Module, dynamic: bool = True) -> nn.Module:
    """A weight-sharing copy of ``model`` whose inner network runs under ``torch.compile``."""
    view = copy.copy(model)
    view._modules = dict(model._modules)  # own module table: the original keeps its eager children
    inner = next((name for name in _INNER if name in view._modules), None)
    if inner is None:
        log.info("compiling %s as a whole", type(model).__name__)
        return torch.compile(model, dynamic=dynamic)
    log.info("compiling %s.%s with inductor (dynamic shapes); the first batches are slow", type(model).__name__, inner)
    view._modules[inner] = torch.compile(view._modules[inner], dynamic=dynamic)
    return view
