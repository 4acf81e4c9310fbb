"""Span durations as metrics: a cumulative histogram per (service, span, status) and an error counter.

The receiver observes every stored span and pushes what changed into the box's VictoriaMetrics
about once a second, so `histogram_quantile(0.95, sum(rate(wtbox_span_duration_seconds_bucket
{span="GET /items"}[5m])) by (le))` answers "is this request under 200 ms?". Names, help texts,
bucket edges and the series cap come from observability/metrics.toml.
"""
from __future__ import annotations

import bisect
import threading
from collections.abc import Iterable
from typing import Any

from worktreebox.telemetry.exposition import exposition, histogram_buckets, metric_specs
from worktreebox.telemetry.traces.store import STATUS_NAMES

HISTOGRAM = "wtbox_span_duration_seconds"
ERRORS = "wtbox_span_errors_total"
OTHER = "_other"


class SpanMetrics:
    """Thread-safe: request threads call observe(), the flusher calls pending() then committed()."""

    def __init__(self, box_id: str) -> None:
        self.box_id = box_id
        self.edges = histogram_buckets(HISTOGRAM)
        self.max_series = int(metric_specs()[HISTOGRAM].get("max_series", 1000))
        self._lock = threading.Lock()
        # key → [per-bucket counts (len(edges) + 1, the last is > every edge), sum of seconds, count]
        self._hist: dict[tuple[str, str, str], list[Any]] = {}
        self._errors: dict[tuple[str, str], int] = {}
        self._dirty: set[tuple[str, str, str]] = set()
        self._unseeded: set[tuple[str, str, str]] = set()

    def observe(self, records: Iterable[dict[str, Any]]) -> None:
        edges = self.edges
        with self._lock:
            for r in records:
                status = STATUS_NAMES.get(r["k"], "unset")
                key = (r["v"], r["n"], status)
                h = self._hist.get(key)
                if h is None:
                    if len(self._hist) >= self.max_series:
                        key = (r["v"], OTHER, status)  # a span name per URL must not flood the store
                        h = self._hist.get(key)
                    if h is None:
                        h = self._hist[key] = [[0] * (len(edges) + 1), 0.0, 0]
                        self._unseeded.add(key)
                seconds = r["d"] / 1e9
                h[0][bisect.bisect_left(edges, seconds)] += 1
                h[1] += seconds
                h[2] += 1
                self._dirty.add(key)
                if status == "error":
                    ekey = (key[0], key[1])
                    self._errors[ekey] = self._errors.get(ekey, 0) + 1

    def pending(self, now_ms: int) -> tuple[str, Any] | None:
        """(Prometheus text of the changed series, a token for committed()), or None when nothing changed.

        A series seen for the first time also gets an all-zero sample 1 ms earlier, so `rate()` and
        `increase()` count its first spans instead of taking them for the counter's starting value.
        """
        with self._lock:
            if not self._dirty:
                return None
            dirty, unseeded = set(self._dirty), self._unseeded & self._dirty
            values = {k: (list(self._hist[k][0]), self._hist[k][1], self._hist[k][2]) for k in dirty}
            errors = {(k[0], k[1]): self._errors.get((k[0], k[1]), 0) for k in dirty}
        text = ""
        if unseeded:
            zero = [0] * (len(self.edges) + 1)
            text += exposition(self._samples(dict.fromkeys(unseeded, (zero, 0.0, 0)),
                                                {(k[0], k[1]): 0 for k in unseeded}), now_ms - 1)
        text += exposition(self._samples(values, errors), now_ms)
        return text, (dirty, unseeded)

    def committed(self, token: Any) -> None:
        """The push of pending()'s text succeeded: those series are clean until they change again."""
        dirty, unseeded = token
        with self._lock:
            self._dirty -= dirty
            self._unseeded -= unseeded

    def _samples(self, values: dict, errors: dict) -> list[tuple[str, dict[str, str], float]]:
        out: list[tuple[str, dict[str, str], float]] = []
        les = [f"{le:g}" for le in self.edges] + ["+Inf"]
        for (service, span, status), (counts, total, count) in sorted(values.items()):
            labels = {"box": self.box_id, "service": service, "span": span, "status": status}
            cumulative = 0
            for le, c in zip(les, counts, strict=False):
                cumulative += c
                out.append((f"{HISTOGRAM}_bucket", {**labels, "le": le}, cumulative))
            out.append((f"{HISTOGRAM}_sum", labels, total))
            out.append((f"{HISTOGRAM}_count", labels, count))
        for (service, span), n in sorted(errors.items()):
            out.append((ERRORS, {"box": self.box_id, "service": service, "span": span}, n))
        return out
