"""The FastAPI app: thin routes over a :class:`~lowbit.service.state.ModelService`.

``create_app(service)`` wires the routes, the limits (``limits.py``), the error mapping
(``errors.py``: every client error is a 4xx with a message) and a guard that turns any unexpected
exception into a logged 503, so no request ever gets a 500. OpenAPI is served at ``/openapi.json``
and ``/docs``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from pathlib import Path
from typing import Any, Optional

from fastapi import Depends, FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from lowbit import __version__
from lowbit.errors import ConfigError, LowbitError
from lowbit.service import schemas as S
from lowbit.service.errors import (
    BodyTooLarge,
    Conflict,
    InputTooLarge,
    InvalidModelId,
    Overloaded,
    Unauthorized,
    status_for,
)
from lowbit.service.limits import BodyLimitMiddleware, check_api_key
from lowbit.service.openai_routes import register as register_generation
from lowbit.service.state import ModelService

log = logging.getLogger(__name__)

ERRORS = {code: {"model": S.ErrorResponse} for code in (401, 404, 409, 413, 422, 429, 503)}
# Methods counted under their own name in /metrics; any other (HTTP allows any token) is "other",
# so a client cannot grow the label set (one made-up method per request grew /metrics by 2 kB each).
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
PAGE_FILE = Path(__file__).with_name("page.html")
# The page loads nothing from elsewhere: its own inline script and style, and this origin's JSON.
PAGE_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
            "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
_bearer = HTTPBearer(auto_error=False, description="the service's API key")


def _rejection_reason(exc: LowbitError) -> str | None:
    if isinstance(exc, InputTooLarge):
        return exc.reason
    for cls, reason in ((Unauthorized, "auth"), (BodyTooLarge, "body_size"), (Overloaded, "overload"),
                        (InvalidModelId, "invalid_id")):
        if isinstance(exc, cls):
            return reason
    return None


class GuardMiddleware:
    """Innermost safety net: an unexpected exception becomes a JSON 503, logged with its traceback."""

    def __init__(self, app, service: ModelService):
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(msg):
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            self.service.metrics.unexpected.inc(type=type(exc).__name__)
            log.exception("unexpected error on %s %s", scope.get("method"), scope.get("path"))
            if started:
                return
            what = self.service.store.public(f"{type(exc).__name__}: {exc}")  # the full text is in the log
            body = json.dumps({"detail": f"the service could not complete this request ({what}); it was logged"}).encode()
            await send({"type": "http.response.start", "status": 503,
                        "headers": [(b"content-type", b"application/json"), (b"retry-after", b"1")]})
            await send({"type": "http.response.body", "body": body})


class MetricsMiddleware:
    """Outermost: counts every request by route template and status, times it."""

    def __init__(self, app, service: ModelService):
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 0
        start = time.perf_counter()

        async def recording_send(msg):
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            m = self.service.metrics
            method = scope.get("method", "")
            m.requests.inc(route=route, method=method if method in KNOWN_METHODS else "other", status=status)
            m.latency.observe(time.perf_counter() - start, route=route)


def _check_inputs(inputs: str | list[str], service: ModelService) -> list[str]:
    """The batch as a list, within the batch and length limits (422 naming the limit otherwise)."""
    lim = service.limits
    sentences = [inputs] if isinstance(inputs, str) else list(inputs)
    if not sentences:
        raise InputTooLarge("inputs is empty: send one sentence or a non-empty list", "empty")
    if len(sentences) > lim.max_batch:
        raise InputTooLarge(f"batch of {len(sentences)} inputs exceeds the limit of {lim.max_batch} inputs per request",
                            "batch")
    for i, s in enumerate(sentences):
        if len(s) > lim.max_input_chars:
            raise InputTooLarge(f"input {i} has {len(s)} characters; the limit is {lim.max_input_chars} characters",
                                "input_length")
        try:
            s.encode("utf-8")
        except UnicodeEncodeError:
            raise InputTooLarge(f"input {i} is not valid Unicode text (lone surrogate)", "encoding") from None
    return sentences


def create_app(service: ModelService) -> FastAPI:
    app = FastAPI(title="lowbit model service", version=__version__,
                  description="Sentence embeddings from a store of (quantized) models, with hot swap, background "
                              "quantization and online calibration. Mutating endpoints need a Bearer API key.")
    app.state.service = service

    def require_key(request: Request, _: Optional[HTTPAuthorizationCredentials] = Depends(_bearer)) -> None:
        check_api_key(request.headers.get("authorization"), service.api_key)

    @app.exception_handler(LowbitError)
    async def _lowbit_error(request: Request, exc: LowbitError):
        status = status_for(exc)
        reason = _rejection_reason(exc)
        if reason:
            service.metrics.rejected.inc(reason=reason)
        headers = {}
        if status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        if status in (429, 503):
            headers["Retry-After"] = "1"
        detail = service.store.public(str(exc))
        if detail != str(exc):  # the paths go to the log, not to the client
            log.info("%s %s -> %d: %s", request.method, request.url.path, status, exc)
        return JSONResponse({"detail": detail}, status_code=status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                  for e in exc.errors()]
        return JSONResponse({"detail": errors}, status_code=422)

    # ---- health, metrics ------------------------------------------------------------------------
    @app.get("/health", response_model=S.Health, responses={503: {"model": S.ErrorResponse}})
    def health():
        s = service.serving()  # 503 when nothing serves
        return {"status": "ok", "active": s.model_id, "is_quantized": s.is_quantized, "version": __version__,
                "inflight": service.gate.inflight}

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics (text format 0.0.4)")
    def metrics():
        return PlainTextResponse(service.metrics.render(), media_type="text/plain; version=0.0.4")

    # ---- the operator page ---------------------------------------------------------------------
    page = PAGE_FILE.read_bytes()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def operator_page():
        """One static HTML file (inline JS/CSS, no build step) that reads the JSON endpoints."""
        return HTMLResponse(page, headers={"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-cache"})

    @app.get("/schemes", summary="quantization schemes a quantize job accepts")
    def schemes():
        from lowbit.config import list_schemes

        return {"schemes": [{"name": x.name, "help": x.help, "options": list(x.options), "models": list(x.models)}
                            for x in list_schemes()]}

    # ---- models --------------------------------------------------------------------------------
    @app.get("/models", response_model=S.ModelList, responses=ERRORS)
    def list_models():
        return {"models": service.list_models()}

    @app.get("/models/active", response_model=S.ActiveModelInfo, responses=ERRORS)
    def active_model():
        """Which encoder serves (top level) and which causal LM (``lm``), and whether they are quantized."""
        return service.describe_active()

    @app.get("/models/{model_id}", response_model=S.ModelSummary, responses=ERRORS)
    def get_model(model_id: str):
        return service.model_info(model_id)

    @app.post("/models/{model_id}/activate", response_model=S.ActiveModelInfo, responses=ERRORS,
              dependencies=[Depends(require_key)])
    def activate(model_id: str):
        """Load the model fully, then switch to it (the encoder slot, or the causal-LM slot for a
        causal-lm model); requests in flight finish on the previous one."""
        service.activate(model_id)
        return service.describe_active()

    @app.post("/models/{model_id}/quantize", status_code=202, response_model=S.JobInfo, responses=ERRORS,
              dependencies=[Depends(require_key)])
    def quantize(model_id: str, req: S.QuantizeRequest):
        """Quantize a model of the store into a new one, in the background; poll ``GET /jobs/{id}``."""
        try:
            job = service.submit_quantize(model_id, req.scheme, req.options, req.target_id, req.calib,
                                          req.calibration, req.overwrite)
        except (TypeError, ValueError) as exc:  # a scheme builder refusing an option value
            if isinstance(exc, LowbitError):
                raise
            raise ConfigError(f"invalid options for scheme {req.scheme!r}: {exc}") from None
        return JSONResponse(job.to_dict(), status_code=202, headers={"Location": f"/jobs/{job.id}"})

    # ---- jobs ----------------------------------------------------------------------------------
    def public(obj: Any) -> Any:
        """A JSON-able value with server paths removed from its strings (errors, reasons)."""
        return json.loads(service.store.public(json.dumps(obj, ensure_ascii=False)))

    @app.get("/jobs", response_model=S.JobList, responses=ERRORS)
    def list_jobs():
        return {"jobs": [public(j.to_dict()) for j in service.jobs.list()]}

    @app.get("/jobs/{job_id}", response_model=S.JobInfo, responses=ERRORS)
    def get_job(job_id: str):
        return public(service.jobs.get(job_id).to_dict())

    # ---- embeddings ----------------------------------------------------------------------------
    def _has_key(request: Request) -> bool:
        try:
            check_api_key(request.headers.get("authorization"), service.api_key)
        except Unauthorized:
            return False
        return True

    async def _embed(sentences: list[str], truncate: bool, request: Request):
        with service.gate.admit():
            s, emb, counts = await asyncio.wrap_future(service.batcher.embed(sentences, truncate))
        n_tokens = sum(counts)
        service.metrics.inputs.inc(len(sentences))
        service.metrics.tokens.inc(n_tokens)
        cal = service.calibrator
        if cal.config.enabled:  # only clients in --calib-from feed the buffer (everyone when it is unset)
            key = "key" in cal.config.sources and _has_key(request)
            cal.observe(sentences, request.client.host if request.client else None, key)
        return s, emb, n_tokens

    @app.post("/embed", response_model=S.EmbedResponse, responses=ERRORS)
    async def embed_route(req: S.EmbedRequest, request: Request):
        """Sentence embeddings (unit norm) from the active model."""
        sentences = _check_inputs(req.inputs, service)
        s, emb, n_tokens = await _embed(sentences, req.truncate, request)

        def encode() -> bytes:
            return json.dumps({"model": s.model_id, "is_quantized": s.is_quantized, "revision": s.revision,
                               "dim": emb.shape[1], "embeddings": emb.tolist(),
                               "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}).encode()

        return Response(await run_in_threadpool(encode), media_type="application/json")

    @app.post("/v1/embeddings", response_model=S.OpenAIEmbeddingResponse, responses=ERRORS)
    async def openai_embeddings(req: S.OpenAIEmbeddingRequest, request: Request):
        """OpenAI-compatible embeddings: ``{"input": ..., "model": ...}``."""
        sentences = _check_inputs(req.input, service)
        if req.dimensions is not None:
            dim = getattr(service.serving().model, "bert", None)
            dim = getattr(getattr(dim, "config", None), "hidden_size", None)
            if req.dimensions != dim:
                raise InputTooLarge(f"dimensions={req.dimensions} not supported: the active model gives {dim}",
                                    "dimensions")
        s, emb, n_tokens = await _embed(sentences, True, request)

        def encode() -> bytes:
            if req.encoding_format == "base64":
                vecs: list[Any] = [base64.b64encode(e.numpy().astype("<f4").tobytes()).decode() for e in emb]
            else:
                vecs = emb.tolist()
            data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vecs)]
            return json.dumps({"object": "list", "data": data, "model": s.model_id,
                               "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}).encode()

        return Response(await run_in_threadpool(encode), media_type="application/json")

    # ---- online calibration --------------------------------------------------------------------
    @app.get("/calibration", response_model=S.CalibrationStatus, responses=ERRORS)
    def calibration_status():
        """Online calibration: configuration, buffer fill, and the last attempts with their reasons."""
        return public(service.calibrator.status())

    @app.post("/calibration/run", responses=ERRORS, dependencies=[Depends(require_key)])
    def calibration_run(wait: bool = Query(False, description="run now and return the outcome")):
        """Recalibrate the active model from buffered traffic now (validated; swapped only if not worse)."""
        if not service.calibrator.config.enabled:
            raise Conflict("online calibration is off; start the service with --online-calibration")
        if wait:
            return public(service.calibrator.run_once("manual"))
        service.calibrator.trigger()
        return JSONResponse({"detail": "recalibration requested; see GET /calibration"}, status_code=202)

    @app.post("/calibration/rollback", response_model=S.ActiveModelInfo, responses=ERRORS,
              dependencies=[Depends(require_key)])
    def calibration_rollback():
        """Serve the parent of the active model again (undo an accepted online recalibration)."""
        service.rollback()
        return service.describe_active()

    register_generation(app, service)

    app.add_middleware(GuardMiddleware, service=service)
    app.add_middleware(BodyLimitMiddleware, limits=service.limits, buffered=service.buffered,
                       on_reject=lambda reason: service.metrics.rejected.inc(reason=reason))
    app.add_middleware(MetricsMiddleware, service=service)
    return app
