"""`wtbox browse BOX [PATH|URL]`: load a page of the box in its headless Chromium; screenshot,
console messages, failed requests; `--compare OTHER_BOX --diff FILE` for a pixel diff of the two."""
from __future__ import annotations

import click

from worktreebox.cli.build import command
from worktreebox.cli.commands._common import emit_json, get_host, info
from worktreebox.operations import observe


@command(observe.BROWSE)
def browse(box, target, screenshot, full_page, viewport, wait_for, timeout, compare, diff, as_json):
    from worktreebox.telemetry import browser as chromium

    if target == "/" and box and box.startswith(("/", "http://", "https://")):
        box, target = None, box  # `wtbox browse /path` inside a box
    try:
        out = observe.browse(get_host(), box, target, screenshot, full_page, viewport, wait_for, timeout, compare,
                             diff, progress=lambda m: info(f"wtbox: {m}"))
    except (chromium.PageTimeout, chromium.PageFailed) as e:
        _partial(e)
        raise
    if as_json:
        emit_json(out)
        return
    _report(out)
    if compare:
        _report(out["compare"])
        click.echo(f"diff: {out['diff_ratio'] * 100:.2f}% of the pixels changed"
                   + (f" ({out['diff']})" if out["diff"] else ""))


def _partial(e) -> None:
    """What was seen before the load failed: the console so far goes to stderr (the logs have it too)."""
    box_id = e.result.get("box", "")
    for m in e.result.get("console", []):
        info(f"  {box_id} console {m['level']}: {m['text']}")
    for r in e.result.get("failed_requests", []):
        info(f"  {box_id} failed {r.get('status') or r.get('error')}: {r['url']}")


def _report(r: dict) -> None:
    errors = sum(1 for m in r["console"] if m["level"] == "error")
    warnings = len(r["console"]) - errors
    click.echo(f"{r['box']}: {r['url']} -> {r['status']} {r['title']!r} in {r['load_seconds']:.2f} s "
               f"({'warm' if r['warm'] else 'cold'} Chromium)")
    click.echo(f"  console: {errors} error(s), {warnings} warning(s); failed requests: {len(r['failed_requests'])}"
               + (f"; screenshot {r['screenshot']}" if r.get("screenshot") else ""))
    for m in r["console"]:
        click.echo(f"  {m['level']}: {m['text']}")
    for f in r["failed_requests"]:
        click.echo(f"  failed {f.get('status') or f.get('error')}: {f['url']}")
