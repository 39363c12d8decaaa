"""Which model serves, and the hot swap.

Requests take one :class:`Serving` snapshot (``ActiveModel.current()``, a single attribute read)
and use that model to the end, so a swap never changes the model under a request in flight. A
swap loads and warms up the new model fully *before* replacing the reference under a lock; if
anything fails the reference is untouched and the error says why (Triton's model-control
semantics: load, then switch).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from torch import nn

from lowbit.io.metadata import ModelMetadata
from lowbit.service.errors import ModelUnavailable

log = logging.getLogger(__name__)

WARMUP_SENTENCE = "lowbit warm-up: load, run once, then switch."


@dataclass(frozen=True)
class Serving:
    """An immutable snapshot of the serving model; ``revision`` grows with every swap."""

    model_id: str
    model: nn.Module
    metadata: ModelMetadata
    revision: int
    activated_at: float
    recalibration: dict[str, Any] | None = field(default=None)  # set when online calibration swapped params
    kv_cache: str | None = field(default=None)  # causal LMs: the KV cache generation uses (int8, ..., none)

    @property
    def is_quantized(self) -> bool:
        return bool(self.metadata.is_quantized)

    def describe(self) -> dict[str, Any]:
        m = self.metadata
        return {"id": self.model_id, "is_quantized": m.is_quantized, "scheme": m.scheme, "bits": m.bits,
                "granularity": m.granularity, "model": m.model, "task": m.task, "revision": self.revision,
                "activated_at": self.activated_at, "sizes": m.sizes, "fidelity": m.fidelity,
                "recalibration": self.recalibration, **({"kv_cache": self.kv_cache} if self.kv_cache else {})}


TASK_USE = {"encoder": "sentence embeddings", "causal-lm": "text generation"}


class ActiveModel:
    """Holds the current :class:`Serving` of one task (one slot for the encoder, one for the causal
    LM); swaps are serialized, reads are lock-free."""

    def __init__(self, task: str = "encoder"):
        self.task = task
        self._current: Serving | None = None
        self._swap_lock = threading.Lock()  # guards _current and _revision
        self._load_lock = threading.Lock()  # one activation loads at a time (bounds memory)
        self._revision = 0

    def current(self) -> Serving | None:
        return self._current

    def activate(self, model_id: str, load: Callable[[str], nn.Module],
                 warmup: Callable[[nn.Module], Any], commit: Callable[[], None] | None = None) -> Serving:
        """Load ``model_id`` with ``load``, run ``warmup`` on it, then make it the serving model.

        ``commit()`` runs under the swap lock just before the switch (checks, the ``.active.json``
        record); if it raises, nothing is switched and the error propagates. For a causal LM,
        ``warmup`` returns the KV cache it found usable (kept in :attr:`Serving.kv_cache`).
        """
        with self._load_lock:
            model = load(model_id)
            if getattr(model, "task", None) != self.task:
                raise ModelUnavailable(f"model {model_id!r} is a {getattr(model, 'task', '?')} model; this slot "
                                       f"serves {self.task} models ({TASK_USE.get(self.task, self.task)})")
            try:
                kv = warmup(model)
            except Exception as exc:  # a model that cannot run is not swapped in
                raise ModelUnavailable(f"model {model_id!r} failed its warm-up forward: "
                                       f"{type(exc).__name__}: {exc}") from None
            with self._swap_lock:
                if commit is not None:
                    commit()
                self._revision += 1
                new = Serving(model_id, model, model.lowbit_metadata, self._revision, time.time(),
                              kv_cache=kv if isinstance(kv, str) else None)
                old, self._current = self._current, new
            log.info("active model: %s (revision %d, %s)%s", model_id, new.revision,
                     new.metadata.scheme or "fp32", f", was {old.model_id}" if old else "")
            return new

    def replace_model(self, expected: Serving, model: nn.Module, recalibration: dict, *, model_id: str | None = None,
                      metadata: ModelMetadata | None = None, commit: Callable[[], None] | None = None) -> Serving | None:
        """Swap in new parameters if ``expected`` is still serving (else None): under the same id, or as
        the saved version ``model_id`` with its ``metadata``. ``commit()`` runs under the swap lock just
        before the switch; if it raises, nothing is switched."""
        with self._swap_lock:
            if self._current is not expected:
                return None
            if commit is not None:
                commit()
            self._revision += 1
            self._current = replace(expected, model=model, revision=self._revision, recalibration=recalibration,
                                    model_id=model_id or expected.model_id, metadata=metadata or expected.metadata,
                                    activated_at=time.time() if model_id else expected.activated_at)
            return self._current
