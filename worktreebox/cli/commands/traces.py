"""`wtbox traces BOX`: the spans a box's OTLP endpoint received, as a list or as one trace's tree."""
from __future__ import annotations

import click

from worktreebox.cli.commands._common import box_argument, emit_json, get_host, info, json_option, run_cmd, table


@click.command()
@box_argument
@click.option("--service", "-s", help="Only spans of this service (OTEL_SERVICE_NAME).")
@click.option("--name", help="Only span names matching this glob, e.g. 'GET /items*'.")
@click.option("--min-duration", metavar="DURATION", help="Only spans at least this long: 200ms, 1.5s, 500us.")
@click.option("--status", type=click.Choice(["error", "ok", "unset"]), help="Only spans with this status.")
@click.option("--since", help="Only spans that started after this: a duration ago (5m, 2h) or an ISO time.")
@click.option("--trace", "trace_id", metavar="ID", help="Show one trace (its id or first 8+ hex digits) as a tree.")
@click.option("--logs", "with_logs", is_flag=True, help="With --trace: also the log records carrying its id.")
@click.option("--limit", "-n", type=click.IntRange(min=0), default=100, show_default=True,
              help="At most this many spans (the newest that match).")
@json_option
@run_cmd
def traces(box, service, name, min_duration, status, since, trace_id, with_logs, limit, as_json):
    """List a box's spans (filters combine), or print one trace as an indented tree with durations."""
    host = get_host()
    b = host.get(box)
    found = host.traces(b, service=service, name=name, min_duration=min_duration, status=status, since=since,
                        trace_id=trace_id, with_logs=with_logs, limit=limit)
    if trace_id:
        if as_json:
            emit_json(found)
        else:
            _print_tree(found)
        return
    spans = found
    if as_json:
        emit_json(spans)
        return
    if not spans:
        info("no spans match.")
        return
    rows = [[s["start"][11:23], _ms(s["duration_ms"]), s["status"], s["service"], s["name"], s["trace_id"],
             s["span_id"], s["parent_span_id"] or "-"] for s in spans]
    table(rows, ["START", "DURATION", "STATUS", "SERVICE", "NAME", "TRACE_ID", "SPAN_ID", "PARENT_ID"])


def _ms(value: float) -> str:
    return f"{value:.1f} ms" if value >= 1 else f"{value:.3f} ms"


def _print_tree(tree: dict) -> None:
    from datetime import datetime

    def at(iso: str) -> float:
        return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()

    t0 = at(tree["start"])
    click.echo(f"trace {tree['trace_id']}  {_ms(tree['duration_ms'])}  {tree['span_count']} spans  "
               f"services: {', '.join(tree['services'])}")
    for s in tree["spans"]:
        status = "  ERROR" + (f": {s['status_message']}" if s.get("status_message") else "") \
            if s["status"] == "error" else ""
        missing = "  (parent not received)" if s.get("parent_missing") else ""
        offset = (at(s["start"]) - t0) * 1000
        click.echo(f"{'  ' * (s['depth'] + 1)}{s['name']}  {_ms(s['duration_ms'])}  [{s['service']}]  "
                   f"+{offset:.1f} ms{status}{missing}")
    if "logs" in tree:
        click.echo(f"logs ({len(tree['logs'])})")
        for rec in tree["logs"]:
            first = str(rec.get("msg", "")).split("\n", 1)[0]
            click.echo(f"  {str(rec.get('ts', ''))[11:23]} {rec.get('service', '?')} {rec.get('level', '')}: {first}")
