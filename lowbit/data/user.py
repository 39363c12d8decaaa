"""The user's own calibration / evaluation data, read from a file with clear errors.

- text: ``.txt`` (one sample per non-empty line) or ``.jsonl`` (one JSON object per line with a
  ``"text"`` field);
- images: ``.npy`` (a float array (N, C, H, W) or (N, H, W), read with ``allow_pickle=False``).

:func:`read_samples` returns the samples and a record for ``metadata.json`` (path, sha256, count).
:func:`check_disjoint` measures how much of the calibration text appears in the evaluation text
(word 8-grams, as for the built-in sets) and warns: calibrating on the evaluation data makes every
measured number look better than it is.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from lowbit.data.overlap import overlap
from lowbit.errors import ConfigError
from lowbit.io.atomic import sha256_file

log = logging.getLogger(__name__)

MAX_BYTES = 1 << 30  # a calibration or evaluation file above 1 GiB is almost certainly the wrong file
OVERLAP_WARN = 0.01  # share of calibration 8-grams found in the evaluation data above which we warn
TEXT_SUFFIXES = (".txt", ".jsonl")


def read_samples(path: str | Path) -> tuple[list[str] | torch.Tensor, dict]:
    """Samples of a .txt / .jsonl (list of str) or .npy (float tensor) file, and their record."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"{path}: no such file (calibration / evaluation data is a .txt, .jsonl or .npy file)")
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise ConfigError(f"{path}: {size / 1e9:.1f} GB is more than the {MAX_BYTES >> 30} GiB limit for data files")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise ConfigError(f"{path}: not a plain numeric .npy array ({exc})") from None
        if arr.dtype.kind not in "fiu" or arr.ndim not in (3, 4) or len(arr) == 0:
            raise ConfigError(f"{path}: expected a non-empty numeric array (N, C, H, W) or (N, H, W), "
                              f"got {arr.dtype} {arr.shape}")
        x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
        samples: list[str] | torch.Tensor = x[:, None] if x.dim() == 3 else x
    elif suffix in TEXT_SUFFIXES:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8 text ({exc})") from None
        if suffix == ".txt":
            samples = [ln.strip() for ln in lines if ln.strip()]
        else:
            samples = []
            for i, ln in enumerate(lines, 1):
                if not ln.strip():
                    continue
                try:
                    obj = json.loads(ln)
                except json.JSONDecodeError as exc:
                    raise ConfigError(f"{path}:{i}: not JSON ({exc.msg})") from None
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise ConfigError(f"{path}:{i}: each line must be an object with a string \"text\" field")
                if obj["text"].strip():
                    samples.append(obj["text"])
        if not samples:
            raise ConfigError(f"{path}: no non-empty samples")
    else:
        raise ConfigError(f"{path}: unsupported data file {suffix or '(no suffix)'}; use .txt, .jsonl or .npy")
    record = {"source": str(path), "sha256": sha256_file(path), "n_samples": len(samples)}
    return samples, record


def check_disjoint(calib: list[str], evaluation: list[str] | str) -> float:
    """Share of the calibration word 8-grams that occur in the evaluation data; a warning above 1 %."""
    frac = overlap(calib, evaluation)
    if frac > OVERLAP_WARN:
        log.warning("calibration data overlaps the evaluation data: %.1f%% of its 8-grams appear there; "
                    "measured fidelity will look better than it is", 100 * frac)
    return frac
