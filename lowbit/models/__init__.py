"""Loaders for the real models lowbit is measured on, all offline from installed packages.

``load_model(name)`` returns an ``nn.Module`` in eval mode with two attributes every other layer
relies on: ``model_name`` (the registry key) and ``task`` (``"encoder"``, ``"causal-lm"`` or
``"classifier"``), which the evaluation harness dispatches on.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from lowbit.errors import ConfigError

TASKS = ("encoder", "causal-lm", "classifier")


def _minilm() -> nn.Module:
    from lowbit.models.minilm import load_minilm

    return load_minilm()


def _smollm2() -> nn.Module:
    from lowbit.models.smollm2 import load_smollm2

    return load_smollm2()


def _digits() -> nn.Module:
    from lowbit.models.digits import load_digits_cnn

    return load_digits_cnn()


MODELS: dict[str, Callable[[], nn.Module]] = {
    "minilm": _minilm,  # all-MiniLM-L6-v2 sentence encoder (22.6M params)
    "smollm2": _smollm2,  # SmolLM2-135M-Instruct causal LM, dequantized from GGUF (134.5M params)
    "digits": _digits,  # small BN+ReLU CNN on scikit-learn digits (~25k params)
}


def load_model(name: str) -> nn.Module:
    """The fp32 model registered under `name`; ConfigError listing the valid names otherwise."""
    try:
        loader = MODELS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown model {name!r}; valid models: {', '.join(sorted(MODELS))}") from None
    return loader()


__all__ = ["MODELS", "TASKS", "load_model"]
