"""The on-disk cache for derived model files (dequantized SmolLM2, trained digits CNN), written atomically.

Location: ``$LOWBIT_CACHE`` if set, else ``~/.cache/lowbit``. Every write goes to a temporary name in
the same folder, is fsynced, then renamed into place with os.replace, so a reader never sees a
half-written entry even if the writer is killed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def cache_dir() -> Path:
    """The cache root, created on first use."""
    root = Path(os.environ.get("LOWBIT_CACHE") or Path.home() / ".cache" / "lowbit")
    root.mkdir(parents=True, exist_ok=True)
    return root


def recipe_key(recipe: dict) -> str:
    """A short stable hash of a JSON-serialisable recipe (what determines the cached content)."""
    blob = json.dumps(recipe, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_file(path: Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp_path) on a temp file next to path, fsync it, then os.replace it onto path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        _fsync_path(tmp_path)
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def atomic_write_dir(path: Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp_dir) on a temp folder next to path, fsync its files, then rename it to path.

    If another process won the race and path already exists, its copy is kept and ours discarded.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        write(tmp_dir)
        for f in tmp_dir.rglob("*"):
            if f.is_file():
                _fsync_path(f)
        try:
            os.replace(tmp_dir, path)
        except OSError:
            if not path.exists():
                raise
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir, ignore_errors=True)
