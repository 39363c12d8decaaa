"""Atomic writes: temp file + fsync + ``os.replace`` + fsync of the folder.

A reader sees the old file or the new one, never a torn one, even if the writer is killed -9
mid-write. Folders are written the same way: built under a hidden temp name beside the target,
then renamed into place. Leftovers of interrupted writes carry the ``.lowbit-tmp-`` prefix and
are removed by :func:`sweep_leftovers`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

TMP_PREFIX = ".lowbit-tmp-"
OLD_PREFIX = ".lowbit-old-"


def fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def fsync_file(path: str | os.PathLike) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


@contextmanager
def atomic_dir(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp folder to fill; on success it replaces ``target`` in one rename.

    With ``overwrite`` an existing ``target`` is moved aside first and deleted after the swap; a
    crash between the two renames leaves the old version under ``.lowbit-old-*``, which
    :func:`sweep_leftovers` restores.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists (use --force / overwrite=True to replace it)")
    tmp = target.parent / f"{TMP_PREFIX}{target.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        for f in tmp.iterdir():
            fsync_file(f)
        fsync_dir(tmp)
        old = None
        if target.exists():
            old = target.parent / f"{OLD_PREFIX}{target.name}-{uuid.uuid4().hex[:8]}"
            os.replace(target, old)
        os.replace(tmp, target)
        fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sweep_leftovers(folder: str | os.PathLike) -> list[str]:
    """Remove temp leftovers of interrupted writes in ``folder``; restore a moved-aside old version
    whose replacement never landed. Returns what was done, one line per entry."""
    folder = Path(folder)
    done = []
    if not folder.is_dir():
        return done
    for p in sorted(folder.iterdir()):
        if p.name.startswith(TMP_PREFIX):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            done.append(f"removed {p.name}")
        elif p.name.startswith(OLD_PREFIX):
            original = folder / p.name[len(OLD_PREFIX):].rsplit("-", 1)[0]
            if original.exists():
                shutil.rmtree(p, ignore_errors=True)
                done.append(f"removed {p.name}")
            else:
                os.replace(p, original)
                done.append(f"restored {original.name}")
    return done


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
