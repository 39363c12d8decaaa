"""``metadata.json``: what a saved model is and what was done to it, validated with pydantic.

``is_quantized`` is the field the seed FAQ's service checks: a pre-trained model is not
necessarily quantized. The rest records the recipe (scheme, config, per-layer choices, layers left
in float and why), the calibration data (hash, size, source), exact sizes, a sha256 per weight
file, and the fidelity measured when it was saved.
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lowbit.errors import LoadError

METADATA_FILE = "metadata.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1


class CalibrationInfo(BaseModel):
    model_config = ConfigDict(extra="allow")
    source: str = ""
    n_samples: int = 0
    n_tokens: Optional[int] = None
    sha256: str = ""


class ModelMetadata(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    format_version: int = FORMAT_VERSION
    id: str
    model: str = Field(description="the base model's name: minilm, smollm2, digits, or the source folder's name")
    source: str = ""
    architecture: str = ""
    task: str = ""
    wrapper: Optional[dict[str, Any]] = Field(
        default=None, description="how lowbit.load rebuilds the model from this folder alone: the task wrapper "
        "(encoder pooling, causal LM, bundled CNN) around the architecture in config.json")
    is_quantized: bool
    scheme: Optional[str] = None
    config: Optional[dict[str, Any]] = None
    bits: Optional[float] = None
    granularity: Optional[str] = None
    layers: dict[str, dict[str, Any]] = Field(default_factory=dict)
    skipped: dict[str, str] = Field(default_factory=dict)
    calibration: Optional[CalibrationInfo] = None
    sizes: dict[str, float] = Field(default_factory=dict)
    files: dict[str, str] = Field(default_factory=dict, description="weight file -> sha256")
    aliases: dict[str, str] = Field(default_factory=dict, description="tensor stored once under another "
                                    "name (tied weights): alias -> the name in the weights file")
    fidelity: dict[str, Any] = Field(default_factory=dict)
    library_version: str = ""
    created_at: str = Field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat())


def read_metadata(folder: str | Path) -> ModelMetadata:
    """Parse and validate ``folder/metadata.json``; every failure names the file."""
    path = Path(folder) / METADATA_FILE
    if not path.is_file():
        raise LoadError(f"{path}: missing (a saved lowbit model folder has metadata.json and {WEIGHTS_FILE})")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LoadError(f"{path}: not valid JSON ({exc})") from None
    try:
        meta = ModelMetadata.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(root)"
        raise LoadError(f"{path}: invalid metadata at {where}: {first['msg']}") from None
    if meta.format_version != FORMAT_VERSION:
        raise LoadError(f"{path}: format_version {meta.format_version} not supported (expected {FORMAT_VERSION})")
    return meta
