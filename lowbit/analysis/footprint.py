"""Exact storage of a model: bytes of every distinct tensor storage it holds, quantized ones included.

Counts parameters, buffers and whatever else its state_dict carries (e.g. torch.ao's packed int8
weights), deduplicating shared storages (tied embeddings count once). Tensor subclasses that
declare ``__tensor_flatten__`` (torchao's quantized tensors) are opened up and their inner tensors
counted; torch's quantized tensors count their integer codes plus their scales and zero-points.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn


def _collect(obj, seen: set, acc: list[int]) -> None:
    if isinstance(obj, (list, tuple)):
        for item in obj:
            _collect(item, seen, acc)
        return
    if isinstance(obj, dict):
        for item in obj.values():
            _collect(item, seen, acc)
        return
    if type(obj).__name__ == "ScriptObject":
        state = getattr(obj, "__getstate__", None)  # packed params of torch.ao quantized modules
        if state is not None:
            _collect(state(), seen, acc)
        return
    if not isinstance(obj, torch.Tensor):
        return
    if type(obj) is not torch.Tensor and type(obj) is not nn.Parameter and hasattr(obj, "__tensor_flatten__"):
        names, _ = obj.__tensor_flatten__()
        for name in names:
            _collect(getattr(obj, name), seen, acc)
        return
    if obj.is_quantized:  # integer codes (counted below via the storage) plus scales and zero-points
        if obj.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric,
                             torch.per_channel_affine_float_qparams):
            acc.append(obj.q_per_channel_scales().nbytes + obj.q_per_channel_zero_points().nbytes)
        else:
            acc.append(8 + 8)  # one float64 scale and one int64 zero-point
    storage = obj.untyped_storage()
    key = (storage.data_ptr(), storage.nbytes(), obj.device.type)
    if storage.data_ptr() == 0:  # meta/fake storage: count the view itself
        acc.append(obj.numel() * obj.element_size())
        return
    if key not in seen:
        seen.add(key)
        acc.append(storage.nbytes())


def model_size_bytes(model: nn.Module) -> int:
    """Exact bytes of the distinct storages of all parameters, buffers and state_dict entries of `model`."""
    seen: set = set()
    acc: list[int] = []
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        _collect(tensor, seen, acc)
    for value in model.state_dict(keep_vars=True).values():
        _collect(value, seen, acc)
    return int(sum(acc))


def float_param_count(model: nn.Module) -> int:
    """Number of floating-point parameter elements (the fp32 architecture's size for an unquantized model)."""
    return sum(p.numel() for p in model.parameters() if p.is_floating_point())


def fp32_numel(model: nn.Module, override: int | None = None) -> int:
    """Parameter count of the fp32 architecture: `override`, else model.lowbit_fp32_numel, else float params."""
    if override is not None:
        return int(override)
    stored = getattr(model, "lowbit_fp32_numel", None)
    if stored is not None:
        return int(stored)
    return float_param_count(model)
