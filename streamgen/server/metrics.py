"""Tiny Prometheus text-format registry (counters and gauges, optional labels). No I/O."""

from __future__ import annotations

import threading
from collections.abc import Callable

__all__ = ["Metrics"]


def _fmt_labels(labels: tuple[tuple[str, str], ...]) -> str:
    if not labels:
        return ""
    esc = lambda v: v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')  # noqa: E731
    return "{" + ",".join(f'{k}="{esc(v)}"' for k, v in labels) + "}"


def _fmt_value(value: float) -> str:
    """Exact: integers as integers (1234567890, not 1.23457e+09), other floats round-trip (repr)."""
    v = float(value)
    return str(int(v)) if v.is_integer() and abs(v) < 2**53 else repr(v)


class Metrics:
    """Counters/gauges keyed by (name, labels); gauges may be callables sampled at render time."""

    def __init__(self, prefix: str = "streamgen"):
        self.prefix = prefix
        self._lock = threading.Lock()
        self._help: dict[str, tuple[str, str]] = {}  # name -> (type, help)
        self._labelled: set[str] = set()  # series only with labels: no 0 sample before the first
        self._values: dict[str, dict[tuple, float]] = {}
        self._callbacks: dict[str, Callable[[], float | dict[tuple, float]]] = {}

    def describe(self, name: str, kind: str, help_text: str, *, labelled: bool = False) -> None:
        """Declare a metric; unlabelled ones are rendered as 0 until first set."""
        self._help[name] = (kind, help_text)
        if labelled:
            self._labelled.add(name)
        self._values.setdefault(name, {})

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            d = self._values.setdefault(name, {})
            d[key] = d.get(key, 0.0) + value

    def gauge_fn(self, name: str, fn: Callable[[], float | dict[tuple, float]]) -> None:
        """Gauge computed when rendered; fn returns a value or {labels tuple: value}."""
        self._callbacks[name] = fn

    def render(self) -> str:
        lines = []
        names = sorted(set(self._help) | set(self._values) | set(self._callbacks))
        for name in names:
            full = f"{self.prefix}_{name}"
            kind, help_text = self._help.get(name, ("gauge", ""))
            lines.append(f"# HELP {full} {help_text}")
            lines.append(f"# TYPE {full} {kind}")
            if name in self._callbacks:
                v = self._callbacks[name]()
                series = v if isinstance(v, dict) else {(): v}
            else:
                with self._lock:
                    series = dict(self._values.get(name, {}))
            if not series and name not in self._labelled:
                series = {(): 0.0}
            for labels, value in sorted(series.items()):
                lines.append(f"{full}{_fmt_labels(labels)} {_fmt_value(value)}")
        return "\n".join(lines) + "\n"
