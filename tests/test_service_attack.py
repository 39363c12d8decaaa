"""What a hostile test found (issue 19), each reproduced against a real uvicorn server on 127.0.0.1:
made-up HTTP methods growing /metrics, request bodies and sockets held without bound, CLI values
accepted or crashing. These servers serve an empty store (no model is loaded), so they start fast."""

from __future__ import annotations

import socket
import time
from contextlib import ExitStack, contextmanager

import httpx
import pytest

from lowbit.errors import ConfigError
from lowbit.service.limits import Limits
from lowbit.service.online_calibration import OnlineCalibrationConfig

from service_support import running_service

WAIT_S = 20.0  # generous deadline for a server-side event on a loaded machine (not a speed assert)


@contextmanager
def bare_server(tmp_path, limits: Limits | None = None):
    """(service, base_url) over an empty store with nothing active: only the HTTP layer runs."""
    with running_service(tmp_path / "store", limits=limits, register_default=False, activate=False) as (service, url):
        yield service, url


def _until(cond, what: str, timeout: float = WAIT_S) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.02)


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)), timeout=WAIT_S)
    return s


def _read_all(s: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    out = b""
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            return out
        if not chunk:
            return out
        out += chunk


# ---- 1. unbounded metric labels from the client's HTTP method -------------------------------------

BOGUS_METHODS = 200


def test_made_up_http_methods_do_not_grow_metrics(tmp_path):
    with bare_server(tmp_path) as (_, url), httpx.Client(base_url=url, timeout=WAIT_S) as c:
        c.request("XWARMUP", "/health")  # the "other" label exists from here on
        c.get("/metrics")  # and the /metrics route's own series
        before = c.get("/metrics").text
        for i in range(BOGUS_METHODS):
            r = c.request(f"BOGUS{i}", "/health")
            assert 400 <= r.status_code < 500
        after = c.get("/metrics").text
    assert "BOGUS" not in after and 'method="other"' in after
    grown = len(after.splitlines()) - len(before.splitlines())
    assert grown == 0, f"/metrics grew by {grown} lines for {BOGUS_METHODS} made-up methods"


# ---- 2. bodies buffered at once, slow bodies, idle and excess sockets -----------------------------

BODY_LIMITS = dict(max_body_bytes=4096, max_buffered_bytes=10_000, body_timeout_s=2.0)
PART = 3500  # bytes of a 4000-byte body sent, the rest never


def _slow_post(url: str) -> socket.socket:
    s = _connect(url)
    s.sendall(b"POST /embed HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 4000\r\n\r\n"
              + b" " * PART)
    return s


def test_bodies_buffered_at_once_are_bounded_and_slow_bodies_time_out(tmp_path):
    with bare_server(tmp_path, Limits(**BODY_LIMITS)) as (service, url), ExitStack() as stack:
        a, b = (stack.enter_context(_slow_post(url)) for _ in range(2))
        _until(lambda: service.buffered.now == 2 * PART, "two partial bodies buffered")
        c = stack.enter_context(_slow_post(url))  # 3 x 3500 > 10000: refused, not held
        reply = _read_all(c)
        assert reply.startswith(b"HTTP/1.1 503") and b"buffering too many request bodies" in reply, reply[:300]
        assert service.buffered.now == 2 * PART
        for s in (a, b):  # never finished: 408 after body_timeout_s, connection closed, bytes released
            reply = _read_all(s)
            assert reply.startswith(b"HTTP/1.1 408") and b"not received within 2 s" in reply, reply[:300]
        assert service.buffered.now == 0 and service.buffered.peak == 2 * PART
        with httpx.Client(base_url=url, timeout=WAIT_S) as client:
            metrics = client.get("/metrics").text
            assert 'lowbit_rejected_requests_total{reason="buffered_bytes"} 1' in metrics
            assert 'lowbit_rejected_requests_total{reason="body_timeout"} 2' in metrics
            assert client.post("/embed", json={"inputs": "x"}).status_code == 503  # served (no model), not refused


CONN_LIMITS = dict(max_connections=4, header_timeout_s=1.0, keep_alive_s=1.0)


def test_excess_idle_and_slowloris_sockets_are_closed(tmp_path):
    with bare_server(tmp_path, Limits(**CONN_LIMITS)) as (service, url), ExitStack() as stack:
        idle = [stack.enter_context(_connect(url)) for _ in range(3)]
        slow = stack.enter_context(_connect(url))
        slow.sendall(b"GET /health HTTP/1.1\r\n")  # headers that never end
        _until(lambda: len(service.connections) == 4, "four open connections")
        extra = stack.enter_context(_connect(url))
        reply = _read_all(extra)  # the fifth: answered 503 and closed at once
        assert reply.startswith(b"HTTP/1.1 503") and b"too many connections (limit 4)" in reply, reply[:300]
        for i in range(3):  # a header trickling in does not keep the socket open
            time.sleep(0.3)
            try:
                slow.sendall(b"X-Slow: %d\r\n" % i)
            except OSError:
                break
        for s in idle + [slow]:  # no complete request within header_timeout_s: closed by the server
            assert _read_all(s) == b""
        _until(lambda: len(service.connections) == 0, "every connection closed")
        keep = stack.enter_context(_connect(url))  # the service is fine afterwards; an idle keep-alive
        keep.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")  # socket is closed after keep_alive_s
        reply = _read_all(keep)
        assert reply.startswith(b"HTTP/1.1 503") and b"no model is active" in reply, reply[:300]


# ---- 9. invalid command-line values: a clean error, never a traceback -----------------------------

@pytest.mark.parametrize("args, words", [
    (["--calib-every", "-3"], "--calib-every"),
    (["--port", "99999"], "--port"),
    (["--port", "0"], "--port"),
    (["--max-batch", "0"], "--max-batch"),
    (["--max-generations", "0"], "--max-generations"),
    (["--max-tokens", "-1"], "--max-tokens"),
    (["--kv-cache", "int3"], "--kv-cache"),
    (["--calib-cpu-share", "2"], "--calib-cpu-share"),
    (["--calib-from", "not-an-ip"], "not-an-ip"),
])
def test_serve_refuses_invalid_values_before_loading_anything(tmp_path, monkeypatch, args, words):
    from typer.testing import CliRunner

    import lowbit.service.state as state
    from lowbit.cli import app

    def forbidden(*a, **k):
        raise AssertionError("the service was started with an invalid value")

    monkeypatch.setattr(state, "ModelService", forbidden)
    result = CliRunner().invoke(app, ["serve", "--store", str(tmp_path / "s"), "--api-key", "k", *args])
    out = result.output + (result.stderr if result.stderr_bytes is not None else "")
    assert result.exit_code == 2, (result.exit_code, out, result.exception)
    assert words in out and "Traceback" not in out
    assert not isinstance(result.exception, AssertionError)


@pytest.mark.parametrize("kw", [dict(every=-3), dict(every=1.5), dict(reference_size=0), dict(sources=("x/y",)),
                                dict(tolerance=-1.0)])
def test_online_calibration_config_refuses_invalid_values(kw):
    with pytest.raises(ConfigError):
        OnlineCalibrationConfig(**kw)


@pytest.mark.parametrize("kw", [dict(body_timeout_s=0), dict(header_timeout_s=float("inf")), dict(max_connections=0),
                                dict(max_buffered_bytes=100)])
def test_limits_refuse_invalid_values(kw):
    with pytest.raises(ConfigError):
        Limits(**kw)
