"""Shared helpers for the service tests (tests/test_service*.py): a seed store built once per session
(real MiniLM fp32 + a real W8A8-dynamic MiniLM), cheap per-test copies of it, a running server."""

from __future__ import annotations

import atexit
import copy
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

API_KEY = "test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
FP32_ID = "minilm"
W8_ID = "minilm-w8"
SEED_CALIB = 16  # calibration sentences for the seed W8A8-dynamic model (SmoothQuant factors)

_seed: Path | None = None


def seed_store(minilm) -> Path:
    """A store folder with ``minilm`` (fp32) and ``minilm-w8`` (W8A8-dynamic, SmoothQuant), built once."""
    global _seed
    if _seed is None:
        import lowbit
        from lowbit.algorithms._calib import default_calibration
        from lowbit.config import build_config

        root = Path(tempfile.mkdtemp(prefix="lowbit-seed-store-"))
        atexit.register(shutil.rmtree, root, True)
        lowbit.save(minilm, root / FP32_ID)
        q = copy.deepcopy(minilm)
        lowbit.quantize(q, build_config("w8a8-dynamic", {}), default_calibration(q, SEED_CALIB))
        lowbit.save(q, root / W8_ID)
        _seed = root
    return _seed


def copy_store(minilm, dest: Path, ids: tuple[str, ...] = (FP32_ID, W8_ID)) -> Path:
    """Hard-link copy of the seed store (cheap). Safe because the service only replaces files, never edits
    them; tests that corrupt a file must unlink it and write a new one (see :func:`rewrite`)."""
    src = seed_store(minilm)
    dest.mkdir(parents=True, exist_ok=True)
    for model_id in ids:
        shutil.copytree(src / model_id, dest / model_id, copy_function=os.link)
    return dest


def rewrite(path: Path, data: bytes) -> None:
    """Replace a (possibly hard-linked) file with new content without touching the other links."""
    path.unlink()
    path.write_bytes(data)


@contextmanager
def running_service(store: Path, **kwargs):
    """(service, base_url) for a real uvicorn server on 127.0.0.1 over ``store``."""
    from lowbit.service.app import create_app
    from lowbit.service.server import ServerThread
    from lowbit.service.state import ModelService

    service = ModelService(store, API_KEY, **kwargs)
    server = ServerThread(create_app(service))
    try:
        yield service, server.start()
    finally:
        server.stop()
        service.shutdown()
