"""`wtbox metrics BOX QUERY` and `wtbox probe BOX URL|PATH`: the box's own VictoriaMetrics."""
from __future__ import annotations

import click

from worktreebox.cli.commands._common import box_argument, emit_json, get_host, info, json_option, run_cmd, table


@click.command()
@box_argument
@click.argument("query", required=False)
@click.option("--range", "range_", metavar="DURATION", help="Range query over the last DURATION (e.g. 15m, 1h).")
@click.option("--step", default="15s", show_default=True, metavar="DURATION", help="Resolution of a range query.")
@click.option("--list", "list_", is_flag=True, help="List the metric names the box has.")
@json_option
@run_cmd
def metrics(box, query, range_, step, list_, as_json):
    """Query the box's metrics with PromQL/MetricsQL (no QUERY: list the metric names)."""
    from worktreebox.errors import NotFound
    from worktreebox.telemetry import metrics as metrics_query

    host = get_host()
    try:
        b = host.get(box)
    except NotFound:
        # `wtbox metrics 'up'` inside a box: the one argument is the query.
        from pathlib import Path

        here = host.box_of_path(Path.cwd())
        if query is not None or here is None:
            raise
        b, query = here, box
    if list_ or not query:
        names = metrics_query.series_names(b)
        if as_json:
            emit_json(names)
        else:
            for n in names:
                click.echo(n)
            if not names:
                info(f"{b.id} has no metrics yet.")
        return
    data = metrics_query.query(b, query, range_=range_, step=step)
    if as_json:
        emit_json(data)
        return
    _print_result(data)


def _print_result(data: dict) -> None:
    kind, result = data.get("resultType"), data.get("result")
    if kind in ("scalar", "string"):
        click.echo(result[1])
        return
    if not result:
        info("no series match.")
        return
    if kind == "vector":
        rows = [[_series(r["metric"]), r["value"][1]] for r in result]
        table(sorted(rows), ["SERIES", "VALUE"])
        return
    rows = []
    for r in result:
        vals = [float(v) for _, v in r["values"]]
        rows.append([_series(r["metric"]), len(vals), _fmt(min(vals)), _fmt(max(vals)), r["values"][-1][1]])
    table(sorted(rows), ["SERIES", "POINTS", "MIN", "MAX", "LAST"])


def _series(metric: dict) -> str:
    # Every series of a box carries box=<id>; repeating it in each row says nothing.
    labels = {k: v for k, v in metric.items() if k not in ("__name__", "box")}
    inner = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    name = metric.get("__name__", "")
    return f"{name}{{{inner}}}" if inner else (name or "{}")


def _fmt(v: float) -> str:
    return f"{v:.6g}"


@click.command()
@box_argument
@click.argument("target", metavar="URL|PATH")
@click.option("-n", "n", default=200, show_default=True, type=click.IntRange(min=1), help="Number of requests.")
@click.option("-c", "concurrency", default=4, show_default=True, type=click.IntRange(min=1, max=256),
              help="Requests in flight at once (one keep-alive connection each).")
@click.option("--method", default="GET", show_default=True, help="HTTP method.")
@click.option("--data", help="Request body (sent with every request).")
@json_option
@run_cmd
def probe(box, target, n, concurrency, method, data, as_json):
    """Measure a URL of the box (a PATH uses its first port); record the latency histogram."""
    host = get_host()
    b = host.get(box)
    result = host.probe(b, target, n=n, concurrency=concurrency, method=method, data=data)
    url = result["url"]
    if result.get("not_recorded"):
        info(f"wtbox: not recorded: {result['not_recorded'].rstrip('.')}.")
    if as_json:
        emit_json(result)
        return
    click.echo(f"{result['method']} {url}: {result['answered']}/{n} answered, concurrency {concurrency}, "
               f"{result['seconds']:.2f} s ({result['rps']} req/s)")
    click.echo(f"p50 {result['p50_ms']:.2f} ms  p95 {result['p95_ms']:.2f} ms  p99 {result['p99_ms']:.2f} ms  "
               f"max {result['max_ms']:.2f} ms  errors {result['errors']}")
    codes = "  ".join(f"{k}: {v}" for k, v in result["codes"].items())
    fails = "  ".join(f"{k}: {v}" for k, v in result["failures"].items())
    click.echo(f"status {codes}" + (f"  failed {fails}" if fails else ""))
    if result["recorded"]:
        q = f'histogram_quantile(0.95, wtbox_probe_duration_seconds_bucket{{path="{result["path"]}"}})'
        info(f"recorded; compare later with: wtbox metrics {b.id} '{q}' --range 1h")

