"""OpenAI-compatible text generation from the active causal LM: ``POST /v1/completions`` and
``POST /v1/chat/completions``, as JSON or streamed as server-sent events (``data: {chunk}\\n\\n`` ...
``data: [DONE]\\n\\n``).

Each generation runs on its own thread (:class:`~lowbit.service.generate.GenerationGate`, at most
``max_generations`` at once, 429 beyond) so the event loop keeps serving. The slot is held until the
thread ends. While a generation runs, the request's ASGI ``receive`` is watched: when the client
disconnects (streaming or not) the decode loop is told to stop after the current token, and the
thread, hence the slot, is freed. Like ``/v1/embeddings``, these endpoints need no API key.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse

from lowbit.service import schemas as S
from lowbit.service.active import Serving
from lowbit.service.errors import InputTooLarge
from lowbit.service.generate import (
    GenerationResult,
    SamplingParams,
    chat_prompt,
    check_prompt,
    context_length,
    encode_prompt,
    generate,
)

log = logging.getLogger(__name__)

ERRORS = {code: {"model": S.ErrorResponse} for code in (413, 422, 429, 503)}
MAX_STOPS = 4  # OpenAI's limit on stop strings
MAX_STOP_CHARS = 256


async def _wait_disconnect(receive: Callable) -> None:
    """Return when the client has gone (``http.disconnect``); the request body was already read."""
    while (await receive())["type"] != "http.disconnect":
        pass


class SSEResponse(StreamingResponse):
    """A server-sent-events stream that also watches for the client's disconnect (whatever the ASGI
    spec version) and then calls ``on_disconnect`` and stops sending."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], on_disconnect: Callable[[], None]):
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_disconnect = on_disconnect

    async def __call__(self, scope, receive, send) -> None:
        watch = asyncio.ensure_future(_wait_disconnect(receive))
        stream = asyncio.ensure_future(self.stream_response(send))
        try:
            await asyncio.wait({watch, stream}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not stream.done():  # the client went away first (or this request is being cancelled)
                self.on_disconnect()
                stream.cancel()
                await asyncio.gather(stream, return_exceptions=True)
        exc = None if stream.cancelled() else stream.exception()
        if isinstance(exc, OSError):  # a send to a closed connection
            self.on_disconnect()
            log.info("stream to %s ended: client disconnected", scope.get("client"))
        elif exc is not None:
            raise exc


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOPS:
        raise InputTooLarge(f"stop has {len(stops)} strings; at most {MAX_STOPS}", "stop")
    for s in stops:
        if not s or len(s) > MAX_STOP_CHARS:
            raise InputTooLarge(f"each stop string must have 1 to {MAX_STOP_CHARS} characters", "stop")
    return tuple(stops)


def _check_text(text: str, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InputTooLarge(f"{what} is not valid Unicode text (lone surrogate)", "encoding") from None


def _message_text(m: S.ChatMessage, i: int) -> dict[str, str]:
    content = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)
    _check_text(content, f"message {i}")
    return {"role": "system" if m.role == "developer" else m.role, "content": content}


def register(app: FastAPI, service) -> None:
    """Add the generation routes to ``app`` (a :class:`~lowbit.service.state.ModelService` behind it)."""
    lim = service.limits
    metrics = service.metrics

    def record(endpoint: str, result: GenerationResult | None) -> None:
        if result is None:
            metrics.generations.inc(endpoint=endpoint, finish_reason="error")
            return
        metrics.generations.inc(endpoint=endpoint, finish_reason=result.finish_reason)
        metrics.prompt_tokens.inc(result.prompt_tokens, endpoint=endpoint)
        metrics.generated_tokens.inc(result.completion_tokens, endpoint=endpoint)
        metrics.generation_seconds.inc(result.seconds)
        if result.completion_tokens and result.seconds > 0:
            metrics.tokens_per_second.observe(result.completion_tokens / result.seconds)

    async def prepare(s: Serving, text: str, templated: bool, max_tokens: int | None, req) -> tuple[list[int], SamplingParams]:
        """Prompt ids and sampling parameters, every limit checked (4xx naming it)."""
        stops = _stops(req.stop)
        ids = await run_in_threadpool(encode_prompt, s.model.tokenizer, text, templated)
        if not ids:
            bos = getattr(s.model.tokenizer, "bos_token_id", None)
            if bos is None:
                raise InputTooLarge("the prompt is empty and the model has no beginning-of-text token to start from",
                                    "prompt")
            ids = [int(bos)]
        n = check_prompt(len(ids), max_tokens, lim.max_prompt_tokens, lim.max_tokens, context_length(s.model))
        return ids, SamplingParams(max_tokens=n, temperature=req.temperature, top_p=req.top_p, seed=req.seed,
                                   stop=stops)

    def start(s: Serving, ids: list[int], p: SamplingParams, endpoint: str, cancel: threading.Event,
              on_text: Callable[[str], None] | None):
        """Run the generation on a generation thread; the slot (already taken) is freed when it ends."""

        def work() -> GenerationResult:
            result = None
            try:
                result = generate(s.model, ids, p, s.kv_cache or "none", cancel, on_text)
                return result
            finally:
                record(endpoint, result)
                service.generations.release()

        try:
            return service.generations.executor.submit(work)
        except BaseException:
            service.generations.release()
            raise

    async def run(request: Request, s: Serving, ids: list[int], p: SamplingParams, endpoint: str,
                  stream: bool, include_usage: bool, shape: Callable[..., dict], object_name: str):
        service.generations.acquire()  # 429 when max_generations run
        cancel = threading.Event()
        rid = f"{'chatcmpl' if endpoint == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        head = {"id": rid, "object": object_name, "created": created, "model": s.model_id}
        if not stream:
            fut = asyncio.wrap_future(start(s, ids, p, endpoint, cancel, None))
            watch = asyncio.ensure_future(_wait_disconnect(request.receive))
            try:
                await asyncio.wait({fut, watch}, return_when=asyncio.FIRST_COMPLETED)
                if not fut.done():  # the client is gone: stop after the current token
                    cancel.set()
                result = await fut
            finally:
                watch.cancel()
            usage = {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                     "total_tokens": result.prompt_tokens + result.completion_tokens}
            return JSONResponse({**head, "choices": [shape(result.text, result.finish_reason, final=True)],
                                 "usage": usage})

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        put = lambda item: loop.call_soon_threadsafe(queue.put_nowait, item)  # noqa: E731
        fut = start(s, ids, p, endpoint, cancel, lambda piece: put(("text", piece)))
        fut.add_done_callback(lambda f: put(("end", f)))

        def chunk(choice: dict, usage: dict | None = None) -> str:
            body = {**head, "choices": [choice] if choice else []}
            if include_usage:
                body["usage"] = usage
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        async def events() -> AsyncIterator[str]:
            try:
                first = shape(None, None, final=False)
                if first is not None:
                    yield chunk(first)
                while True:
                    kind, value = await queue.get()
                    if kind == "text":
                        yield chunk(shape(value, None, final=False))
                        continue
                    if value.exception() is not None:  # after the stream started: an error event, then the end
                        exc = value.exception()
                        log.warning("generation %s failed mid-stream: %s: %s", rid, type(exc).__name__, exc)
                        detail = service.store.public(f"generation failed: {type(exc).__name__}: {exc}")
                        yield f"data: {json.dumps({'error': {'message': detail, 'type': 'server_error'}})}\n\n"
                    else:
                        r: GenerationResult = value.result()
                        yield chunk(shape("", r.finish_reason, final=False, last=True))
                        if include_usage:
                            usage = {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
                                     "total_tokens": r.prompt_tokens + r.completion_tokens}
                            yield chunk({}, usage)
                    yield "data: [DONE]\n\n"
                    return
            finally:
                cancel.set()  # normal end (no-op), client gone, or response cancelled: the loop stops

        return SSEResponse(events(), on_disconnect=cancel.set)

    @app.post("/v1/completions", responses=ERRORS)
    async def completions(req: S.CompletionRequest, request: Request):
        """OpenAI-compatible text completion from the active causal LM (``stream: true`` for SSE)."""
        s = service.serving_lm()
        prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
        if len(prompts) != 1:
            raise InputTooLarge(f"prompt must be one string (got a list of {len(prompts)}); send one request per "
                                "prompt", "prompt")
        _check_text(prompts[0], "prompt")
        ids, p = await prepare(s, prompts[0], False, req.max_tokens, req)

        def shape(text, finish, final, last=False):
            return {"text": text or "", "index": 0, "logprobs": None,
                    "finish_reason": finish if (final or last) else None} if (text is not None or last) else None

        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return await run(request, s, ids, p, "completions", req.stream, include_usage, shape, "text_completion")

    @app.post("/v1/chat/completions", responses=ERRORS)
    async def chat_completions(req: S.ChatCompletionRequest, request: Request):
        """OpenAI-compatible chat completion: the model's chat template when its tokenizer has one, else
        one ``role: content`` line per message followed by ``assistant:``."""
        s = service.serving_lm()
        messages = [_message_text(m, i) for i, m in enumerate(req.messages)]
        text, templated = await run_in_threadpool(chat_prompt, s.model.tokenizer, messages)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        ids, p = await prepare(s, text, templated, max_tokens, req)

        def shape(text, finish, final, last=False):
            if final:
                return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                        "finish_reason": finish}
            if last:
                return {"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish}
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if text is None else {"content": text}
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}

        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return await run(request, s, ids, p, "chat", req.stream, include_usage, shape,
                         "chat.completion.chunk" if req.stream else "chat.completion")
