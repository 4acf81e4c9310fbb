"""`wtbox traces BOX`: the spans a box's OTLP endpoint received, as a list or as one trace's tree."""
from __future__ import annotations

import click

from worktreebox.cli.build import command
from worktreebox.cli.commands._common import emit_json, get_host, info, table
from worktreebox.operations import observe


@command(observe.TRACES)
def traces(box, service, name, min_duration, status, since, trace_id, logs, limit, as_json):
    found = observe.traces(get_host(), box, service, name, min_duration, status, since, trace_id, logs, limit)
    if trace_id:
        if as_json:
            emit_json(found)
        else:
            assert isinstance(found, dict)  # one trace: its tree
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
