"""Running the app under uvicorn: ``serve`` for the CLI, :class:`ServerThread` for tests and benches.

Both run uvicorn with the connection limits of the service's :class:`~lowbit.service.limits.Limits`:
uvicorn's ``timeout_keep_alive`` (idle keep-alive sockets) and ``h11_max_incomplete_event_size``
(header size), plus :class:`GuardedH11Protocol`, which uvicorn lacks: a cap on open sockets and a
deadline for a request's headers (uvicorn arms no timer on a fresh connection, so a socket that never
sends a request, or sends its headers a byte at a time, stayed open forever).
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from lowbit.service.limits import Limits

log = logging.getLogger(__name__)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with ``limits.max_connections`` and ``limits.header_timeout_s``.

    Subclassed per server by :func:`protocol_class` (uvicorn instantiates the class itself).
    """

    limits: Limits = Limits()
    tracked: set | None = None  # the service's set of open connections (for /metrics)
    _header_timer: Any = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if self.tracked is not None:
            self.tracked.add(self)
        if len(self.connections) > self.limits.max_connections:
            log.warning("%d connections open (limit %d): refusing %s", len(self.connections) - 1,
                        self.limits.max_connections, self.client)
            body = json.dumps({"detail": f"too many connections (limit {self.limits.max_connections}); "
                                         "retry shortly"}).encode()
            transport.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
                            b"connection: close\r\nretry-after: 1\r\ncontent-length: %d\r\n\r\n%s"
                            % (len(body), body))
            transport.close()
            return
        self._arm_header_timer()

    def connection_lost(self, exc) -> None:
        self._cancel_header_timer()
        if self.tracked is not None:
            self.tracked.discard(self)
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_header_timer()  # the next request's headers get the same deadline

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.limits.header_timeout_s, self._header_timeout)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        waiting = self.cycle is None or self.cycle.response_complete  # no request in progress
        if waiting and not self.transport.is_closing():
            log.info("no complete request from %s within %g s: closing the connection", self.client,
                     self.limits.header_timeout_s)
            self.transport.close()


def protocol_class(limits: Limits, tracked: set | None = None) -> type[GuardedH11Protocol]:
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"limits": limits, "tracked": tracked})


def uvicorn_config(app, host: str, port: int, **kwargs) -> uvicorn.Config:
    """A uvicorn config with the limits of ``app.state.service`` (defaults if the app has none)."""
    service = getattr(getattr(app, "state", None), "service", None)
    limits = getattr(service, "limits", None) or Limits()
    tracked = getattr(service, "connections", None)
    return uvicorn.Config(app, host=host, port=port, http=protocol_class(limits, tracked),
                          timeout_keep_alive=limits.keep_alive_s,
                          h11_max_incomplete_event_size=limits.max_header_bytes, **kwargs)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


TRIM_EVERY_S = 2.0  # how often a running server hands freed heap pages back to the OS


def _return_freed_memory(stop: threading.Event) -> None:
    """Every ``TRIM_EVERY_S``: glibc ``malloc_trim``. Requests allocate temporaries of ever-changing
    shapes on many threads (one heap arena each); freed pages otherwise stay resident, so the server's
    RSS creeps up under steady traffic although nothing is live."""
    from lowbit.algorithms.sequential import release_free_memory

    while not stop.wait(TRIM_EVERY_S):
        release_free_memory()


def serve(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run ``app`` until interrupted (one process, one event loop; model work on the compute threads).

    Freed heap pages are handed back every ``TRIM_EVERY_S`` seconds, so memory stays flat under long
    traffic."""
    stop = threading.Event()
    threading.Thread(target=_return_freed_memory, args=(stop,), name="lowbit-trim", daemon=True).start()
    try:
        uvicorn.Server(uvicorn_config(app, host, port, log_level=log_level, timeout_graceful_shutdown=10)).run()
    finally:
        stop.set()


class ServerThread:
    """``with ServerThread(app) as url:`` a real uvicorn server on 127.0.0.1 in a background thread."""

    def __init__(self, app, host: str = "127.0.0.1", port: int | None = None, log_level: str = "warning"):
        self.host, self.port = host, port or free_port(host)
        self.server = uvicorn.Server(uvicorn_config(app, host, self.port, log_level=log_level,
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, name="lowbit-uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> str:
        self.thread.start()
        end = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > end:
                raise RuntimeError(f"uvicorn did not start on {self.url}")
            time.sleep(0.02)
        return self.url

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
