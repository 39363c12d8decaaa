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


# ---- issue 19 probes: `python tests/service_support.py PROBE ...` (numbers in docs/service.md) ------------
# PROBE: metrics N | slowbodies M | idle M SECONDS | hugespec
# Each starts a server over an empty store in a subprocess and reads that process's VmRSS, so the
# client's own memory is not counted. Run with PYTHONPATH=<checkout> to compare two trees.

_PROBE_SERVER = r"""
import sys, tempfile, time
from lowbit.service.app import create_app
from lowbit.service.server import ServerThread
from lowbit.service.state import ModelService
svc = ModelService(tempfile.mkdtemp(), "k", register_default=False, activate=False)
ServerThread(create_app(svc), port=int(sys.argv[1])).start()
print("ready", flush=True)
time.sleep(3600)
"""


def _rss_mib(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _probe(argv: list[str]) -> str:
    import socket
    import subprocess
    import sys
    import time

    from lowbit.service.server import free_port

    if argv[:1] == ["hugespec"]:
        return _probe_huge_spec()
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", _PROBE_SERVER, str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(1)
        what = argv[0]
        if what == "metrics":  # metrics N: /metrics size after N made-up HTTP methods
            import httpx

            n = int(argv[1])
            with httpx.Client(base_url=f"http://127.0.0.1:{port}") as c:
                c.get("/metrics")
                m0, r0 = len(c.get("/metrics").content), _rss_mib(proc.pid)
                for i in range(n):
                    c.request(f"M{i:06d}", "/health")
                m1, r1 = len(c.get("/metrics").content), _rss_mib(proc.pid)
            return f"/metrics {m0} -> {m1} bytes after {n} made-up methods; server RSS {r0:.0f} -> {r1:.0f} MiB"
        if what == "slowbodies":  # slowbodies M: M clients each send all but 1 KiB of a 2 MiB body
            m, size = int(argv[1]), 2 << 20
            r0, socks, refused = _rss_mib(proc.pid), [], 0
            for _ in range(m):
                s = socket.create_connection(("127.0.0.1", port))
                s.sendall(b"POST /embed HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n" % size)
                s.settimeout(0.0)
                try:
                    s.sendall(b" " * (size - 1024))
                except OSError:
                    pass
                socks.append(s)
            time.sleep(5)
            for s in socks:
                try:
                    refused += s.recv(12).startswith(b"HTTP/1.1 503")
                except OSError:
                    pass
                s.close()
            r1 = _rss_mib(proc.pid)
            return f"{m} slow clients: server RSS {r0:.0f} -> {r1:.0f} MiB (+{r1 - r0:.0f}), {refused} answered 503"
        if what == "idle":  # idle M SECONDS: how many of M idle sockets the server closed after SECONDS
            m, wait = int(argv[1]), float(argv[2])
            socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(m)]
            time.sleep(wait)
            closed = 0
            for s in socks:
                s.settimeout(0.05)
                try:
                    closed += s.recv(1) == b""
                except socket.timeout:
                    pass
                except OSError:
                    closed += 1
                s.close()
            return f"{m} idle sockets: {closed} closed by the server after {wait:g} s"
        raise SystemExit(f"unknown probe {what!r}: metrics N | slowbodies M | idle M SECONDS")
    finally:
        proc.kill()
        proc.wait()


_HUGE_LOAD = r"""
import resource, sys
from pathlib import Path
import torch
from lowbit.service.store import ModelStore
folder = Path(sys.argv[1])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    ModelStore(folder.parent).load(folder.name)
    msg = "loaded?!"
except Exception as exc:
    msg = str(exc)
grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
print(f"refused a 50000x50000 spec, peak RSS +{grew:.0f} MiB: {msg[:200]}")
"""


def _probe_huge_spec() -> str:
    import json
    import subprocess
    import sys

    import lowbit
    from lowbit.config import build_config
    from lowbit.models import load_model

    root = Path(tempfile.mkdtemp(prefix="lowbit-huge-"))
    try:
        m = load_model("minilm")
        lowbit.quantize(m, build_config("w8a8-dynamic", {"alpha": "none"}))
        lowbit.save(m, root / "huge")
        meta = json.loads((root / "huge" / "metadata.json").read_text())
        meta["layers"]["bert.encoder.layer.0.output.dense"].update(in_features=50_000, out_features=50_000)
        (root / "huge" / "metadata.json").write_text(json.dumps(meta))
        out = subprocess.run([sys.executable, "-c", _HUGE_LOAD, str(root / "huge")], capture_output=True, text=True)
        return out.stdout.strip() or out.stderr[-2000:]
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    import sys

    print(_probe(sys.argv[1:]))
