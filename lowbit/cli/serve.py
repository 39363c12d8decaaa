"""``lowbit serve --store DIR``: the HTTP model service (FastAPI + uvicorn) over a model store."""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer

from lowbit.cli._common import clean_errors

API_KEY_ENV = "LOWBIT_API_KEY"


class KVCache(str, Enum):
    """lowbit.service.generate.KV_CHOICES (not imported here: it imports torch)."""

    int8 = "int8"
    int4 = "int4"
    int2 = "int2"
    int8_rot = "int8-rot"
    int4_rot = "int4-rot"
    int2_rot = "int2-rot"
    none = "none"
    fast = "fast"


def register(app: typer.Typer) -> None:
    @app.command()
    @clean_errors
    def serve(
        store: Path = typer.Option(..., "--store", help="model store folder (created; the bundled MiniLM is "
                                                        "registered when it is empty)"),
        host: str = typer.Option("127.0.0.1", "--host", help="interface to listen on"),
        port: int = typer.Option(8000, "--port", min=1, max=65535, help="TCP port"),
        api_key: Optional[str] = typer.Option(None, "--api-key", help=f"Bearer key for mutating endpoints "
                                              f"(default: ${API_KEY_ENV}, else a generated one, logged once)"),
        max_batch: int = typer.Option(64, "--max-batch", min=1, help="inputs per embedding request"),
        max_input_chars: int = typer.Option(16384, "--max-input-chars", min=1, help="characters per input"),
        max_body_bytes: int = typer.Option(2 << 20, "--max-body-bytes", min=1, help="request body size limit"),
        max_inflight: int = typer.Option(64, "--max-inflight", min=1, help="embedding requests admitted; more get 429"),
        max_buffered_bytes: int = typer.Option(64 << 20, "--max-buffered-bytes", min=1,
                                               help="request body bytes held at once, all requests together; "
                                                    "more get 503"),
        max_connections: int = typer.Option(512, "--max-connections", min=1,
                                            help="open client sockets; more are answered 503 and closed"),
        body_timeout: float = typer.Option(30.0, "--body-timeout", min=0.001,
                                           help="seconds for a request body to arrive (408 after)"),
        header_timeout: float = typer.Option(10.0, "--header-timeout", min=0.001,
                                             help="seconds for a request's headers to arrive (closed after)"),
        max_tokens: int = typer.Option(512, "--max-tokens", min=1, help="tokens one generation may produce "
                                                                          "(/v1/completions, /v1/chat/completions)"),
        max_prompt_tokens: int = typer.Option(2048, "--max-prompt-tokens", min=1,
                                              help="prompt tokens per generation (also capped by the model's context)"),
        max_generations: int = typer.Option(2, "--max-generations", min=1,
                                            help="generations running at once; more get 429"),
        kv_cache: KVCache = typer.Option(KVCache.int8, "--kv-cache", help="KV cache for generation: int8, int4, int2 (KIVI-style "
                                                                "quantized; -rot: keys/values quantized in a Hadamard "
                                                                "basis), none, or fast: lowbit's fast decoder (fp32 "
                                                                "cache, one C call per token; Llama/Mistral/Qwen2 with "
                                                                "4/8-bit weights)"),
        lm: Optional[str] = typer.Option(None, "--lm", help="causal LM of the store to serve at start (default: the "
                                                           "one recorded in .active.json, if any)"),
        online_calibration: bool = typer.Option(False, "--online-calibration/--no-online-calibration",
                                                help="buffer traffic and recalibrate the active model in the "
                                                     "background (validated, swapped only if not worse)"),
        calib_every: int = typer.Option(1024, "--calib-every", min=0,
                                        help="new inputs between recalibrations (0: on demand)"),
        calib_cpu_share: float = typer.Option(0.25, "--calib-cpu-share", min=0.001, max=1.0,
                                              help="compute share for recalibration, in (0, 1]"),
        calib_buffer: int = typer.Option(512, "--calib-buffer", min=1, help="recent inputs kept for recalibration "
                                                                              "(at most 2,000 characters each)"),
        calib_from: Optional[List[str]] = typer.Option(
            None, "--calib-from", help="who may feed the calibration buffer: 'key' (requests bearing the API key) "
                                       "or a client IP or network (127.0.0.1, 10.0.0.0/8); repeat for several; "
                                       "default: every client"),
    ) -> None:
        """Serve sentence embeddings and text generation, and manage the models of STORE over HTTP (operator
        page at /, OpenAPI at /docs)."""
        import logging
        import secrets

        from lowbit.service.app import create_app
        from lowbit.service.limits import Limits
        from lowbit.service.online_calibration import OnlineCalibrationConfig
        from lowbit.service.server import serve as run
        from lowbit.service.state import ModelService

        log = logging.getLogger("lowbit.serve")
        limits = Limits(max_body_bytes=max_body_bytes, max_batch=max_batch, max_input_chars=max_input_chars,
                        max_inflight=max_inflight, max_buffered_bytes=max_buffered_bytes,
                        max_connections=max_connections, body_timeout_s=body_timeout, header_timeout_s=header_timeout,
                        max_tokens=max_tokens, max_prompt_tokens=max_prompt_tokens, max_generations=max_generations)
        online = OnlineCalibrationConfig(enabled=online_calibration, every=calib_every, cpu_share=calib_cpu_share,
                                         buffer_size=calib_buffer, min_inputs=min(128, calib_buffer),
                                         sources=tuple(calib_from or ()))
        key = api_key or os.environ.get(API_KEY_ENV)
        if not key:
            key = secrets.token_urlsafe(24)
            log.warning("no --api-key or $%s: generated API key for this run: %s", API_KEY_ENV, key)
        service = ModelService(store, key, limits=limits, online=online, kv_cache=kv_cache.value, lm=lm)
        log.info("serving store %s on http://%s:%d (docs at /docs)", service.store.root, host, port)
        try:
            run(create_app(service), host=host, port=port)
        finally:
            service.shutdown()
