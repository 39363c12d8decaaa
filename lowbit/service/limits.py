"""Limits and security, checked before any model work: TEI-style request limits, a Bearer key.

- body size: ``max_body_bytes`` for declared (Content-Length) and streamed (chunked) bodies alike,
  enforced by an ASGI middleware that counts bytes as they arrive -> 413;
- batch size and input length: ``max_batch`` inputs per request, ``max_input_chars`` characters per
  input -> 422 with the limit in the message (the token limit is the model's; see ``embed.py``);
- overload: at most ``max_inflight`` embedding requests admitted (running + waiting for the compute
  threads); the next one is answered 429 at once, without queueing;
- generation: at most ``max_tokens`` new tokens and ``max_prompt_tokens`` prompt tokens per
  request (422), at most ``max_generations`` generations at once (429);
- the API key: every mutating endpoint needs ``Authorization: Bearer <key>`` -> 401 otherwise,
  compared in constant time;
- bodies buffered at once: ``max_buffered_bytes`` across all requests whose body is being read or
  served (a request that would pass it is answered 503 and its connection closed), and each body must
  arrive within ``body_timeout_s`` (408 otherwise);
- connections: at most ``max_connections`` open sockets (more are answered 503 and closed at once), a
  request's headers must arrive within ``header_timeout_s`` of the connection opening or of the
  previous response (idle and slowloris sockets are closed), and an idle keep-alive socket is closed
  after ``keep_alive_s`` (see ``server.py``).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any, Callable, Iterator

from lowbit.errors import ConfigError
from lowbit.service.errors import Overloaded, Unauthorized

log = logging.getLogger(__name__)

DRAIN_CAP_BYTES = 8 << 20  # after a 413, read and discard at most this much more so the client sees the reply


@dataclass
class Limits:
    max_body_bytes: int = 2 << 20  # 2 MiB, TEI's default payload limit
    max_batch: int = 64  # inputs per embedding request
    max_input_chars: int = 16384  # characters per input (~4k tokens; the model keeps its first 256)
    max_inflight: int = 64  # admitted embedding requests (running + waiting); more -> 429
    compute_threads: int = 1  # forward passes at a time (torch already uses every core for one)
    max_queued_jobs: int = 4  # quantize jobs waiting; more -> 429
    max_buffered_bytes: int = 64 << 20  # request bodies held at once, all requests together; more -> 503
    max_connections: int = 512  # open sockets; more are answered 503 and closed
    body_timeout_s: float = 30.0  # a body must arrive within this after its headers; else 408
    header_timeout_s: float = 10.0  # a request's headers must arrive within this; else the socket is closed
    keep_alive_s: float = 5.0  # an idle keep-alive socket is closed after this (uvicorn's timeout_keep_alive)
    max_header_bytes: int = 16 << 10  # request line + headers (h11_max_incomplete_event_size); more -> 400
    max_tokens: int = 512  # tokens one generation may produce (/v1/completions, /v1/chat/completions); more -> 422
    max_prompt_tokens: int = 2048  # prompt tokens per generation (also capped by the model's context); more -> 422
    max_generations: int = 2  # generations running at once, each on its own thread; more -> 429

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name.endswith("_s"):
                if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 < v < float("inf"):
                    raise ConfigError(f"limit {f.name} must be a positive number of seconds, got {v!r}")
            elif not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"limit {f.name} must be a positive integer, got {v!r}")
        if self.max_buffered_bytes < self.max_body_bytes:
            raise ConfigError(f"max_buffered_bytes ({self.max_buffered_bytes}) must be at least max_body_bytes "
                              f"({self.max_body_bytes}): one request of the largest size must fit")


def check_api_key(authorization: str | None, api_key: str) -> None:
    """Accept ``Bearer <api_key>``; :class:`Unauthorized` naming what is missing otherwise."""
    if not authorization:
        raise Unauthorized("this endpoint changes the service: send 'Authorization: Bearer <API key>'")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("malformed Authorization header: expected 'Bearer <API key>'")
    if not hmac.compare_digest(token.strip().encode("utf-8", "replace"), api_key.encode("utf-8")):
        raise Unauthorized("wrong API key")


class Gate:
    """Admission control plus the compute threads every forward pass runs on.

    ``admit()`` counts a request in (or raises :class:`Overloaded` when ``max_inflight`` are in);
    ``run`` executes a function on the compute threads. Background work (online calibration) uses
    ``run_blocking`` on the same threads, so it interleaves with requests batch by batch.
    """

    def __init__(self, limits: Limits):
        self.limits = limits
        self._lock = threading.Lock()
        self.inflight = 0
        self.rejected = 0
        self.executor = ThreadPoolExecutor(limits.compute_threads, thread_name_prefix="lowbit-compute")

    @contextmanager
    def admit(self) -> Iterator[None]:
        with self._lock:
            if self.inflight >= self.limits.max_inflight:
                self.rejected += 1
                raise Overloaded(f"overloaded: {self.inflight} requests in flight (limit {self.limits.max_inflight}); "
                                 "retry shortly")
            self.inflight += 1
        try:
            yield
        finally:
            with self._lock:
                self.inflight -= 1

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.wrap_future(self.executor.submit(fn, *args))

    def run_blocking(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.executor.submit(fn, *args).result()

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


class BufferedBytes:
    """Bytes held by request bodies now and at most so far (shared by the middleware and ``/metrics``)."""

    def __init__(self):
        self.now = 0
        self.peak = 0

    def add(self, n: int) -> None:
        self.now += n
        self.peak = max(self.peak, self.now)


class BodyLimitMiddleware:
    """ASGI middleware: refuse bodies over ``limits.max_body_bytes`` with 413, chunked ones included;
    bound the bytes buffered by all requests together (503) and the time a body may take (408).

    The body is read here (counting bytes as they arrive) and replayed to the app, so the app never
    sees more than the limit. ``buffered`` counts the bytes of every body being read or served
    (released when its request finishes); uvicorn itself holds at most 64 KiB per connection beyond
    what is read here (it pauses reading).
    """

    def __init__(self, app, limits: Limits, buffered: BufferedBytes | None = None,
                 on_reject: Callable[[str], None] | None = None):
        self.app = app
        self.limits = limits
        self.buffered = buffered or BufferedBytes()  # one event loop updates it: no lock needed
        self.on_reject = on_reject  # on_reject(reason) for the /metrics refusal counter

    async def _reply(self, send, status: int, detail: str, reason: str, extra=()) -> None:
        if self.on_reject:
            self.on_reject(reason)
        body = json.dumps({"detail": detail}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close"), *extra]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        lim = self.limits
        limit = lim.max_body_bytes
        declared = None
        for k, v in scope.get("headers", ()):
            if k == b"content-length":
                try:
                    declared = int(v)
                except ValueError:
                    body = b'{"detail": "invalid Content-Length header"}'
                    await send({"type": "http.response.start", "status": 400,
                                "headers": [(b"content-type", b"application/json")]})
                    await send({"type": "http.response.body", "body": body})
                    return
        chunks, total, over, held = [], 0, declared is not None and declared > limit, 0
        deadline = time.monotonic() + lim.body_timeout_s
        try:
            while True:
                try:
                    msg = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    log.info("request body from %s not received within %.1f s: 408", scope.get("client"),
                             lim.body_timeout_s)
                    return await self._reply(send, 408, f"request body not received within {lim.body_timeout_s:g} s "
                                                        f"({total} bytes arrived)", "body_timeout")
                if msg["type"] == "http.disconnect":
                    return
                data = msg.get("body", b"")
                total += len(data)
                if total > limit:
                    over = True
                if not over and data:
                    if self.buffered.now + len(data) > lim.max_buffered_bytes:
                        log.warning("request bodies buffered at once would exceed %d bytes: 503", lim.max_buffered_bytes)
                        chunks.clear()
                        return await self._reply(send, 503, f"the service is buffering too many request bodies "
                                                            f"(limit {lim.max_buffered_bytes} bytes for all requests "
                                                            "together); retry shortly", "buffered_bytes",
                                                 [(b"retry-after", b"1")])
                    chunks.append(data)
                    held += len(data)
                    self.buffered.add(len(data))
                if not msg.get("more_body", False) or total > limit + DRAIN_CAP_BYTES:
                    break
            if over:
                return await self._reply(send, 413, f"request body too large: limit {limit} bytes ("
                                                    + (f"declared {declared} bytes" if declared is not None and
                                                       declared > limit else "body streamed past it") + ")",
                                         "body_size")
            body = b"".join(chunks)
            chunks.clear()
            replayed = False

            async def replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self.app(scope, replay, send)
        finally:
            self.buffered.add(-held)
