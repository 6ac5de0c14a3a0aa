"""The server's metrics on ``prometheus_client``: counters, gauges and histograms in a registry of
their own (one per app, so servers in one process never share series), rendered in the Prometheus
text format by ``prometheus_client.generate_latest``. No I/O.

Declare a metric once (``streamgen_`` is prepended), then record it by name::

    m = Metrics()
    m.counter("fragments_sent_total", "fragment messages written to clients")
    m.counter("errors_total", "errors sent to clients, by code", labels=("code",))
    m.gauge("sessions", "live sessions", fn=lambda: len(registry.sessions))   # sampled at each scrape
    m.histogram("chunk_seconds", "wall seconds per chunk", buckets=LATENCY_BUCKETS)
    m.inc("errors_total", code="busy"); m.observe("chunk_seconds", 0.42); m.set("pool_free", 3)

A gauge with ``fn`` is computed when /metrics is read: ``fn`` returns a number or, for a gauge
declared with ``labels``, ``{(label value, ...): number}``. Recording a name that was never declared
is a ``KeyError`` (a typo never makes a silent new series). Values are exact (Go's float format,
as every Prometheus client writes them: 1234567890 is ``1.23456789e+09``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["CONTENT_TYPE", "LATENCY_BUCKETS", "Metrics"]

CONTENT_TYPE = CONTENT_TYPE_LATEST  # the text format generate_latest writes
# seconds: a chunk takes ~0.05 s (H200) to ~1 s (2-core CPU); a first fragment or a prompt switch
# up to a few chunks; a cold engine's first chunk several seconds
LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, float("inf"))


class _FnGauge(Collector):
    """A gauge whose value(s) ``fn`` computes at collection time."""

    def __init__(self, name: str, help_text: str, labels: Sequence[str], fn: Callable):
        self.name, self.help_text, self.labels, self.fn = name, help_text, tuple(labels), fn

    def describe(self):
        return [GaugeMetricFamily(self.name, self.help_text, labels=self.labels or None)]

    def collect(self):
        family = GaugeMetricFamily(self.name, self.help_text, labels=self.labels or None)
        value = self.fn()
        if self.labels:
            for key, v in sorted(value.items()):
                family.add_metric([str(k) for k in key], float(v))
        else:
            family.add_metric([], float(value))
        yield family


class Metrics:
    """One server's metrics; see the module docstring. Thread-safe (prometheus_client's own locks)."""

    def __init__(self, prefix: str = "streamgen"):
        self.prefix = prefix
        self.registry = CollectorRegistry(auto_describe=True)
        self._metrics: dict[str, Counter | Gauge | Histogram] = {}
        self._lock = threading.Lock()

    def _add(self, name: str, make: Callable):
        with self._lock:
            if name in self._metrics:
                raise ValueError(f"metric {name!r} is declared twice")
            self._metrics[name] = metric = make(f"{self.prefix}_{name}")
        return metric

    def counter(self, name: str, help_text: str, *, labels: Sequence[str] = ()) -> Counter:
        return self._add(name, lambda full: Counter(full, help_text, labelnames=tuple(labels), registry=self.registry))

    def gauge(self, name: str, help_text: str, *, fn: Callable | None = None, labels: Sequence[str] = ()):
        """A gauge: set with :meth:`set`, or computed by ``fn`` at each scrape (then nothing sets it)."""
        if fn is None:
            return self._add(name, lambda full: Gauge(full, help_text, labelnames=tuple(labels), registry=self.registry))

        def make(full: str) -> _FnGauge:
            collector = _FnGauge(full, help_text, labels, fn)
            self.registry.register(collector)
            return collector

        return self._add(name, make)

    def histogram(self, name: str, help_text: str, *, buckets: Sequence[float] = LATENCY_BUCKETS,
                  labels: Sequence[str] = ()) -> Histogram:
        return self._add(name, lambda full: Histogram(full, help_text, labelnames=tuple(labels), buckets=tuple(buckets),
                                                      registry=self.registry))

    def _get(self, name: str, labels: dict[str, str]):
        try:
            metric = self._metrics[name]
        except KeyError:
            raise KeyError(f"metric {name!r} is not declared (declared: {', '.join(sorted(self._metrics))})") from None
        return metric.labels(**labels) if labels else metric

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        self._get(name, labels).inc(value)

    def set(self, name: str, value: float, **labels: str) -> None:
        self._get(name, labels).set(value)

    def observe(self, name: str, value: float, **labels: str) -> None:
        self._get(name, labels).observe(value)

    def render(self) -> str:
        """The Prometheus text format of every metric (serve it as :data:`CONTENT_TYPE`)."""
        return generate_latest(self.registry).decode()
