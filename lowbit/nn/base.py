"""What every quantized module provides, and the registry that ``lowbit.load`` rebuilds from.

A quantized module is an ``nn.Module`` whose persistent state is plain tensors (int8/uint8 codes,
float scales) so that it saves to safetensors, plus:

- ``spec() -> dict``: JSON-able constructor arguments, recorded per layer in ``metadata.json``;
- ``cls.from_spec(spec)``: an instance with correctly shaped, empty buffers, ready for
  ``load_state_dict``;
- ``cls.from_float(module, ...)``: quantize a float module.

Classes register with :func:`register_qmodule` under their class name.
"""

from __future__ import annotations

from torch import nn

from lowbit.errors import LoadError

QMODULES: dict[str, type] = {}


def register_qmodule(cls):
    QMODULES[cls.__name__] = cls
    return cls


def module_from_spec(spec: dict) -> nn.Module:
    """Rebuild an empty quantized module from its recorded spec."""
    cls = QMODULES.get(spec.get("class"))
    if cls is None:
        raise LoadError(f"unknown quantized module class {spec.get('class')!r}; known: {', '.join(sorted(QMODULES))}")
    args = {k: v for k, v in spec.items() if k != "class"}
    try:
        return cls.from_spec(args)
    except (TypeError, ValueError, KeyError) as exc:
        raise LoadError(f"invalid spec for {spec.get('class')}: {exc}") from None
