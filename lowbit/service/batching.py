"""Dynamic batching: requests that wait for the compute thread are embedded together in one pass.

While a forward pass runs, new requests queue; when the compute thread frees up it takes every
waiting request (up to ``max_inputs`` sentences) and embeds them as one batch, then hands each
request its own rows. Nothing waits on a timer, so a lone request is not delayed; under
concurrency the forward passes get larger and fewer (TEI's and Triton's dynamic batching). Every
request of a batch gets the same serving snapshot, so each response still names the one model
that computed it. Requests with ``truncate=False`` run alone, so one too-long input fails only its
own request.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Callable

import torch

from lowbit.service.active import Serving
from lowbit.service.embed import embed_counted

Result = tuple[Serving, torch.Tensor, list[int]]  # (snapshot, embeddings (n, D), tokens per input)


class Batcher:
    def __init__(self, submit: Callable[..., Future], serving: Callable[[], Serving], max_inputs: int):
        self._submit = submit  # run a function on the compute threads
        self._serving = serving
        self.max_inputs = max_inputs
        self._pending: list[tuple[list[str], bool, Future]] = []
        self._lock = threading.Lock()
        self._draining = False
        self.passes = 0  # forward groups run (for tests and metrics)
        self.batched_requests = 0  # requests that shared a pass with another

    def embed(self, sentences: list[str], truncate: bool = True) -> Future:
        """A future of (serving snapshot, embeddings, token counts) for ``sentences``."""
        fut: Future = Future()
        with self._lock:
            self._pending.append((sentences, truncate, fut))
            start = not self._draining
            self._draining = True
        if start:
            self._submit(self._drain)
        return fut

    def _take(self) -> list[tuple[list[str], bool, Future]]:
        with self._lock:
            if not self._pending:
                self._draining = False
                return []
            group = [self._pending.pop(0)]
            if group[0][1]:  # truncating requests can share a pass
                total = len(group[0][0])
                rest = []
                for item in self._pending:
                    if item[1] and total + len(item[0]) <= self.max_inputs:
                        group.append(item)
                        total += len(item[0])
                    else:
                        rest.append(item)
                self._pending = rest
            return group

    def _drain(self) -> None:
        """One group per compute task; re-queued behind other compute work (online calibration) if more wait."""
        group = self._take()
        if not group:
            return
        self.passes += 1
        if len(group) > 1:
            self.batched_requests += len(group)
        try:
            serving = self._serving()
            sentences = [s for sents, _, _ in group for s in sents]
            emb, counts = embed_counted(serving.model, sentences, group[0][1])  # (sum n, D)
        except BaseException as exc:  # every request of the group gets the error
            for _, _, fut in group:
                fut.set_exception(exc)
        else:
            start = 0
            for sents, _, fut in group:
                n = len(sents)
                fut.set_result((serving, emb[start:start + n], counts[start:start + n]))
                start += n
        finally:
            with self._lock:
                more = bool(self._pending)
                self._draining = more
            if more:
                self._submit(self._drain)
