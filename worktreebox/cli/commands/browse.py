"""`wtbox browse BOX [PATH|URL]`: load a page of the box in its headless Chromium; screenshot,
console messages, failed requests; `--compare OTHER_BOX --diff FILE` for a pixel diff of the two."""
from __future__ import annotations

import click

from worktreebox.cli.commands._common import emit_json, get_host, info, json_option, run_cmd


@click.command()
@click.argument("box", required=False)
@click.argument("target", required=False, metavar="[PATH|URL]")
@click.option("--screenshot", "screenshot", metavar="FILE.png", help="Write a PNG of the page here.")
@click.option("--full-page", is_flag=True, help="Capture the whole scrollable page, not just the viewport.")
@click.option("--viewport", default="1280x800", show_default=True, metavar="WxH", help="Browser window size.")
@click.option("--wait-for", metavar="SELECTOR|networkidle",
              help="After the load event, also wait for this CSS selector to be visible (or for the network to idle).")
@click.option("--timeout", default="30s", show_default=True, metavar="DURATION",
              help="Give up when the page has not loaded after this long.")
@click.option("--compare", "other", metavar="OTHER_BOX", help="Load the same PATH in OTHER_BOX and diff the two.")
@click.option("--diff", "diff_file", metavar="FILE.png", help="With --compare: write the pixel diff here.")
@json_option
@run_cmd
def browse(box, target, screenshot, full_page, viewport, wait_for, timeout, other, diff_file, as_json):
    """Load PATH (on the box's first port; default /) or URL in the box's Chromium."""
    from worktreebox.config.load import parse_duration
    from worktreebox.telemetry import browser as chromium

    host = get_host()
    if target is None and box and box.startswith(("/", "http://", "https://")):
        box, target = None, box  # `wtbox browse /path` inside a box
    b = host.get(box)
    ob = host.get(other) if other else None
    try:
        out = host.browse(b, target or "/", screenshot=screenshot, full_page=full_page, viewport=viewport,
                          wait_for=wait_for, timeout=parse_duration(timeout, where="--timeout"), compare=ob,
                          diff=diff_file, progress=lambda m: info(f"wtbox: {m}"))
    except (chromium.PageTimeout, chromium.PageFailed) as e:
        _partial(e)
        raise
    if as_json:
        emit_json(out)
        return
    _report(out)
    if ob is not None:
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
