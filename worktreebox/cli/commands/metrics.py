"""`wtbox metrics BOX QUERY` and `wtbox probe BOX URL|PATH`: the box's own VictoriaMetrics."""
from __future__ import annotations

import click

from worktreebox.cli.build import command
from worktreebox.cli.commands._common import emit_json, get_host, info, table
from worktreebox.errors import WtboxError
from worktreebox.operations import observe

LIST = click.option("--list", "list_", is_flag=True, help="List the metric names the box has.")


@command(observe.METRICS, extras=[LIST])
def metrics(box, query, range, step, list_, as_json):
    from worktreebox.errors import NotFound
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
        names = observe.metrics(host, b.id)["metric_names"]
        if as_json:
            emit_json(names)
        else:
            for n in names:
                click.echo(n)
            if not names:
                info(f"{b.id} has no metrics yet.")
        return
    data = observe.metrics(host, b.id, query, range, step)
    if as_json:
        emit_json(data)
        return
    _print_result(data)


def _print_result(data: dict) -> None:
    kind, result = data.get("resultType"), data.get("result")
    assert result is not None, data  # VictoriaMetrics answers every query with a result
    if kind in ("scalar", "string"):
        click.echo(result[1])
        return
    if not result:
        # A box's services are scraped every 5 s from a random first moment: right after `new`
        # (the demo's own suggestion) nothing is there yet, and saying so saves a wrong conclusion.
        info("no series match (services are scraped every 5 s: a new box's first samples take ~10 s).")
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


@command(observe.PROBE)
def probe(box, target, n, concurrency, method, data, as_json):
    result = observe.probe(get_host(), box, target, n, concurrency, method, data)
    url = result["url"]
    if result.get("not_recorded"):
        info(f"wtbox: not recorded: {result['not_recorded'].rstrip('.')}.")
    if as_json:
        emit_json(result)
    else:
        _show_probe(result, url, n, concurrency)
    if result["errors"]:
        raise WtboxError(f"{result['errors']} of {n} requests to {url} failed (connection errors or status >= 400).")


def _show_probe(result: dict, url: str, n: int, concurrency: int) -> None:
    click.echo(f"{result['method']} {url}: {result['answered']}/{n} answered, concurrency {concurrency}, "
               f"{result['seconds']:.2f} s ({result['rps']} req/s)")
    click.echo(f"p50 {result['p50_ms']:.2f} ms  p95 {result['p95_ms']:.2f} ms  p99 {result['p99_ms']:.2f} ms  "
               f"max {result['max_ms']:.2f} ms  errors {result['errors']}")
    codes = "  ".join(f"{k}: {v}" for k, v in result["codes"].items())
    fails = "  ".join(f"{k}: {v}" for k, v in result["failures"].items())
    click.echo(f"status {codes}" + (f"  failed {fails}" if fails else ""))
    if result["recorded"]:
        q = f'histogram_quantile(0.95, wtbox_probe_duration_seconds_bucket{{path="{result["path"]}"}})'
        info(f"recorded; compare later with: wtbox metrics {result['id']} '{q}' --range 1h")

