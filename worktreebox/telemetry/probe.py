"""`wtbox probe`: a small latency measurement of one URL, recorded as a histogram in the box's store."""
from __future__ import annotations

import http.client
import itertools
import math
import threading
import time
import urllib.parse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from worktreebox.errors import UsageError, WtboxError

if TYPE_CHECKING:
    from worktreebox.box import Box

HISTOGRAM = "wtbox_probe_duration_seconds"


def probe(url: str, n: int = 200, concurrency: int = 4, method: str = "GET", data: str | bytes | None = None,
          timeout: float = 10.0) -> dict[str, Any]:
    """Send n requests over `concurrency` keep-alive connections; latency percentiles in ms, errors, codes."""
    u = urllib.parse.urlsplit(url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise UsageError(f"Cannot probe {url!r}: expected an http:// URL or a path such as /health.")
    if n < 1 or concurrency < 1:
        raise UsageError("Both -n and -c must be at least 1.")
    target = (u.path or "/") + (f"?{u.query}" if u.query else "")
    body = data.encode() if isinstance(data, str) else data
    headers = {"Content-Type": "application/x-www-form-urlencoded"} if body is not None else {}
    conn_cls = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
    tickets = itertools.count()
    lock = threading.Lock()
    durations: list[float] = []
    codes: dict[str, int] = {}
    failures: dict[str, int] = {}

    def worker() -> None:
        conn = None
        while True:
            with lock:
                if next(tickets) >= n:
                    break
            if conn is None:
                conn = conn_cls(u.hostname or "", u.port, timeout=timeout)
            t0 = time.perf_counter()
            try:
                conn.request(method, target, body=body, headers=headers)
                resp = conn.getresponse()
                resp.read()
                elapsed = time.perf_counter() - t0
                code = str(resp.status)
                if resp.will_close:
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as e:
                if conn is not None:
                    conn.close()
                conn = None
                reason = type(e).__name__ if not str(e) else str(e)
                with lock:
                    failures[reason] = failures.get(reason, 0) + 1
                continue
            with lock:
                durations.append(elapsed)
                codes[code] = codes.get(code, 0) + 1
        if conn is not None:
            conn.close()

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(min(concurrency, n))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    if not durations:
        reason = max(failures, key=failures.__getitem__) if failures else "no answer"
        raise WtboxError(f"None of the {n} requests to {url} got an answer ({reason}); is the service up?")
    durations.sort()
    errors = sum(failures.values()) + sum(c for code, c in codes.items() if int(code) >= 400)
    return {
        "url": url,
        "path": u.path or "/",
        "method": method,
        "n": n,
        "concurrency": concurrency,
        "answered": len(durations),
        "errors": errors,
        "codes": dict(sorted(codes.items())),
        "failures": failures,
        "p50_ms": _ms(percentile(durations, 50)),
        "p95_ms": _ms(percentile(durations, 95)),
        "p99_ms": _ms(percentile(durations, 99)),
        "max_ms": _ms(durations[-1]),
        "mean_ms": _ms(sum(durations) / len(durations)),
        "seconds": round(wall, 3),
        "rps": round(len(durations) / wall, 1) if wall > 0 else None,
        "histogram": histogram(durations),
    }


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile: the value at rank ceil(q/100 * n), which is what histogram_quantile's bucket holds."""
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def buckets() -> list[float]:
    from worktreebox.telemetry.exposition import metric_specs

    return [float(b) for b in metric_specs()[HISTOGRAM]["buckets"]]


def histogram(durations: list[float]) -> dict[str, Any]:
    """Cumulative bucket counts over the shared bucket edges (le, seconds)."""
    edges = buckets()
    counts = [sum(1 for d in durations if d <= le) for le in edges]
    return {"buckets": [[le, c] for le, c in zip(edges, counts, strict=True)] + [["+Inf", len(durations)]],
            "sum": sum(durations), "count": len(durations)}


def record(result: dict[str, Any], box_id: str, metrics_url: str) -> None:
    """Push the run's histogram, labelled box and path, stamped with the time the run ended, after the
    same series at zero stamped when it began: each run is then a counter going up from 0, so `rate()`
    and `increase()` answer after the first run (one sample has no rate) and add up across runs (the
    next run's zero reads as a counter reset)."""
    from worktreebox.telemetry.exposition import exposition
    from worktreebox.telemetry.vmclient import Client

    labels = {"box": box_id, "path": result["path"]}
    h = result["histogram"]
    samples = [(f"{HISTOGRAM}_bucket", {**labels, "le": _le(le)}, count) for le, count in h["buckets"]]
    samples += [(f"{HISTOGRAM}_sum", labels, h["sum"]), (f"{HISTOGRAM}_count", labels, h["count"])]
    end_ms = int(time.time() * 1000)
    start_ms = min(end_ms - 1, end_ms - int(result.get("seconds", 0) * 1000))
    client = Client(metrics_url, box_id=box_id)
    client.push_prometheus(exposition([(name, lbl, 0) for name, lbl, _ in samples], timestamp_ms=start_ms))
    client.push_prometheus(exposition(samples, timestamp_ms=end_ms))
    client.flush()


def _le(le: float | str) -> str:
    return le if isinstance(le, str) else f"{le:g}"


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def measure(box: Box, url: str, *, n: int = 200, concurrency: int = 4, method: str = "GET",
            data: str | None = None, wake: Callable[[Box], None] = lambda box: None) -> dict[str, Any]:
    """`probe --json`: probe(url) for a box, recorded as a histogram in its metrics (`recorded`;
    `not_recorded` says why not); `wake` makes the box's store answer first (it may sleep:
    resources/metrics.wake)."""
    result = probe(url, n=n, concurrency=concurrency, method=method.upper(), data=data)
    result["id"] = result["box"] = box.id  # "box": the alias other results keep for one release
    result["recorded"] = False
    metrics_url = (box.data.get("metrics") or {}).get("url")
    if not metrics_url:
        result["not_recorded"] = f"{box.id} has observability turned off"
        return result
    try:
        wake(box)
        record(result, box.id, metrics_url)
        result["recorded"] = True
    except WtboxError as e:
        result["not_recorded"] = str(e)
    return result
