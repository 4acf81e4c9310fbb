"""Looking at one box: logs, metrics, traces, probe, browse; and `top` over all of them."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from worktreebox.errors import ParamError
from worktreebox.operations.spec import BOX, CHANGES, REQUIRED, Operation, Param, as_list, parsed

if TYPE_CHECKING:
    from worktreebox.box import Box
    from worktreebox.host import Host

LEVELS = ("debug", "info", "warning", "error", "critical")


def log_services(host: Host, box: Box, wanted: Sequence[str] = ()) -> list[str]:
    """The services of the box that have (or will have) logs; a wanted name that is not one is refused."""
    from worktreebox.errors import UsageError
    from worktreebox.resources.services import configured_names
    from worktreebox.telemetry.logs import reader

    known = set(reader.available_services(box.logs_dir)) | set(configured_names(box))
    for s in wanted:
        if s not in known:
            names = ", ".join(sorted(n for n in known if not n.startswith("_"))) or "none yet"
            raise UsageError(f"{box.id} has no service {s!r} with logs; services: {names}.")
    return sorted(known)


def logs(host: Host, box: str | None, service: str | Sequence[str] = (), since: str | None = None,
         until: str | None = None, level: str | None = None, grep: str | None = None,
         tail: int | None = None) -> list[dict]:
    """Matching log records, oldest first; since/until are '5m' (ago) or ISO times."""
    from worktreebox.telemetry.logs import reader

    b = host.get(box)
    services = as_list(service)
    since_ts, until_ts = reader.parse_time(since), reader.parse_time(until)
    reader.level_at_least(level)  # validated before anything is read
    log_services(host, b, services)
    return reader.read_records(b.logs_dir, services or None, since_ts, until_ts, level, grep, tail)


def metrics(host: Host, box: str | None, query: str | None = None, range: str | None = None,
            step: str = "15s") -> dict:
    """A PromQL/MetricsQL query over the box's own store; without one, {metric_names}."""
    from worktreebox.resources.metrics import wake
    from worktreebox.services.client import collect_now
    from worktreebox.telemetry import metrics as store

    b = host.get(box)
    wake(b)  # a calm box's store sleeps (telemetry/store_sleep.py)
    collect_now(b)  # a calm box's own metrics are pushed rarely (supervisor.COLLECT_CALM): fresh ones first
    if not query:
        return {"metric_names": store.series_names(b)}
    return store.query(b, query, range_=range, step=step)


def traces(host: Host, box: str | None, service: str | None = None, name: str | None = None,
           min_duration: str | None = None, status: str | None = None, since: str | None = None,
           trace_id: str | None = None, logs: bool = False, limit: int | None = 100) -> list[dict] | dict:
    """The newest `limit` spans that match every filter, in start order; with `trace_id`, that trace
    as a tree ({trace_id, start, duration_ms, services, span_count, spans with depth}, plus `logs`)."""
    from worktreebox.errors import WtboxError
    from worktreebox.telemetry.traces import query

    if logs and not trace_id:
        raise ParamError("{logs} goes with {trace_id}: it shows the log records of that one trace.", "logs",
                         "trace_id")
    shortest = parsed("min_duration", query.duration_ns, min_duration)
    after = parsed("since", query.time_ns, since)
    b = host.get(box)
    if not b.data.get("traces"):
        raise WtboxError(f"{b.id} has no OTLP endpoint: its wtbox.toml sets [observability] enabled = false.")
    if trace_id:
        tree = query.trace_tree(b.dir, trace_id)
        if logs:
            tree["logs"] = query.trace_logs(b.dir, tree["trace_id"])
        return tree
    return query.find_spans(b.dir, service=service, name=name, status=status, limit=limit,
                            min_duration=None if shortest is None else shortest / 1e9,
                            since=None if after is None else after / 1e9)


def probe(host: Host, box: str | None, target: str, n: int = 200, concurrency: int = 4, method: str = "GET",
          data: str | None = None) -> dict:
    """Latency of a URL or PATH of the box, recorded as a histogram in its metrics."""
    from worktreebox.resources.metrics import wake
    from worktreebox.resources.ports import url_for
    from worktreebox.telemetry.probe import measure

    b = host.get(box)
    return measure(b, url_for(host, b, target), n=n, concurrency=concurrency, method=method, data=data, wake=wake)


def browse(host: Host, box: str | None, target: str = "/", screenshot: str | None = None, full_page: bool = False,
           viewport: str = "1280x800", wait_for: str | None = None, timeout: str = "30s",
           compare: str | None = None, diff: str | None = None, *,
           progress: Callable[[str], None] = lambda m: None) -> dict:
    """Load a URL or PATH of the box in its Chromium (warm with [browser] enabled, else started for
    this call); with `compare`, the same PATH in that box too, and `diff_ratio`. A page that does
    not load raises browser.PageTimeout/PageFailed, whose `result` holds what was seen until then."""
    from worktreebox.config.load import parse_duration
    from worktreebox.resources.browser import browse as browse_box
    from worktreebox.resources.ports import url_for
    from worktreebox.telemetry import browser as chromium

    seconds = parsed("timeout", parse_duration, timeout)
    if seconds <= 0:
        raise ParamError("{timeout} must be longer than zero.", "timeout")
    if diff and not compare:
        raise ParamError("{diff} needs {compare}: a diff is between two boxes.", "diff", "compare")
    opts = chromium.PageOptions(viewport=chromium.parse_viewport(viewport), full_page=full_page,
                                wait_for=wait_for or None, timeout=seconds, screenshot=bool(screenshot or compare))
    shot = _writable("screenshot", screenshot)
    diff_path = _writable("diff", diff)
    b = host.get(box)
    other = host.get(compare) if compare else None
    if other is not None and other.id == b.id:
        raise ParamError(f"{{compare}} names {b.id} itself; compare two different boxes.", "compare")
    boxes = [b] + ([other] if other is not None else [])
    urls = [url_for(host, x, target) for x in boxes]
    chromium.find_chromium()  # before any box is touched: one sentence naming the package
    results = []
    with chromium.Driver() as driver:
        for x, url in zip(boxes, urls, strict=True):
            host.registry.touch(x.id)  # looking at a box is using it (TTL)
            result, png = browse_box(host, x, url, opts, driver, progress)
            result["id"] = x.id
            results.append((result, png))
    (result, png), others = results[0], results[1:]
    if shot is not None:
        assert png is not None  # a screenshot asked for is taken (opts.screenshot)
        chromium.write_png(shot, png)
    result["screenshot"] = str(shot) if shot else None
    if not others:
        return result
    seen, seen_png = others[0]
    assert png is not None and seen_png is not None  # compare takes both screenshots (opts.screenshot)
    ratio_and_png = chromium.diff_images(png, seen_png)
    seen["screenshot"] = None
    if shot is not None:
        other_shot = shot.with_name(f"{shot.stem}.{seen['id']}{shot.suffix or '.png'}")
        chromium.write_png(other_shot, seen_png)
        seen["screenshot"] = str(other_shot)
    ratio, diff_png = ratio_and_png
    if diff_path is not None:
        chromium.write_png(diff_path, diff_png)
    return {**result, "compare": seen, "diff_ratio": ratio, "diff": str(diff_path) if diff_path else None}


def _writable(name: str, path: str | None) -> Any:
    from worktreebox.telemetry.browser import check_writable

    return parsed(name, check_writable, path, where="what") if path else None


def top(host: Host) -> list[dict]:
    from worktreebox.telemetry.accounting import sample

    return sample(host)


LOGS = Operation(
    "logs", "Show the captured logs of a box's services (and of setup and migrate).",
    (BOX,
     Param("service", "Only this service (repeatable; default: all, with setup and migrate).", many=True,
           default=(), flags=("--service", "-s")),
     Param("since", "Records from this time on: a duration ago (5m, 2h) or an ISO time."),
     Param("until", "Records up to this time: a duration ago or an ISO time."),
     Param("level", "This level and above.", choices=LEVELS),
     Param("grep", "Only messages matching this regular expression."),
     Param("tail", "Only the last N matching records.", int, None, flags=("--tail", "-n"), min=0)),
    logs, list[dict[str, Any]], "The records, oldest first: {ts, service, stream, level, msg}.", tool="box_logs")

METRICS = Operation(
    "metrics", "Query the box's metrics with PromQL/MetricsQL (no QUERY: list the metric names).",
    (BOX,
     Param("query", "A PromQL/MetricsQL query (none: list the metric names the box has).", positional=True),
     Param("range", "Make it a range query over the last DURATION (e.g. 15m, 1h).", metavar="DURATION"),
     Param("step", "Resolution of a range query.", default="15s", metavar="DURATION")),
    metrics, result="VictoriaMetrics' {resultType, result}; without a query, {metric_names}.",
    tool="box_metrics")

TRACES = Operation(
    "traces", "List a box's spans (filters combine), or one trace as a tree with durations.",
    (BOX,
     Param("service", "Only spans of this service (its OTEL_SERVICE_NAME).", flags=("--service", "-s")),
     Param("name", "Only span names matching this glob, e.g. 'GET /items*'."),
     Param("min_duration", "Only spans at least this long: 200ms, 1.5s, 500us.", metavar="DURATION"),
     Param("status", "Only spans with this status.", choices=("error", "ok", "unset")),
     Param("since", "Only spans that started after this: a duration ago (5m, 2h) or an ISO time."),
     Param("trace_id", "One trace (its id or first 8+ hex digits) as a tree instead of a list.",
           flags=("--trace",), metavar="ID"),
     Param("logs", "With trace_id: also the log records carrying its id.", bool, False),
     Param("limit", "At most this many spans (the newest that match).", int, 100, flags=("--limit", "-n"), min=0)),
    traces, list[dict[str, Any]] | dict[str, Any],
    "A list of spans {trace_id, span_id, parent_span_id, name, service, start, duration_ms, status, kind, "
    "attributes}; with trace_id, {trace_id, duration_ms, span_count, services, spans (each with depth), logs}.",
    tool="box_traces")

PROBE = Operation(
    "probe", "Measure a URL of the box (a PATH uses its first port); record the latency histogram in its metrics.",
    (BOX,
     Param("target", "A path of the box's first port (e.g. /health) or a full http:// URL.", default=REQUIRED,
           positional=True, metavar="URL|PATH"),
     Param("n", "Number of requests.", int, 200, flags=("-n",), min=1, max=100000),
     Param("concurrency", "Requests in flight at once (one keep-alive connection each).", int, 4, flags=("-c",),
           min=1, max=256),
     Param("method", "HTTP method.", default="GET"),
     Param("data", "Request body, sent with every request.")),
    probe, result="url, n, answered, errors, codes, p50_ms, p95_ms, p99_ms, max_ms, rps, recorded.",
    effect=CHANGES, tool="box_probe")

BROWSE = Operation(
    "browse", "Load PATH (on the box's first port; default /) or URL in the box's headless Chromium.",
    (BOX,
     Param("target", "A path of the box's first port (e.g. /) or a full http:// URL.", default="/",
           positional=True, metavar="[PATH|URL]"),
     Param("screenshot", "Write a PNG of the page to this file.", metavar="FILE.png"),
     Param("full_page", "Capture the whole scrollable page, not only the viewport.", bool, False),
     Param("viewport", "Window size as WIDTHxHEIGHT.", default="1280x800", metavar="WxH"),
     Param("wait_for", "After the load event, also wait for this CSS selector to be visible, or networkidle.",
           metavar="SELECTOR|networkidle"),
     Param("timeout", "Give up when the page has not loaded after this long.", default="30s", metavar="DURATION"),
     Param("compare", "Load the same PATH in this other box and diff the two screenshots.", metavar="OTHER_BOX"),
     Param("diff", "With compare: write the pixel diff PNG to this file.", metavar="FILE.png")),
    browse, result="Final url, status, title, load_seconds, console warnings and errors, failed requests; with "
                   "compare, also compare and diff_ratio (0..1). Errors also go to the box's logs and metrics.",
    effect=CHANGES, tool="box_browse")

TOP = Operation("top", "CPU %, memory, tasks, ports and state of every box, sorted by CPU.", (), top,
                list[dict[str, Any]], "One row per box.")
