"""``open_model(name_or_path)``: whatever the user points at, as a lowbit task model.

- a bundled model's short name (``minilm``, ``smollm2``, ``digits``): its fp32 model;
- a saved lowbit folder (``metadata.json``): ``lowbit.load`` of it;
- a Hugging Face model folder (``config.json``): :func:`lowbit.models.hf.load_hf`;
- a ``.gguf`` file: :func:`lowbit.io.gguf_import.load_gguf` (Q4_0 / Q4_1 / Q8_0 tensors stay packed).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from lowbit.errors import ConfigError
from lowbit.io.metadata import METADATA_FILE


def open_model(target: str | Path) -> nn.Module:
    from lowbit.models import MODELS, load_model

    name = str(target)
    if name in MODELS:
        return load_model(name)
    path = Path(name).expanduser()
    if path.is_dir() and (path / METADATA_FILE).is_file():
        from lowbit.io.checkpoint import load

        return load(path)
    if path.is_dir():
        from lowbit.models.hf import load_hf

        return load_hf(path)
    if path.is_file() and path.suffix == ".gguf":
        from lowbit.io.gguf_import import load_gguf

        return load_gguf(path)
    if path.exists():
        raise ConfigError(f"{path}: not a model folder (config.json or metadata.json) nor a .gguf file")
    raise ConfigError(f"{name!r} is neither a bundled model ({', '.join(sorted(MODELS))}) nor an existing path")
