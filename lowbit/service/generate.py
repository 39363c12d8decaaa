"""Text generation from a served causal LM: prompt building, a hand decode loop over the model's own
forward with a (quantized) KV cache, greedy or temperature / top-p sampling, stop strings, cancellation.

One :func:`generate` call runs on a generation thread (``GenerationGate``): it prefills the prompt in
one forward, then feeds one token at a time through the cache. Between tokens it checks a
``threading.Event``; when the HTTP side sets it (client gone) the loop stops and the thread is free.

Sampling at temperature ``t > 0`` draws from ``softmax(logits / t)`` restricted to the smallest set
of most likely tokens whose probability sums to at least ``top_p`` (nucleus sampling, Holtzman et al.
2020); ``t == 0`` is greedy (argmax). A ``seed`` makes a sampled generation reproducible (a private
``torch.Generator``; the global RNG is never touched).

The KV cache is ``lowbit.nn.kv_cache``'s KIVI-style :class:`~lowbit.nn.kv_cache.QuantizedKVCache`
(``--kv-cache int8|int4|int2``) or a plain cache (``none``); a model whose warm-up fails with the
quantized cache is served with the plain one (reported in ``/models/active``). ``--kv-cache fast``
decodes with :class:`lowbit.models.decode.Decoder` instead (built once at warm-up; each generation
runs on a fork of it with its own fp32 cache): the same weight-only arithmetic, one C call per token
(Llama / Mistral / Qwen2 with 4/8-bit block layouts; other models fall back to the int8 cache).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from lowbit.errors import ConfigError
from lowbit.service.errors import InputTooLarge, Overloaded

log = logging.getLogger(__name__)

KV_CHOICES = ("int8", "int4", "int2", "int8-rot", "int4-rot", "int2-rot", "none", "fast")  # -rot: Hadamard basis
FAST = "fast"  # lowbit.models.decode.Decoder: fp32 KV cache, one C call per token over all layers
PLAIN_ROLES = ("system", "user", "assistant")
WARMUP_PROMPT = "lowbit warm-up"


@dataclass(frozen=True)
class SamplingParams:
    """What one generation does: at most ``max_tokens`` new tokens, greedy when ``temperature == 0``."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class GenerationResult:
    text: str
    finish_reason: str  # stop | length | cancelled
    prompt_tokens: int
    completion_tokens: int
    seconds: float  # decode time, prefill included


# ---- prompts ------------------------------------------------------------------------------------

def chat_prompt(tokenizer, messages: list[dict[str, str]]) -> tuple[str, bool]:
    """The prompt text for ``messages`` and whether it came from the tokenizer's chat template.

    With a template: ``apply_chat_template(..., add_generation_prompt=True)``. Without one: each
    message as a ``"role: content"`` line, then ``"assistant:"`` for the model to continue."""
    template = getattr(tokenizer, "chat_template", None)
    if template:
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # a template that raises on these messages (roles it refuses, ...)
            raise ConfigError(f"the model's chat template refused these messages: {type(exc).__name__}: {exc}") from None
        return str(text), True
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:", False


def encode_prompt(tokenizer, text: str, templated: bool) -> list[int]:
    """Token ids of ``text``: a templated chat prompt already holds its special tokens."""
    return list(tokenizer(text, add_special_tokens=not templated)["input_ids"])


def context_length(model: nn.Module) -> int:
    """Tokens the model can attend to (prompt + completion): its position table, else 2048."""
    cfg = model.lm.config.get_text_config(decoder=True)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return 2048


def eos_ids(model: nn.Module) -> set[int]:
    out: set[int] = set()
    for src in (getattr(model.lm, "generation_config", None), model.lm.config, model.tokenizer):
        v = getattr(src, "eos_token_id", None)
        if isinstance(v, int):
            out.add(v)
        elif isinstance(v, (list, tuple)):
            out.update(int(x) for x in v)
    return out


# ---- decoding -----------------------------------------------------------------------------------

def build_fast_decoder(model: nn.Module) -> None:
    """Attach lowbit's fast decoder (:class:`lowbit.models.decode.Decoder`, exact weight-only math) to
    ``model``; generations decode on forks of it. ConfigError for families it does not run."""
    from lowbit.models.decode import Decoder

    model._lowbit_decoder = Decoder(model, max_len=context_length(model))


def make_kv_cache(model: nn.Module, kv: str):
    from lowbit.nn.kv_cache import make_cache

    return make_cache(model.lm.config, None if kv == "none" else kv)


def next_token(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> int:
    """Greedy or nucleus-sampled next token from ``logits`` (V,)."""
    if p.temperature == 0.0:
        return int(torch.argmax(logits))
    z = logits.double()
    probs = torch.softmax((z - z.max()) / p.temperature, dim=-1)  # (V,); max first: a tiny t gives 0/t, not inf/inf
    if p.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)  # (V,), (V,)
        before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # mass of the strictly more likely tokens
        sorted_p[before >= p.top_p] = 0.0  # keep the smallest prefix reaching top_p (at least one token)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=gen))


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Characters at the end of ``text`` that could begin a stop string (not streamed yet)."""
    keep = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                keep = max(keep, k)
                break
    return keep


def generate(model: nn.Module, prompt_ids: list[int], p: SamplingParams, kv: str,
             cancel: threading.Event | None = None, on_text: Callable[[str], None] | None = None) -> GenerationResult:
    """Decode up to ``p.max_tokens`` tokens after ``prompt_ids``; ``on_text(piece)`` gets the new text
    as it becomes final (UTF-8 complete, not a possible start of a stop string)."""
    tok = model.tokenizer
    lm = model.lm
    eos = eos_ids(model)
    gen = None
    if p.temperature > 0:
        gen = torch.Generator().manual_seed(p.seed if p.seed is not None else int(torch.randint(0, 2**62, ()).item()))
    decoder = model._lowbit_decoder.fork() if kv == FAST else None
    cache = None if decoder is not None else make_kv_cache(model, kv)
    pos = len(prompt_ids)

    def step(ids: torch.Tensor, start: int) -> torch.Tensor:
        """Logits (V,) after ``ids`` (1, T) placed at positions ``start ..`` of this generation's cache."""
        if decoder is not None:
            return decoder.forward(ids, start)[0]
        return lm(input_ids=ids, cache=cache, use_cache=True).logits[0, -1]

    out_ids: list[int] = []
    text, sent, finish = "", 0, "length"
    start = time.perf_counter()
    with torch.inference_mode():
        ids = torch.tensor([prompt_ids], dtype=torch.long)  # (1, T)
        logits = step(ids, 0)  # (V,)
        while len(out_ids) < p.max_tokens:
            if cancel is not None and cancel.is_set():
                finish = "cancelled"
                break
            t = next_token(logits, p, gen)
            if t in eos:
                finish = "stop"
                break
            out_ids.append(t)
            text = tok.decode(out_ids, skip_special_tokens=True)
            hit = min((i for i in (text.find(s) for s in p.stop) if i >= 0), default=-1)
            if hit >= 0:
                text, finish = text[:hit], "stop"
                break
            if not text.endswith("\ufffd"):  # an incomplete UTF-8 sequence waits for its next token
                final = len(text) - _held_back(text, p.stop)
                if on_text is not None and final > sent:
                    on_text(text[sent:final])
                sent = max(sent, final)
            if len(out_ids) >= p.max_tokens:
                break
            logits = step(torch.tensor([[t]]), pos)  # (V,)
            pos += 1
    if finish == "length":  # cut inside a multi-byte character: drop the incomplete tail
        text = text.rstrip("\ufffd")
    if finish != "cancelled" and on_text is not None and len(text) > sent:
        on_text(text[sent:])
    return GenerationResult(text, finish, len(prompt_ids), len(out_ids), time.perf_counter() - start)


def warmup(model: nn.Module, kv: str) -> str:
    """Two decode steps with the ``kv`` cache; returns the cache actually usable (``kv``, else ``none``)."""
    if getattr(model, "tokenizer", None) is None:
        raise ConfigError("the model has no tokenizer; a served causal LM needs one to read prompts")
    ids = encode_prompt(model.tokenizer, WARMUP_PROMPT, False) or [0]
    if kv == FAST:
        try:
            build_fast_decoder(model)
        except ConfigError as exc:
            log.warning("the fast decoder does not run this model (%s); serving it with the int8 KV cache", exc)
            kv = "int8"
    try:
        generate(model, ids, SamplingParams(max_tokens=2), kv)
        return kv
    except ConfigError:
        raise
    except Exception as exc:
        if kv == "none":
            raise
        log.warning("the %s KV cache does not run on this model (%s: %s); serving it with a plain cache",
                    kv, type(exc).__name__, exc)
    generate(model, ids, SamplingParams(max_tokens=2), "none")
    return "none"


# ---- admission ----------------------------------------------------------------------------------

class GenerationGate:
    """At most ``limit`` generations at once, each on its own thread; the next is refused (429)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.active = 0
        self._lock = threading.Lock()
        self.executor = ThreadPoolExecutor(limit, thread_name_prefix="lowbit-generate")

    def acquire(self) -> None:
        """Take a slot, or :class:`Overloaded` (429) when ``limit`` generations run."""
        with self._lock:
            if self.active >= self.limit:
                raise Overloaded(f"overloaded: {self.active} generations running (limit {self.limit}); retry shortly")
            self.active += 1

    def release(self) -> None:
        with self._lock:
            self.active -= 1

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


def check_prompt(n_prompt: int, max_tokens: int | None, limit_prompt: int, limit_tokens: int, context: int) -> int:
    """The number of tokens to generate, or :class:`InputTooLarge` naming the limit that is passed."""
    if n_prompt > limit_prompt:
        raise InputTooLarge(f"prompt has {n_prompt} tokens; the limit is {limit_prompt} tokens", "prompt_tokens")
    if n_prompt >= context:
        raise InputTooLarge(f"prompt has {n_prompt} tokens; the model's context is {context} tokens", "prompt_tokens")
    if max_tokens is None:
        return min(limit_tokens, context - n_prompt)
    if max_tokens > limit_tokens:
        raise InputTooLarge(f"max_tokens={max_tokens} exceeds the limit of {limit_tokens}", "max_tokens")
    if n_prompt + max_tokens > context:
        raise InputTooLarge(f"prompt ({n_prompt} tokens) + max_tokens ({max_tokens}) exceeds the model's context of "
                            f"{context} tokens", "max_tokens")
    return max_tokens


__all__ = ["SamplingParams", "GenerationResult", "generate", "warmup", "chat_prompt", "encode_prompt",
           "GenerationGate", "check_prompt", "context_length", "KV_CHOICES", "FAST", "build_fast_decoder"]
