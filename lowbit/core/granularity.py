"""Granularity as data: which elements share one (scale, zero_point) pair.

- ``PerTensor()``          one pair for the whole tensor; scale shape ``()``.
- ``PerChannel(axis=0)``   one pair per index along ``axis``; scale shape ``(C,)``.
- ``PerGroup(size, axis=-1)`` one pair per run of ``size`` consecutive elements along ``axis``
  (the input dimension of a weight, to contain outliers); for ``x`` of shape ``(..., K)``
  the scale has shape ``(..., K // size)``.

``to_blocks`` reshapes a tensor so the elements sharing a pair lie along the last dimension, which
turns every reduction and every broadcast into the same one-liner.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch

from lowbit.errors import ConfigError


@dataclass(frozen=True)
class PerTensor:
    def to_json(self) -> dict:
        return {"type": "per_tensor"}


@dataclass(frozen=True)
class PerChannel:
    axis: int = 0

    def to_json(self) -> dict:
        return {"type": "per_channel", "axis": self.axis}


@dataclass(frozen=True)
class PerGroup:
    group_size: int
    axis: int = -1

    def __post_init__(self):
        if self.group_size <= 0:
            raise ConfigError(f"group_size must be positive, got {self.group_size}")

    def to_json(self) -> dict:
        return {"type": "per_group", "group_size": self.group_size, "axis": self.axis}


Granularity = Union[PerTensor, PerChannel, PerGroup]


def per_tensor() -> PerTensor:
    return PerTensor()


def per_channel(axis: int = 0) -> PerChannel:
    return PerChannel(axis)


def per_group(group_size: int, axis: int = -1) -> PerGroup:
    return PerGroup(group_size, axis)


def granularity_from_json(d: dict) -> Granularity:
    kind = d.get("type")
    if kind == "per_tensor":
        return PerTensor()
    if kind == "per_channel":
        return PerChannel(int(d.get("axis", 0)))
    if kind == "per_group":
        return PerGroup(int(d["group_size"]), int(d.get("axis", -1)))
    raise ConfigError(f"unknown granularity {d!r}; valid types: per_tensor, per_channel, per_group")


def to_blocks(x: torch.Tensor, g: Granularity) -> torch.Tensor:
    """View ``x`` as ``(n_pairs..., block)`` so that one (scale, zero_point) covers the last dim.

    per-tensor: (1, numel); per-channel(axis): (C, numel / C); per-group(size): (..., K / size, size).
    """
    if isinstance(g, PerTensor):
        return x.reshape(1, -1)
    if isinstance(g, PerChannel):
        axis = g.axis % x.dim()
        return x.movedim(axis, 0).reshape(x.shape[axis], -1)  # (C, numel / C)
    if isinstance(g, PerGroup):
        axis = g.axis % x.dim()
        xm = x.movedim(axis, -1)
        k = xm.shape[-1]
        if k % g.group_size:
            raise ConfigError(
                f"dimension {axis} has size {k}, not divisible by group_size {g.group_size}; "
                f"pick a group size that divides {k}"
            )
        return xm.reshape(*xm.shape[:-1], k // g.group_size, g.group_size)  # (..., K/g, g)
    raise ConfigError(f"unknown granularity {g!r}")


def from_blocks(xb: torch.Tensor, shape: torch.Size, g: Granularity) -> torch.Tensor:
    """Inverse of :func:`to_blocks`: back to the original ``shape``."""
    if isinstance(g, PerTensor):
        return xb.reshape(shape)
    if isinstance(g, PerChannel):
        axis = g.axis % len(shape)
        moved = (shape[axis],) + tuple(s for i, s in enumerate(shape) if i != axis)
        return xb.reshape(moved).movedim(0, axis)
    axis = g.axis % len(shape)
    moved = tuple(s for i, s in enumerate(shape) if i != axis) + (shape[axis],)
    return xb.reshape(moved).movedim(-1, axis)


def param_shape(shape: torch.Size, g: Granularity) -> tuple[int, ...]:
    """The compact shape of the scale / zero_point tensor for a tensor of ``shape``."""
    if isinstance(g, PerTensor):
        return ()
    if isinstance(g, PerChannel):
        return (shape[g.axis % len(shape)],)
    axis = g.axis % len(shape)
    rest = tuple(s for i, s in enumerate(shape) if i != axis)
    if shape[axis] % g.group_size:
        raise ConfigError(f"size {shape[axis]} not divisible by group_size {g.group_size}")
    return rest + (shape[axis] // g.group_size,)


def n_pairs(shape: torch.Size, g: Granularity) -> int:
    """How many (scale, zero_point) pairs a tensor of ``shape`` stores at granularity ``g``."""
    n = 1
    for s in param_shape(shape, g):
        n *= s
    return n
