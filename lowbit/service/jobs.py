"""Background jobs (quantize a model, ...) run one at a time on a worker thread, with progress.

``JobRunner.submit(kind, params, fn)`` queues ``fn(progress)``; ``progress(stage, fraction)``
updates what ``GET /jobs/{id}`` reports. A job ends ``succeeded`` with ``fn``'s JSON-able result, or
``failed`` with the error message (a :class:`LowbitError` message verbatim, anything else prefixed
with its type). At most ``max_queued`` jobs wait; more are refused with :class:`Overloaded`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from lowbit.errors import LowbitError
from lowbit.service.errors import NotFound, Overloaded

log = logging.getLogger(__name__)

KEEP_FINISHED = 100  # finished jobs remembered for GET /jobs/{id}

Progress = Callable[[str, float], None]


@dataclass
class Job:
    id: str
    kind: str
    params: dict[str, Any]
    status: str = "queued"  # queued | running | succeeded | failed
    stage: str = "queued"
    progress: float = 0.0  # 0..1
    error: str | None = None
    result: dict[str, Any] | None = None
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class JobRunner:
    def __init__(self, max_queued: int = 4, on_finish: Callable[[Job], None] | None = None):
        self.max_queued = max_queued
        self.on_finish = on_finish
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="lowbit-jobs", daemon=True)
        self._thread.start()

    def submit(self, kind: str, params: dict[str, Any], fn: Callable[[Progress], dict | None]) -> Job:
        with self._lock:
            waiting = sum(1 for j in self._jobs.values() if j.status == "queued")
            if waiting >= self.max_queued:
                raise Overloaded(f"{waiting} jobs already queued (limit {self.max_queued}); retry when one finishes")
            job = Job(uuid.uuid4().hex[:16], kind, params)
            self._jobs[job.id] = job
            self._trim()
        self._queue.put((job, fn))
        return job

    def get(self, job_id: str) -> Job:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r} (finished jobs are kept for the last {KEEP_FINISHED})")
        return job

    def list(self) -> list[Job]:
        with self._lock:
            return list(self._jobs.values())

    def wait(self, job_id: str, timeout: float) -> Job:
        """Block until the job finishes (for tests and scripts)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            job = self.get(job_id)
            if job.status in ("succeeded", "failed"):
                return job
            time.sleep(0.05)
        return self.get(job_id)

    def _trim(self) -> None:
        finished = [k for k, j in self._jobs.items() if j.status in ("succeeded", "failed")]
        for k in finished[: max(0, len(finished) - KEEP_FINISHED)]:
            del self._jobs[k]

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                job, fn = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            self._run(job, fn)

    def _run(self, job: Job, fn: Callable[[Progress], dict | None]) -> None:
        def progress(stage: str, fraction: float) -> None:
            job.stage, job.progress = stage, max(job.progress, min(1.0, float(fraction)))

        job.status, job.started_at = "running", time.time()
        log.info("job %s (%s) started: %s", job.id, job.kind, job.params)
        try:
            job.result = fn(progress) or {}
            job.status, job.stage, job.progress = "succeeded", "done", 1.0
            log.info("job %s succeeded", job.id)
        except LowbitError as exc:
            job.status, job.error = "failed", str(exc)
            log.warning("job %s failed: %s", job.id, exc)
        except Exception as exc:  # a bug or resource error: report it, keep the worker alive
            job.status, job.error = "failed", f"{type(exc).__name__}: {exc}"
            log.exception("job %s failed unexpectedly", job.id)
        job.finished_at = time.time()
        if self.on_finish:
            self.on_finish(job)

    def shutdown(self) -> None:
        self._stop.set()
