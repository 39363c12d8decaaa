"""On-device (online) calibration while serving (MISSION H.22).

The service keeps a bounded buffer of recent real inputs (sentences); every ``every`` new inputs, or
on demand, a background thread recomputes the active model's activation-dependent parameters from
that buffer, validates the candidate against the fp32 model on a held-out sample of the same
traffic (inputs never used for calibration) *and* on a fixed reference set shipped with lowbit
(``lowbit.data.eval_sentences``), and swaps it in only if it is worse on neither. Every attempt is
recorded (when, outcome, why, cosines before/after) and counted in ``/metrics``.

Traffic can be hostile: a held-out sample of the same traffic cannot tell a candidate fitted to junk
(random CJK, say) from a good one, so the fixed reference set decides too; and operators can
restrict who feeds the buffer with ``sources`` (``"key"``: requests bearing the API key; IP
addresses or networks of clients), see :meth:`OnlineCalibrator.accepts`.

Bounds: the buffers hold at most ``buffer_size`` + ``holdout_size`` inputs of at most
``max_chars`` characters each; the work runs batch by batch on the same compute threads as
requests (so it never runs a forward concurrently with one) and sleeps between batches so that it
takes at most ``cpu_share`` of the compute time; the fp32 reference is loaded once per base model.

Which parameters depend on activations is scheme-specific, so recalibration is a small pluggable
function per config kind, ``RECALIBRATORS[kind](model, reference, batches, run) -> new model``
(never mutating ``model``, which is serving). ``run(fn, *args)`` executes ``fn`` on the compute
threads within the CPU share.
"""

from __future__ import annotations

import copy
import functools
import ipaddress
import logging
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from torch import nn

from lowbit.algorithms._calib import capture_inputs, run_batch
from lowbit.api import set_submodule
from lowbit.errors import ConfigError, LowbitError
from lowbit.service.active import ActiveModel, Serving
from lowbit.service.embed import embed

log = logging.getLogger(__name__)

Run = Callable[..., Any]
OnAccept = Callable[[Serving, nn.Module, dict, list], Any]
Recalibrator = Callable[[nn.Module, nn.Module, list, Run], nn.Module]
RECALIBRATORS: dict[str, Recalibrator] = {}


class NothingToRecalibrate(LowbitError):
    """The serving model has no activation-dependent parameters (the attempt is recorded as skipped)."""


def register_recalibrator(kind: str):
    """Decorator: ``fn(model, reference, batches, run) -> new model`` for configs of ``kind``."""

    def deco(fn: Recalibrator) -> Recalibrator:
        RECALIBRATORS[kind] = fn
        return fn

    return deco


def _input_absmax(reference: nn.Module, layers: dict[str, nn.Module], batches: list, run: Run) -> dict[str, torch.Tensor]:
    """Per-input-channel max |x| entering each of ``layers`` of the fp32 reference, batch by batch."""
    stats: dict[str, torch.Tensor] = {}

    def record(name: str, x: torch.Tensor) -> None:
        m = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float()  # (K,)
        stats[name] = torch.maximum(stats[name], m) if name in stats else m

    def one(batch):
        with torch.inference_mode():
            run_batch(reference, batch)

    with capture_inputs(layers, record):
        for batch in batches:
            run(one, batch)
    return stats


@register_recalibrator("w8a8-dynamic")
def recalibrate_w8a8_dynamic(model: nn.Module, reference: nn.Module, batches: list, run: Run) -> nn.Module:
    """New SmoothQuant factors ``s_j = a_j^alpha / w_j^(1-alpha)`` (Xiao et al. 2023, eq. 4) from traffic.

    W8A8-dynamic quantizes activations per token at run time, so the only activation-dependent
    parameters are the smoothing factors, folded into the int8 weights: each smoothed layer is
    rebuilt from the fp32 reference weight with the new factors (same kernel, same alpha).
    """
    from lowbit.algorithms.smoothing import layer_smoothing_factors
    from lowbit.nn import DynamicQLinear

    cfg = getattr(model, "lowbit_config", None)
    alpha = getattr(cfg, "smooth_alpha", None)
    names = [n for n, m in model.named_modules() if isinstance(m, DynamicQLinear) and m.smooth_inv is not None]
    if alpha is None or not names:
        raise NothingToRecalibrate("quantized without SmoothQuant (alpha none): activations are quantized per "
                                   "token at run time, nothing depends on calibration")
    layers = {}
    for n in names:
        ref = reference.get_submodule(n)
        if not isinstance(ref, nn.Linear):
            raise ConfigError(f"reference has no nn.Linear at {n!r}; cannot rebuild the layer")
        layers[n] = ref
    stats = _input_absmax(reference, layers, batches, run)
    new = run(copy.deepcopy, model)  # on the compute thread: never concurrent with a forward on `model`
    smooth = layer_smoothing_factors(stats, layers, alpha, shared=getattr(cfg, "share_smoothing", True))
    for n in names:
        old = new.get_submodule(n)
        set_submodule(new, n, DynamicQLinear.from_float(layers[n], old.kernel, smooth[n]))
    return new


def requantize(model: nn.Module, reference: nn.Module, batches: list, run: Run) -> nn.Module:
    """Generic recalibration: quantize a fresh copy of the fp32 reference with the serving model's own
    config, calibrated on ``batches``. Right for any scheme whose calibration-dependent parameters come
    from ``lowbit.quantize`` (static W8A8's activation ranges, SmoothQuant factors). It runs on the
    calibration thread, beside the serving threads (the reference is private to it), so ``cpu_share``
    bounds only its validation passes; per-scheme recalibrators that touch only the activation
    parameters are cheaper (see :func:`recalibrate_w8a8_dynamic`)."""
    import lowbit

    config = getattr(model, "lowbit_config", None)
    if config is None:
        raise NothingToRecalibrate("the serving model has no lowbit config to requantize with")
    fresh = copy.deepcopy(reference)
    lowbit.quantize(fresh, config, batches)
    return fresh


# Static W8A8 (``lowbit.algorithms.static``, config kind "w8a8-static"): its calibrated parameters are the
# per-tensor activation ranges (and SmoothQuant factors); they are recomputed by requantizing from fp32.
RECALIBRATORS["w8a8-static"] = requantize


@dataclass
class OnlineCalibrationConfig:
    enabled: bool = False
    buffer_size: int = 512  # most recent distinct calibration inputs kept (repeats are not buffered again)
    holdout_size: int = 64  # most recent held-out inputs kept (validation only, never calibrated on)
    holdout_every: int = 5  # every 5th input goes to the held-out buffer
    max_chars: int = 2000  # characters kept per input (memory bound: sizes x max_chars characters)
    min_inputs: int = 128  # calibration inputs needed before an attempt
    min_holdout: int = 16  # held-out inputs needed before an attempt
    every: int = 1024  # new inputs between automatic attempts (0 = on demand only)
    check_interval_s: float = 2.0  # how often the background thread looks at the counters
    cpu_share: float = 0.25  # fraction of compute time recalibration may use (sleeps the rest)
    batch_size: int = 16  # inputs per calibration / validation forward
    tolerance: float = 0.0  # accept if candidate cos_mean >= current cos_mean - tolerance
    reference_size: int = 32  # fixed reference sentences (lowbit.data.eval_sentences) the candidate must not be worse on
    persist: bool = True  # an accepted candidate becomes a new store version (id-rN) and the active model
    sources: tuple[str, ...] = ()  # who feeds the buffer: "key" and/or client IPs / networks; () = every client

    def __post_init__(self):
        if not 0.0 < self.cpu_share <= 1.0:
            raise ConfigError(f"cpu_share must be in (0, 1], got {self.cpu_share}")
        for name in ("buffer_size", "holdout_size", "holdout_every", "max_chars", "min_inputs", "min_holdout",
                     "batch_size", "reference_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"online calibration {name} must be an integer >= 1, got {v!r}")
        if not isinstance(self.every, int) or isinstance(self.every, bool) or self.every < 0:
            raise ConfigError(f"online calibration every must be an integer >= 0 (0: on demand only), got {self.every!r}")
        if not self.check_interval_s > 0 or not self.tolerance >= 0:
            raise ConfigError(f"online calibration check_interval_s must be > 0 and tolerance >= 0, got "
                              f"{self.check_interval_s!r} and {self.tolerance!r}")
        self.sources = tuple(self.sources)
        for src in self.sources:
            if src != "key":
                try:
                    ipaddress.ip_network(src, strict=False)
                except ValueError:
                    raise ConfigError(f"calibration source {src!r} is neither 'key' nor an IP address or network "
                                      "(e.g. 127.0.0.1, 10.0.0.0/8)") from None
        if self.min_inputs > self.buffer_size or self.min_holdout > self.holdout_size:
            raise ConfigError("online calibration min_inputs/min_holdout cannot exceed buffer_size/holdout_size")


@functools.lru_cache(maxsize=16)
def _networks(sources: tuple[str, ...]) -> tuple:
    return tuple(ipaddress.ip_network(s, strict=False) for s in sources if s != "key")


def _cosines(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    cos = torch.nn.functional.cosine_similarity(a, b, dim=1)  # (N,)
    return float(cos.mean()), float(cos.min())


class OnlineCalibrator:
    """Buffers traffic and recalibrates the active model in the background (see module docstring)."""

    def __init__(self, config: OnlineCalibrationConfig, active: ActiveModel, compute: Callable[..., Any],
                 on_outcome: Callable[[str], None] | None = None, on_accept: OnAccept | None = None):
        self.config = config
        self.active = active
        self.compute = compute  # fn(f, *args) -> f(*args) on the service's compute threads
        self.on_outcome = on_outcome
        # on_accept(serving, candidate, info, calibration_sentences) -> the new Serving, or None if the
        # active model changed meanwhile; default: swap the parameters in memory under the same id.
        self.on_accept = on_accept or (lambda serving, candidate, info, calib: active.replace_model(serving, candidate,
                                                                                                   info))
        self.calib: deque[str] = deque(maxlen=config.buffer_size)
        self.holdout: deque[str] = deque(maxlen=config.holdout_size)
        self.history: deque[dict] = deque(maxlen=20)
        self.seen = 0
        self.since_last = 0
        self.running = False
        self._lock = threading.Lock()  # buffers and counters
        self._run_lock = threading.Lock()  # one attempt at a time
        self._references: dict[str, nn.Module] = {}
        self._reference_set: dict[str, torch.Tensor] = {}  # base model -> fp32 embeddings of the reference sentences
        self._serving_cache: tuple | None = None  # (serving snapshot, n, its embeddings of the reference sentences)
        self.not_from_sources = 0  # inputs not buffered because their client is not in config.sources
        self._wake = threading.Event()
        self._manual = False
        self._stop = threading.Event()
        self._thread = None
        if config.enabled:
            self._thread = threading.Thread(target=self._loop, name="lowbit-online-calib", daemon=True)
            self._thread.start()

    # ---- traffic --------------------------------------------------------------------------------
    def accepts(self, client_host: str | None, has_key: bool) -> bool:
        """Whether a request from ``client_host`` (with or without the API key) may feed the buffer."""
        sources = self.config.sources
        if not sources:
            return True
        if has_key and "key" in sources:
            return True
        try:
            addr = ipaddress.ip_address(client_host or "")
        except ValueError:
            return False
        return any(addr in net for net in _networks(sources) if net.version == addr.version)

    def observe(self, sentences: list[str], client_host: str | None = None, has_key: bool = False) -> None:
        if not self.config.enabled:
            return
        c = self.config
        if not self.accepts(client_host, has_key):
            with self._lock:
                self.not_from_sources += len(sentences)
            return
        with self._lock:
            for s in sentences:
                s = s[: c.max_chars]
                if s in self.calib or s in self.holdout:
                    continue  # a repeated input adds nothing: the buffers hold distinct inputs only
                self.seen += 1
                (self.holdout if self.seen % c.holdout_every == 0 else self.calib).append(s)
                self.since_last += 1
            due = c.every and self.since_last >= c.every
        if due:
            self._wake.set()

    def buffered_batches(self, batch_size: int = 32) -> list[list[str]]:
        """The calibration buffer as batches of sentences (for a quantize job calibrated on traffic)."""
        with self._lock:
            sents = list(self.calib)
        return [sents[i:i + batch_size] for i in range(0, len(sents), batch_size)]

    # ---- the attempt ----------------------------------------------------------------------------
    def _run(self, fn: Callable, *args: Any) -> Any:
        """``fn(*args)`` on the compute threads, then sleep so this work stays within ``cpu_share``."""
        start = time.perf_counter()
        out = self.compute(fn, *args)
        busy = time.perf_counter() - start
        share = self.config.cpu_share
        if share < 1.0:
            self._stop.wait(busy * (1.0 - share) / share)
        return out

    def _reference(self, base: str) -> nn.Module:
        if base not in self._references:
            from lowbit.models import load_model

            self._references.clear()  # keep one fp32 reference in memory
            self._references[base] = load_model(base)
        return self._references[base]

    def reference_sentences(self) -> list[str]:
        """The fixed reference set every candidate must not be worse on (not traffic: nobody can steer it)."""
        from lowbit.data import eval_sentences

        return eval_sentences(self.config.reference_size)

    def _serving_on_reference(self, serving: Serving, sentences: list[str]) -> torch.Tensor:
        """The serving model's embeddings of the reference set, computed once per serving snapshot."""
        cached = self._serving_cache
        if cached is None or cached[0] is not serving or cached[1] != len(sentences):
            self._serving_cache = cached = (serving, len(sentences), self._embed(serving.model, sentences))
        return cached[2]

    def _reference_embeddings(self, base: str, reference: nn.Module, sentences: list[str]) -> torch.Tensor:
        key = f"{base}:{len(sentences)}"
        if key not in self._reference_set:
            self._reference_set.clear()
            self._reference_set[key] = self._embed(reference, sentences)
        return self._reference_set[key]

    def _embed(self, model: nn.Module, sentences: list[str]) -> torch.Tensor:
        bs = self.config.batch_size
        parts = [self._run(lambda b: embed(model, b)[0], sentences[i:i + bs]) for i in range(0, len(sentences), bs)]
        return torch.cat(parts)

    def run_once(self, trigger: str = "manual") -> dict[str, Any]:
        """One recalibration attempt; returns (and records) what happened and why."""
        with self._run_lock:
            self.running = True
            start = time.time()
            try:
                record = self._attempt()
            except LowbitError as exc:
                record = {"outcome": "failed", "reason": str(exc)}
            except Exception as exc:  # never let the background thread die
                log.exception("online calibration failed")
                record = {"outcome": "failed", "reason": f"{type(exc).__name__}: {exc}"}
            finally:
                self.running = False
            record.update(trigger=trigger, started_at=start, seconds=round(time.time() - start, 3))
            self.history.append(record)
            log.info("online calibration (%s): %s: %s", trigger, record["outcome"], record["reason"])
            if self.on_outcome:
                self.on_outcome(record["outcome"])
            return record

    def _attempt(self) -> dict[str, Any]:
        c = self.config
        serving: Serving | None = self.active.current()
        if serving is None:
            return {"outcome": "skipped", "reason": "no active model"}
        kind = serving.metadata.config.get("kind") if serving.metadata.config else None
        fn = RECALIBRATORS.get(kind) if kind else None
        if fn is None:
            what = f"scheme {kind!r}" if kind else "an fp32 model (not quantized)"
            return {"outcome": "skipped", "model_id": serving.model_id,
                    "reason": f"{what} has no activation ranges to recalibrate; "
                              f"recalibrators exist for: {', '.join(sorted(RECALIBRATORS))}"}
        with self._lock:
            holdout = list(dict.fromkeys(self.holdout))
            held = set(holdout)
            calib = [s for s in dict.fromkeys(self.calib) if s not in held]  # held-out inputs never calibrate
            self.since_last = 0
        if len(calib) < c.min_inputs or len(holdout) < c.min_holdout:
            return {"outcome": "skipped", "model_id": serving.model_id,
                    "reason": f"buffer has {len(calib)} distinct calibration / {len(holdout)} held-out inputs; "
                              f"need {c.min_inputs} / {c.min_holdout}"}
        reference = self._reference(serving.metadata.model)
        batches = [calib[i:i + c.batch_size] for i in range(0, len(calib), c.batch_size)]
        try:
            candidate = fn(serving.model, reference, batches, self._run)
        except NothingToRecalibrate as exc:
            return {"outcome": "skipped", "model_id": serving.model_id, "reason": str(exc)}
        ref = self._embed(reference, holdout)
        cur_mean, cur_min = _cosines(self._embed(serving.model, holdout), ref)
        new_mean, new_min = _cosines(self._embed(candidate, holdout), ref)
        record = {"model_id": serving.model_id, "scheme": kind, "n_calibration": len(calib), "n_holdout": len(holdout),
                  "cos_mean_before": cur_mean, "cos_min_before": cur_min, "cos_mean_after": new_mean,
                  "cos_min_after": new_min}
        summary = (f"held-out cos_mean vs fp32 {cur_mean:.5f} -> {new_mean:.5f} (min {cur_min:.5f} -> {new_min:.5f}) "
                   f"on {len(holdout)} inputs, calibrated on {len(calib)}")
        if new_mean < cur_mean - c.tolerance:  # the reference set is not needed to refuse
            return {**record, "outcome": "rejected", "reason": f"worse on held-out traffic: {summary}"}
        fixed = self.reference_sentences()
        ref_fixed = self._reference_embeddings(serving.metadata.model, reference, fixed)
        cur_fixed = self._serving_on_reference(serving, fixed)
        cur_fmean, cur_fmin = _cosines(cur_fixed, ref_fixed)
        new_fmean, new_fmin = _cosines(self._embed(candidate, fixed), ref_fixed)
        record.update(n_reference=len(fixed), reference_cos_mean_before=cur_fmean, reference_cos_min_before=cur_fmin,
                      reference_cos_mean_after=new_fmean, reference_cos_min_after=new_fmin)
        summary += (f"; reference sentences {cur_fmean:.5f} -> {new_fmean:.5f} (min {cur_fmin:.5f} -> {new_fmin:.5f}) "
                    f"on {len(fixed)}")
        if new_fmean < cur_fmean - c.tolerance:
            return {**record, "outcome": "rejected", "reason": f"worse on the fixed reference sentences: {summary}"}
        info = {"at": time.time(), **{k: v for k, v in record.items() if k not in ("model_id", "scheme")}}
        new = self.on_accept(serving, candidate, info, calib)
        if new is None:
            return {**record, "outcome": "discarded", "reason": "the active model changed during recalibration"}
        if new.model_id != serving.model_id:
            record["new_model_id"] = new.model_id
            summary += f"; saved as {new.model_id!r} (parent {serving.model_id!r})"
        return {**record, "outcome": "accepted", "reason": f"not worse: {summary}"}

    # ---- background -----------------------------------------------------------------------------
    def trigger(self) -> None:
        """Ask the background thread for an attempt now."""
        self._manual = True
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.config.check_interval_s)
            if self._stop.is_set():
                return
            if self._wake.is_set():
                self._wake.clear()
                trigger, self._manual = ("manual" if self._manual else "auto"), False
                self.run_once(trigger)

    def status(self) -> dict[str, Any]:
        with self._lock:
            counts = {"calibration": len(self.calib), "holdout": len(self.holdout)}
            seen, since, refused = self.seen, self.since_last, self.not_from_sources
        return {"config": asdict(self.config), "buffer": counts, "inputs_seen": seen, "inputs_since_last": since,
                "inputs_not_from_sources": refused,
                "running": self.running, "recalibrators": sorted(RECALIBRATORS), "history": list(self.history)}

    def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()
