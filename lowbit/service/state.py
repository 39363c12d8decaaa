"""The service's state and operations, independent of HTTP: store, serving model, jobs, online
calibration, limits, metrics. ``app.py`` is a thin layer of routes over a :class:`ModelService`."""

from __future__ import annotations

import json
import logging
import re
import threading
from pathlib import Path
from typing import Any

from lowbit.config import build_config
from lowbit.errors import ConfigError, LowbitError
from lowbit.io.atomic import atomic_write_text
from lowbit.service.active import WARMUP_SENTENCE, ActiveModel, Serving
from lowbit.service.batching import Batcher
from lowbit.service.embed import embed
from lowbit.service.errors import Conflict, ModelUnavailable, NoActiveModel, NotRecorded
from lowbit.service.generate import KV_CHOICES, GenerationGate
from lowbit.service.generate import warmup as lm_warmup
from lowbit.service.jobs import Job, JobRunner
from lowbit.service.limits import BufferedBytes, Gate, Limits
from lowbit.service.metrics import ServiceMetrics, _labels
from lowbit.service.online_calibration import OnlineCalibrationConfig, OnlineCalibrator
from lowbit.service.quantize_job import quantize_task
from lowbit.service.store import DEFAULT_MODEL_ID, ModelStore, StoreEntry, validate_id

log = logging.getLogger(__name__)

ACTIVE_FILE = ".active.json"  # hidden: not a model folder; remembers the active id across restarts


def entry_summary(entry: StoreEntry, active_ids: tuple[str | None, ...]) -> dict[str, Any]:
    m = entry.metadata
    out: dict[str, Any] = {"id": entry.id, "available": entry.available, "reason": entry.reason,
                           "active": entry.id in active_ids}  # reason: store-relative (ModelStore.public)
    if m is not None:
        out.update(is_quantized=m.is_quantized, model=m.model, task=m.task, scheme=m.scheme, bits=m.bits,
                   granularity=m.granularity, sizes=m.sizes, fidelity=m.fidelity, created_at=m.created_at)
    return out


class ModelService:
    def __init__(self, store_dir: str | Path, api_key: str, limits: Limits | None = None,
                 online: OnlineCalibrationConfig | None = None, register_default: bool = True,
                 activate: bool = True, kv_cache: str = "int8", lm: str | None = None):
        if kv_cache not in KV_CHOICES:
            raise ConfigError(f"kv_cache must be one of {', '.join(KV_CHOICES)}, got {kv_cache!r}")
        if not api_key:
            raise ConfigError("an API key is required (pass one, set LOWBIT_API_KEY, or let `lowbit serve` generate one)")
        self.api_key = api_key
        self.limits = limits or Limits()
        self.metrics = ServiceMetrics()
        self.store = ModelStore(store_dir)
        if register_default:
            self.store.ensure_default()
        self.gate = Gate(self.limits)
        self.buffered = BufferedBytes()  # request bodies held now (BodyLimitMiddleware)
        self.connections: set = set()  # open sockets, filled by server.py's protocol
        self.active = ActiveModel("encoder")  # serves /embed, /v1/embeddings
        self.active_lm = ActiveModel("causal-lm")  # serves /v1/completions, /v1/chat/completions
        self.kv_cache = kv_cache
        self.generations = GenerationGate(self.limits.max_generations)
        self.batcher = Batcher(self.gate.executor.submit, self.serving, max_inputs=self.limits.max_batch)
        self.jobs = JobRunner(self.limits.max_queued_jobs,
                              on_finish=lambda job: self.metrics.jobs.inc(kind=job.kind, status=job.status))
        self.calibrator = OnlineCalibrator(online or OnlineCalibrationConfig(), self.active, self.gate.run_blocking,
                                           on_outcome=self._on_calibration, on_accept=self._accept_recalibration)
        self._submit_lock = threading.Lock()
        self._register_gauges()
        if activate:
            self._activate_initial(lm)

    def _on_calibration(self, outcome: str) -> None:
        self.metrics.calib_runs.inc(outcome=outcome)
        if outcome == "accepted":
            self.metrics.swaps.inc(kind="recalibrate")

    # ---- activation ----------------------------------------------------------------------------
    def _read_record(self) -> dict:
        try:
            record = json.loads((self.store.root / ACTIVE_FILE).read_text())
        except (OSError, ValueError):
            return {}
        return record if isinstance(record, dict) else {}

    def _activate_initial(self, lm: str | None = None) -> None:
        """The encoder (and causal LM) recorded in ``.active.json``; else the first loadable encoder. An LM
        is served at start only when recorded or named (``lowbit serve --lm ID``)."""
        record = self._read_record()
        wanted = [record["id"]] if isinstance(record.get("id"), str) else []
        wanted += [DEFAULT_MODEL_ID] + [e.id for e in self.store.entries()
                                        if e.available and e.metadata.task != "causal-lm"]
        for model_id in dict.fromkeys(wanted):
            try:
                self.activate(model_id, persist=False)
                break
            except LowbitError as exc:
                log.warning("not serving %r at start: %s", model_id, exc)
        else:
            log.error("no loadable encoder model in %s: /embed answers 503 until one is activated", self.store.root)
        lm_id = lm or record.get("lm")
        if isinstance(lm_id, str):
            try:
                if self.slot_for(lm_id) is not self.active_lm:
                    raise ModelUnavailable(f"model {lm_id!r} is not a causal LM")
                self.activate(lm_id, persist=lm is not None)
            except LowbitError as exc:
                log.warning("not serving causal LM %r at start: %s", lm_id, exc)

    def slot_for(self, model_id: str) -> ActiveModel:
        """The encoder slot or the causal-LM slot, from the task ``metadata.json`` records."""
        entry = self.store.entry(model_id)
        task = entry.metadata.task if entry.metadata is not None else ""
        return self.active_lm if task == "causal-lm" else self.active

    def activate(self, model_id: str, persist: bool = True) -> Serving:
        """Load ``model_id`` fully, warm it up, record it in ``.active.json``, then switch to it; on any
        failure (the record included) nothing changes. Refused while a quantize job writes ``model_id``."""
        validate_id(model_id)
        self._refuse_if_being_written(model_id)  # early, before the load; again under the lock below
        slot = self.slot_for(model_id)

        def commit() -> None:
            with self._submit_lock:  # a job cannot be submitted for model_id between this check and the switch
                self._refuse_if_being_written(model_id)
                if persist:
                    self._record_active(model_id, slot)

        if slot is self.active_lm:
            warmup = lambda m: lm_warmup(m, self.kv_cache)  # noqa: E731  (returns the usable KV cache)
        else:
            warmup = lambda m: embed(m, [WARMUP_SENTENCE])  # noqa: E731
        try:
            serving = slot.activate(model_id, self.store.load, warmup, commit)
        except ModelUnavailable:
            self.metrics.activation_failures.inc()
            raise
        self.metrics.swaps.inc(kind="activate")
        return serving

    def _record_active(self, model_id: str, slot: ActiveModel | None = None) -> None:
        """Write ``.active.json``: ``{"id": encoder}``, plus ``"lm": causal LM`` when one is active."""
        path = self.store.root / ACTIVE_FILE
        enc, lm = self.active.current(), self.active_lm.current()
        record = {"id": enc.model_id if enc else None, "lm": lm.model_id if lm else None}
        record["lm" if slot is self.active_lm else "id"] = model_id
        record = {k: v for k, v in record.items() if v is not None}
        try:
            atomic_write_text(path, json.dumps(record))
        except OSError as exc:
            log.error("could not write %s: %s", path, exc)
            raise NotRecorded(f"could not record {model_id!r} as the active model ({exc.strerror or type(exc).__name__}); "
                              "nothing changed: the previous model still serves") from None

    def _writing_job(self, model_id: str) -> Job | None:
        for job in self.jobs.list():
            if job.status in ("queued", "running") and job.params.get("target_id") == model_id:
                return job
        return None

    def _refuse_if_being_written(self, model_id: str) -> None:
        job = self._writing_job(model_id)
        if job is not None:
            raise Conflict(f"model {model_id!r} is being written by quantize job {job.id} ({job.status}); "
                           "activate it when the job has finished")

    def _refuse_if_active(self, model_id: str) -> None:
        if model_id in self.active_ids():
            raise Conflict(f"model {model_id!r} is active; activate another model before replacing it")

    # ---- online recalibration, persisted -------------------------------------------------------
    def _version_id(self, model_id: str) -> str:
        """The next free ``<base>-rN`` id for a recalibrated version of ``model_id``."""
        base = re.sub(r"-r\d+$", "", model_id)[:56]
        k = 1
        while f"{base}-r{k}" in self.store:
            k += 1
        return f"{base}-r{k}"

    def _accept_recalibration(self, serving: Serving, candidate, info: dict, calib: list[str]) -> Serving | None:
        """Save an accepted candidate as a new store version (lineage in its metadata.json), record it in
        ``.active.json``, then serve it; with ``persist`` off, swap the parameters in memory only."""
        if not self.calibrator.config.persist:
            return self.active.replace_model(serving, candidate, info)
        from lowbit.algorithms._calib import calibration_info

        if self.active.current() is not serving:
            return None
        new_id = self._version_id(serving.model_id)
        pick = lambda *keys: {k: info[k] for k in keys if k in info}  # noqa: E731
        lineage = {**calibration_info([calib], "online traffic (buffered /embed inputs)"),
                   "parent_id": serving.model_id, "recalibrated_at": info.get("at"),
                   "before": pick("cos_mean_before", "cos_min_before", "reference_cos_mean_before",
                                  "reference_cos_min_before"),
                   "after": pick("cos_mean_after", "cos_min_after", "reference_cos_mean_after", "reference_cos_min_after"),
                   "n_holdout": info.get("n_holdout"), "n_reference": info.get("n_reference")}
        fidelity = {"cos_mean": info.get("reference_cos_mean_after"), "cos_min": info.get("reference_cos_min_after"),
                    "n_sentences": info.get("n_reference"), "reference": "fp32 base model",
                    "data": "lowbit.data.eval_sentences"}
        candidate.source = f"online recalibration of store model {serving.model_id!r}"
        meta = self.store.save(candidate, new_id, fidelity=fidelity, calibration=lineage)
        candidate.lowbit_metadata = meta
        log.info("online recalibration of %s saved as %s", serving.model_id, new_id)

        def commit() -> None:
            with self._submit_lock:
                self._record_active(new_id)

        return self.active.replace_model(serving, candidate, {**info, "parent_id": serving.model_id},
                                         model_id=new_id, metadata=meta, commit=commit)

    def rollback(self) -> Serving:
        """Activate the parent of the active model (a version saved by online recalibration)."""
        cur = self.serving()
        parent = getattr(cur.metadata.calibration, "parent_id", None) if cur.metadata.calibration else None
        if not parent:
            raise Conflict(f"the active model {cur.model_id!r} has no parent version to roll back to (only versions "
                           "saved by online recalibration record one)")
        return self.activate(parent)

    def active_ids(self) -> tuple[str | None, ...]:
        """Ids of the active encoder and the active causal LM (None where a slot is empty)."""
        return tuple(s.model_id if s else None for s in (self.active.current(), self.active_lm.current()))

    def serving_lm(self) -> Serving:
        s = self.active_lm.current()
        if s is None:
            raise NoActiveModel("no causal LM is active; activate one of the store's causal-lm models with "
                                "POST /models/{id}/activate")
        return s

    def describe_active(self) -> dict[str, Any]:
        """The active encoder's description (top level, as before) and the active causal LM under ``lm``."""
        enc, lm = self.active.current(), self.active_lm.current()
        if enc is None and lm is None:
            self.serving()  # 503: nothing serves
        out: dict[str, Any] = enc.describe() if enc else {"id": None, "is_quantized": None, "revision": None}
        out["lm"] = lm.describe() if lm else None
        return out

    def serving(self) -> Serving:
        s = self.active.current()
        if s is None:
            raise NoActiveModel("no model is active; activate one with POST /models/{id}/activate")
        return s

    # ---- store ---------------------------------------------------------------------------------
    def list_models(self) -> list[dict[str, Any]]:
        ids = self.active_ids()
        return [entry_summary(e, ids) for e in self.store.entries()]

    def model_info(self, model_id: str) -> dict[str, Any]:
        entry = self.store.entry(model_id)
        out = entry_summary(entry, self.active_ids())
        if entry.metadata is not None:  # source and other strings may hold a server path
            out["metadata"] = json.loads(self.store.public(entry.metadata.model_dump_json()))  # utf-8, unescaped
        return out

    # ---- jobs ----------------------------------------------------------------------------------
    def submit_quantize(self, source_id: str, scheme: str, options: dict | None, target_id: str | None,
                        calib: int | None, calibration: str, overwrite: bool) -> Job:
        """Validate everything that can be validated now (4xx at once), then queue the job."""
        entry = self.store.entry(source_id)
        if not entry.available:
            raise ModelUnavailable(f"model {source_id!r} is unavailable: {entry.reason}")
        if entry.metadata.is_quantized:
            raise ConfigError(f"model {source_id!r} is already quantized ({entry.metadata.scheme}); "
                              "quantize an fp32 model")
        config = build_config(scheme, options or {})
        if target_id is None:
            target_id = re.sub(r"[^A-Za-z0-9._-]", "-", f"{source_id}-{scheme}")[:64]
        validate_id(target_id)
        if target_id == source_id:
            raise Conflict(f"target id {target_id!r} is the source; choose another target_id")
        if calib is not None and calib < 1:
            raise ConfigError(f"calib must be at least 1 sample, got {calib}")
        data = None
        if calibration == "traffic":
            data = self.calibrator.buffered_batches()
            if not data:
                raise ConfigError("calibration='traffic' but the traffic buffer is empty (start the service with "
                                  "online calibration enabled and send some /embed requests first)")
        elif calibration != "builtin":
            raise ConfigError(f"calibration must be 'builtin' or 'traffic', got {calibration!r}")
        with self._submit_lock:
            self._refuse_if_active(target_id)
            if target_id in self.store and not overwrite:
                raise Conflict(f"model {target_id!r} already exists; pass overwrite=true to replace it")
            job = self._writing_job(target_id)
            if job is not None:
                raise Conflict(f"job {job.id} is already writing {target_id!r}")
            params = {"source_id": source_id, "target_id": target_id, "scheme": scheme, "options": options or {},
                      "calib": calib, "calibration": calibration, "overwrite": overwrite}
            # Activating target_id is refused while this job is queued or running (see activate); the job
            # checks once more before it writes, so the served model's folder is never replaced.
            return self.jobs.submit("quantize", params, lambda progress: quantize_task(
                self.store, source_id, target_id, config, calib=calib, calibration_data=data,
                overwrite=overwrite, progress=progress, before_save=lambda: self._refuse_if_active(target_id)))

    # ---- metrics -------------------------------------------------------------------------------
    def _register_gauges(self) -> None:
        r = self.metrics.registry

        def active_info():
            s = self.active.current()
            if s is None:
                return {}
            return {_labels({"id": s.model_id, "is_quantized": str(s.is_quantized).lower(),
                             "scheme": s.metadata.scheme or "fp32"}): 1.0}

        def store_counts():
            entries = self.store.entries()
            ok = sum(e.available for e in entries)
            return {_labels({"state": "available"}): ok, _labels({"state": "unavailable"}): len(entries) - ok}

        def calib_buffer():
            st = self.calibrator.status()["buffer"]
            return {_labels({"buffer": k}): v for k, v in st.items()}

        def calib_last():
            h = list(self.calibrator.history)
            if not h:
                return {}
            last = h[-1]
            return {_labels({"outcome": last["outcome"], "reason": last["reason"][:200]}): last["started_at"]}

        def calib_cos():
            h = [x for x in self.calibrator.history if "cos_mean_after" in x]
            if not h:
                return {}
            return {_labels({"model": "before"}): h[-1]["cos_mean_before"],
                    _labels({"model": "candidate"}): h[-1]["cos_mean_after"]}

        r.gauge("lowbit_active_model_info", "the serving model (value 1), with its id and quantization", active_info)
        def lm_info():
            s = self.active_lm.current()
            if s is None:
                return {}
            return {_labels({"id": s.model_id, "is_quantized": str(s.is_quantized).lower(),
                             "scheme": s.metadata.scheme or "fp32", "kv_cache": s.kv_cache or "none"}): 1.0}

        r.gauge("lowbit_active_lm_info", "the serving causal LM (value 1), with its id, quantization and KV cache",
                lm_info)
        r.gauge("lowbit_active_generations", "generations running now",
                lambda: {(): float(self.generations.active)})
        r.gauge("lowbit_active_model_revision", "increments on every swap of the serving model",
                lambda: {(): float(self.active.current().revision)} if self.active.current() else {})
        r.gauge("lowbit_batched_requests", "requests that shared a forward pass with others (dynamic batching)",
                lambda: {(): float(self.batcher.batched_requests)})
        r.gauge("lowbit_forward_groups", "forward groups run by the dynamic batcher",
                lambda: {(): float(self.batcher.passes)})
        r.gauge("lowbit_inflight_requests", "embedding requests admitted and not finished",
                lambda: {(): float(self.gate.inflight)})
        r.gauge("lowbit_buffered_body_bytes", "bytes of request bodies held now, all requests together",
                lambda: {(): float(self.buffered.now)})
        r.gauge("lowbit_open_connections", "open client sockets (server.py's protocol)",
                lambda: {(): float(len(self.connections))})
        r.gauge("lowbit_store_models", "model folders in the store by state", store_counts)
        r.gauge("lowbit_online_calibration_buffer_inputs", "inputs held for online calibration", calib_buffer)
        r.gauge("lowbit_online_calibration_last_timestamp_seconds",
                "when the last online recalibration attempt started, labelled with its outcome and reason", calib_last)
        r.gauge("lowbit_online_calibration_cos_mean", "held-out cosine vs fp32 of the last validated attempt",
                calib_cos)

    def shutdown(self) -> None:
        self.calibrator.shutdown()
        self.jobs.shutdown()
        self.gate.shutdown()
        self.generations.shutdown()
