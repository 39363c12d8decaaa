"""Limits and security, checked before any model work: TEI-style request limits, a Bearer key.

- body size: ``max_body_bytes`` for declared (Content-Length) and streamed (chunked) bodies alike,
  enforced by an ASGI middleware that counts bytes as they arrive -> 413;
- batch size and input length: ``max_batch`` inputs per request, ``max_input_chars`` characters per
  input -> 422 with the limit in the message (the token limit is the model's; see ``embed.py``);
- overload: at most ``max_inflight`` embedding requests admitted (running + waiting for the compute
  threads); the next one is answered 429 at once, without queueing;
- the API key: every mutating endpoint needs ``Authorization: Bearer <key>`` -> 401 otherwise,
  compared in constant time.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any, Callable, Iterator

from lowbit.errors import ConfigError
from lowbit.service.errors import Overloaded, Unauthorized

DRAIN_CAP_BYTES = 8 << 20  # after a 413, read and discard at most this much more so the client sees the reply


@dataclass
class Limits:
    max_body_bytes: int = 2 << 20  # 2 MiB, TEI's default payload limit
    max_batch: int = 64  # inputs per embedding request
    max_input_chars: int = 16384  # characters per input (~4k tokens; the model keeps its first 256)
    max_inflight: int = 64  # admitted embedding requests (running + waiting); more -> 429
    compute_threads: int = 1  # forward passes at a time (torch already uses every core for one)
    max_queued_jobs: int = 4  # quantize jobs waiting; more -> 429

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"limit {f.name} must be a positive integer, got {v!r}")


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


class BodyLimitMiddleware:
    """ASGI middleware: refuse bodies over ``limits.max_body_bytes`` with 413, chunked ones included.

    The body is read here (counting bytes as they arrive) and replayed to the app, so the app never
    sees more than the limit.
    """

    def __init__(self, app, limits: Limits, on_reject: Callable[[], None] | None = None):
        self.app = app
        self.limits = limits
        self.on_reject = on_reject

    async def _reply_413(self, send, limit: int, declared: int | None) -> None:
        if self.on_reject:
            self.on_reject()
        what = f"declared {declared} bytes" if declared is not None else "body streamed past it"
        body = json.dumps({"detail": f"request body too large: limit {limit} bytes ({what})"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limits.max_body_bytes
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
        chunks, total, over = [], 0, declared is not None and declared > limit
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            data = msg.get("body", b"")
            total += len(data)
            if total > limit:
                over = True
            if not over:
                chunks.append(data)
            if not msg.get("more_body", False) or total > limit + DRAIN_CAP_BYTES:
                break
        if over:
            return await self._reply_413(send, limit, declared)
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
