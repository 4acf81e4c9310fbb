"""`wtbox fanout`, `wtbox compare`, `wtbox pick`: N attempts at one task, the evidence, the choice."""
from __future__ import annotations

import sys
import threading
import time

import click

from worktreebox.cli.build import command
from worktreebox.cli.commands._common import emit_json, get_host, info
from worktreebox.errors import UsageError, WtboxError
from worktreebox.operations import fleet


@command(fleet.FANOUT)
def fanout(task, n, ref, from_box, run, checks, probes, probe_requests, browse, timeout, jobs, repo, warm, no_pool,
           no_wait, as_json):
    from worktreebox.fleet import fanout as F

    fo = fleet.plan_fanout(get_host(), task, n, ref, run, checks, probes, probe_requests, browse, timeout, jobs,
                           repo, warm, no_pool, no_wait, from_box)  # refusals before anything is created or drawn
    t0 = time.perf_counter()
    view = _LiveView(fo) if sys.stderr.isatty() else _PlainView(fo)
    fo.on_change = view.changed
    try:
        with view:
            fo.start()
            rows = fo.wait(view.tick)
    except F.Interrupted as e:
        if as_json:
            emit_json(e.rows)
        raise
    info(f"fan-out {fo.id}: {n} attempts in {time.perf_counter() - t0:.1f}s")
    if as_json:
        emit_json(rows)
    else:
        print_rows(rows)
        made = [r["id"] for r in rows if r["id"]]
        if made:
            info(f"pick one with 'wtbox pick BOX' (removes the others); again: 'wtbox compare --fanout {task}'")
    fleet.all_succeeded(rows)


class _PlainView:
    """One line on stderr per state change (logs, CI, pipes)."""

    def __init__(self, fo) -> None:
        self.fo = fo
        self.lock = threading.Lock()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def changed(self, a) -> None:
        from worktreebox.fleet.fanout import CREATING

        if a.state == CREATING and a.detail:
            return  # creation notes are for the live view
        with self.lock:
            who = a.box_id or a.task
            extra = f": {a.error}" if a.error else (f" ({a.detail})" if a.detail else "")
            click.echo(f"{who}  {a.state}{extra}", err=True)

    def tick(self) -> None:
        pass


class _LiveView:
    """A rich table on stderr, redrawn while the attempts run."""

    STYLE = {"done": "green", "failed": "red", "interrupted": "yellow", "queued": "dim"}

    def __init__(self, fo) -> None:
        from rich.console import Console
        from rich.live import Live

        self.fo = fo
        self.live = Live(self._render(), console=Console(stderr=True), refresh_per_second=8, transient=False)

    def __enter__(self):
        self.live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.live.update(self._render())
        self.live.__exit__(*exc)

    def changed(self, a) -> None:
        pass  # redrawn by tick() in the main thread

    def tick(self) -> None:
        self.live.update(self._render())

    def _render(self):
        from rich.table import Table

        t = Table(box=None, header_style="bold")
        for h in ("#", "BOX", "STATE", "TIME", "DETAIL"):
            t.add_column(h)
        now = time.time()
        for a in self.fo.attempts:
            took = "" if a.started_at is None else f"{(a.ended_at or now) - a.started_at:.1f}s"
            detail = a.error or a.detail
            t.add_row(str(a.index), a.box_id or a.task, f"[{self.STYLE.get(a.state, 'cyan')}]{a.state}[/]", took,
                      (detail[:70] + "…") if len(detail) > 71 else detail)
        return t


@command(fleet.COMPARE)
def compare(boxes, fanout, sort, as_json):
    rows = fleet.compare(get_host(), boxes, fanout, sort)
    if as_json:
        emit_json(rows)
        return
    print_rows(rows)


YES = click.option("--yes", is_flag=True, help="Remove the other boxes of the fan-out without asking.")


@command(fleet.PICK, extras=[YES])
def pick(box, merge_into, push, remote, yes, as_json):
    from worktreebox.fleet import compare as C
    from worktreebox.fleet import pick as P

    host = get_host()
    chosen, others = fleet.plan_pick(host, box, merge_into, push, remote)
    if others and not yes:
        ids = ", ".join(b.id for b in others)
        if not sys.stdin.isatty():
            raise UsageError(f"pick would remove {len(others)} other boxes of the fan-out ({ids}); "
                             "pass --yes to confirm when there is no terminal.")
        click.confirm(f"Keep {chosen.id} and remove {len(others)} other boxes ({ids})?", abort=True, err=True)
    if not (chosen.data.get(C.KEY) or {}).get("id"):
        info(f"{chosen.id} is not part of a fan-out; it is only marked keep.")
    out = P.pick(host, chosen, others, merge_into=merge_into, push=push, remote=remote,
                 note=(lambda m: None) if as_json else info)
    if as_json:
        emit_json(out)
    else:
        click.echo(f"kept {out['kept']} (branch {out['branch']}, marked keep)")
        if out["kept_branches"]:
            click.echo("kept branches with commits no other branch has: " + " ".join(out["kept_branches"]))
            info(f"delete one when you no longer need it: git -C {chosen.repo} branch -D BRANCH")
    if out["failed"]:
        first = out["failed"][0]
        raise WtboxError(f"{len(out['failed'])} box(es) could not be removed ({first['box']}: {first['error']}); "
                         f"run 'wtbox rm --force {first['box']}' again.")


# ---------------------------------------------------------------------- table

def _cell(field: str, r: dict) -> str:
    v = r.get(field)
    if field == "run_exit":
        return "timeout" if r.get("timed_out") else ("-" if v is None else str(v))
    if v is None:
        if field == "ready_seconds" and r.get("services_error"):
            return "failed"
        return "-"
    if field == "run_seconds":
        return f"{v:.1f}s"
    if field == "checks_passed":
        return f"{v}/{r.get('checks_total')}"
    if field == "diff_lines":
        return f"{r['diff_files']}f +{r['diff_insertions']} -{r['diff_deletions']}"
    if field == "ready_seconds":
        return f"{v:.2f}s"
    if field == "p95_ms":
        return f"{v:.1f}ms"
    return str(v)


def print_rows(rows: list[dict]) -> None:
    """The comparison table on stdout; the best value of each column is highlighted (or starred)."""
    from worktreebox.fleet import compare as C

    if not rows:
        info("nothing to compare")
        return
    best = C.best_values(rows)
    headers = ["BOX", "STATE"] + [h for *_, h in C.COLUMNS] + ["URL"]
    body = []
    for r in rows:
        cells = [(r["id"] or f"{r['task']} (no box)", False), (r.get("state") or "", False)]
        for _, field, _, _ in C.COLUMNS:
            is_best = best[field] is not None and r.get(field) == best[field] and len(rows) > 1
            cells.append((_cell(field, r), is_best))
        cells.append((r.get("url") or "-", False))
        body.append(cells)
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table

        t = Table(box=None, header_style="bold", collapse_padding=True, pad_edge=False)
        for h in headers:
            t.add_column(h, no_wrap=h in ("BOX", "DIFF", "URL"))
        for cells in body:
            t.add_row(*[f"[bold green]{c}[/]" if b else c for c, b in cells])
        Console().print(t)
    else:
        text = [headers] + [[c + ("*" if b else "") for c, b in cells] for cells in body]
        widths = [max(len(row[i]) for row in text) for i in range(len(headers))]
        for row in text:
            click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if len(rows) > 1:
            info("* best in its column")
    for r in rows:
        if r.get("error"):
            info(f"{r['id'] or r['task']}: {r['error']}")
