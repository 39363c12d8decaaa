"""lowbit: a PyTorch-native quantization toolkit and model service.

The front door is :func:`lowbit.quantize` (see ``lowbit.api``); saved models come back with
:func:`lowbit.load`. Both are imported lazily so that ``import lowbit`` stays light.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["quantize", "load", "save", "__version__"]


def __getattr__(name: str):
    if name in ("quantize",):
        from lowbit import api

        return getattr(api, name)
    if name in ("load", "save"):
        from lowbit.io import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(f"module 'lowbit' has no attribute {name!r}")
