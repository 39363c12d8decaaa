"""Prometheus text exposition (format 0.0.4) from a tiny in-process registry: counters, gauges,
histograms, each with labels. Thread-safe; no dependency beyond the standard library."""

from __future__ import annotations

import bisect
import threading
from typing import Callable, Iterable

TOKENS_PER_SECOND_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)  # seconds

Labels = tuple[tuple[str, str], ...]


def _labels(d: dict[str, object]) -> Labels:
    return tuple(sorted((k, str(v)) for k, v in d.items()))


def _fmt_labels(labels: Labels, extra: Iterable[tuple[str, str]] = ()) -> str:
    items = list(labels) + list(extra)
    if not items:
        return ""
    esc = lambda v: v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')  # noqa: E731
    return "{" + ",".join(f'{k}="{esc(v)}"' for k, v in items) + "}"


def _num(v: float) -> str:
    if v == float("inf"):
        return "+Inf"
    return repr(float(v)) if not float(v).is_integer() else str(int(v))


class Metric:
    def __init__(self, name: str, help: str, kind: str):
        self.name, self.help, self.kind = name, help, kind
        self._lock = threading.Lock()

    def lines(self) -> list[str]:
        raise NotImplementedError


class Counter(Metric):
    def __init__(self, name: str, help: str):
        super().__init__(name, help, "counter")
        self._values: dict[Labels, float] = {}

    def inc(self, amount: float = 1.0, **labels: object) -> None:
        key = _labels(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: object) -> float:
        return self._values.get(_labels(labels), 0.0)

    def lines(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return [f"{self.name}{_fmt_labels(k)} {_num(v)}" for k, v in items]


class Gauge(Metric):
    """A gauge set explicitly, or computed at scrape time by ``fn() -> {labels-dict-tuple: value}``."""

    def __init__(self, name: str, help: str, fn: Callable[[], dict[Labels, float]] | None = None):
        super().__init__(name, help, "gauge")
        self._values: dict[Labels, float] = {}
        self.fn = fn

    def set(self, value: float, **labels: object) -> None:
        with self._lock:
            self._values[_labels(labels)] = float(value)

    def clear(self) -> None:
        with self._lock:
            self._values.clear()

    def lines(self) -> list[str]:
        if self.fn is not None:
            items = sorted(self.fn().items())
        else:
            with self._lock:
                items = sorted(self._values.items())
        return [f"{self.name}{_fmt_labels(k)} {_num(v)}" for k, v in items]


class Histogram(Metric):
    def __init__(self, name: str, help: str, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        super().__init__(name, help, "histogram")
        self.buckets = tuple(buckets)
        self._data: dict[Labels, list] = {}  # labels -> [bucket counts..., sum, count]

    def observe(self, value: float, **labels: object) -> None:
        key = _labels(labels)
        with self._lock:
            d = self._data.setdefault(key, [0] * len(self.buckets) + [0.0, 0])
            i = bisect.bisect_left(self.buckets, value)
            if i < len(self.buckets):
                d[i] += 1
            d[-2] += value
            d[-1] += 1

    def lines(self) -> list[str]:
        out = []
        with self._lock:
            items = sorted((k, list(v)) for k, v in self._data.items())
        for key, d in items:
            cum = 0
            for b, c in zip(self.buckets, d[: len(self.buckets)]):
                cum += c
                out.append(f"{self.name}_bucket{_fmt_labels(key, [('le', _num(b))])} {cum}")
            out.append(f"{self.name}_bucket{_fmt_labels(key, [('le', '+Inf')])} {d[-1]}")
            out.append(f"{self.name}_sum{_fmt_labels(key)} {_num(d[-2])}")
            out.append(f"{self.name}_count{_fmt_labels(key)} {d[-1]}")
        return out


class Registry:
    def __init__(self):
        self._metrics: list[Metric] = []

    def counter(self, name: str, help: str) -> Counter:
        return self._add(Counter(name, help))

    def gauge(self, name: str, help: str, fn=None) -> Gauge:
        return self._add(Gauge(name, help, fn))

    def histogram(self, name: str, help: str, buckets=LATENCY_BUCKETS) -> Histogram:
        return self._add(Histogram(name, help, buckets))

    def _add(self, m):
        self._metrics.append(m)
        return m

    def render(self) -> str:
        out = []
        for m in self._metrics:
            out.append(f"# HELP {m.name} {m.help}")
            out.append(f"# TYPE {m.name} {m.kind}")
            out.extend(m.lines())
        return "\n".join(out) + "\n"


class ServiceMetrics:
    """Every metric the service exposes, in one place."""

    def __init__(self):
        r = self.registry = Registry()
        self.requests = r.counter("lowbit_requests_total", "HTTP requests by route, method and status code")
        self.latency = r.histogram("lowbit_request_duration_seconds", "HTTP request latency by route")
        self.rejected = r.counter("lowbit_rejected_requests_total",
                                  "requests refused by a limit: auth, body_size, batch, input_length, tokens, "
                                  "empty, encoding, dimensions, overload, invalid_id, prompt_tokens, max_tokens, prompt")
        self.inputs = r.counter("lowbit_embedded_inputs_total", "sentences embedded")
        self.tokens = r.counter("lowbit_embedded_tokens_total", "tokens embedded")
        self.swaps = r.counter("lowbit_model_swaps_total", "serving-model swaps by kind: activate, recalibrate")
        self.activation_failures = r.counter("lowbit_activation_failures_total",
                                             "activations refused because the model failed to load")
        self.jobs = r.counter("lowbit_jobs_total", "finished background jobs by status")
        self.unexpected = r.counter("lowbit_unexpected_errors_total",
                                    "exceptions that were not a known client error (answered 503, logged)")
        self.calib_runs = r.counter("lowbit_online_calibration_runs_total",
                                    "online recalibration attempts by outcome: accepted, rejected, skipped, failed")

        self.generated_tokens = r.counter("lowbit_generated_tokens_total",
                                          "tokens generated by endpoint: completions, chat")
        self.prompt_tokens = r.counter("lowbit_prompt_tokens_total", "prompt tokens read by endpoint: completions, chat")
        self.generations = r.counter("lowbit_generations_total", "generations by endpoint and finish_reason: stop, "
                                     "length, cancelled (client gone), error")
        self.generation_seconds = r.counter("lowbit_generation_seconds_total",
                                            "seconds spent generating (prefill + decode), all generations together")
        self.tokens_per_second = r.histogram("lowbit_generation_tokens_per_second",
                                             "generated tokens per second of each finished generation (decode rate)",
                                             buckets=TOKENS_PER_SECOND_BUCKETS)

    def render(self) -> str:
        return self.registry.render()
