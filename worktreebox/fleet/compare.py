"""Comparing the attempts of a fan-out (or any boxes): one row per box, sorted, the best per column.

Results live in the registry under box.data[KEY], so `compare` works later from any process. A
comparison row is a `FanoutRow`; its JSON names the box `id` (and, for one release, `box`).
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from worktreebox.errors import UsageError
from worktreebox.fleet.measure import current_ready, log_errors
from worktreebox.system import git

if TYPE_CHECKING:
    from worktreebox.box import Box
    from worktreebox.context import HostContext

KEY = "fanout"  # box.data[KEY]: the fan-out an attempt belongs to, and what it measured

COLUMNS = [
    ("run_exit", "run_exit", "low", "RUN"),
    ("run_seconds", "run_seconds", "low", "TIME"),
    ("checks_passed", "checks_passed", "high", "CHECKS"),
    ("tests_passed", "tests_passed", "high", "PASSED"),
    ("tests_failed", "tests_failed", "low", "FAILED"),
    ("diff", "diff_lines", "low", "DIFF"),
    ("ready", "ready_seconds", "low", "READY"),
    ("p95", "p95_ms", "low", "P95"),
    ("errors", "log_errors", "low", "ERRORS"),
    ("console", "console_errors", "low", "CONSOLE"),
]
SORT_KEYS = ["best", "index", "id", "box"] + [k for k, *_ in COLUMNS]


@dataclasses.dataclass
class FanoutRow:
    """One comparison row (`compare`, `fanout --json`): the one definition of its keys.

    `id` names the box, as in `new`/`ls`/`status`; `box` is the same value under its old
    name, kept for one release.
    """

    task: str
    index: int | None = None
    state: str | None = None
    id: str | None = None
    fanout: str | None = None
    branch: str | None = None
    commit: str | None = None
    run_exit: int | None = None
    run_seconds: float | None = None
    timed_out: bool = False
    checks_passed: int | None = None
    checks_total: int | None = None
    tests_passed: int | None = None
    tests_failed: int | None = None
    diff_files: int | None = None
    diff_insertions: int | None = None
    diff_deletions: int | None = None
    diff_lines: int | None = None
    ready_seconds: float | None = None
    services_error: str | None = None
    p95_ms: float | None = None
    probes: dict[str, Any] = dataclasses.field(default_factory=dict)
    checks: list[dict[str, Any]] | None = None
    log_errors: int | None = None
    console_errors: int | None = None  # fanout --browse
    screenshot: str | None = None
    error: str | None = None
    dir: str | None = None
    from_pool: bool | None = None
    url: str | None = None  # the box's first port through the host router

    def to_json(self) -> dict[str, Any]:
        row = dataclasses.asdict(self)
        return {"id": row["id"], "box": row["id"], **row}

    @classmethod
    def without_box(cls, a: Any) -> FanoutRow:
        """An attempt (fanout.Attempt) whose box was never made."""
        return cls(task=a.task, index=a.index, state=a.state, error=a.error)


def row_for(box: Box, host: HostContext | None = None, attempt: Any = None) -> dict[str, Any]:
    """One comparison row: from the recorded fan-out result, else what can be derived from the box now."""
    fo = box.data.get(KEY) or {}
    res = fo.get("result") or {}
    run_ = res.get("run") or {}
    checks = res.get("checks")
    if checks is None and box.data.get("test"):  # no fan-out check: the box's last `wtbox test`
        checks = [box.data["test"]]
    diff = res["diff"] if "diff" in res else git.diff_stat(box.path, box.data.get("base_sha"),
                                                           launcher=host.launcher(box) if host else None)
    errors = res["log_errors"] if "log_errors" in res else log_errors(box)
    services = res.get("services")
    if services is None and host is not None:
        services = current_ready(box)
    probes = res.get("probes") or {}
    p95s = [p["p95_ms"] for p in probes.values() if p.get("p95_ms") is not None]
    passed = failed = None
    if checks:
        counted = [c for c in checks if any(k in c for k in ("passed", "failed", "errors"))]
        if counted:
            passed = sum(c.get("passed", 0) for c in counted)
            failed = sum(c.get("failed", 0) + c.get("errors", 0) for c in counted)
    return FanoutRow(
        id=box.id, task=box.task, fanout=fo.get("id"), index=fo.get("index"),
        state=attempt.state if attempt else fo.get("state", box.state), branch=box.branch, commit=res.get("commit"),
        run_exit=run_.get("exit"), run_seconds=run_.get("seconds"), timed_out=run_.get("timed_out", False),
        checks_passed=sum(1 for c in checks if c.get("exit") == 0) if checks is not None else None,
        checks_total=len(checks) if checks is not None else None, tests_passed=passed, tests_failed=failed,
        diff_files=diff["files"] if diff else None, diff_insertions=diff["insertions"] if diff else None,
        diff_deletions=diff["deletions"] if diff else None,
        diff_lines=diff["insertions"] + diff["deletions"] if diff else None,
        ready_seconds=(services or {}).get("ready_seconds"), services_error=(services or {}).get("error"),
        p95_ms=max(p95s) if p95s else None, probes=probes, checks=checks, log_errors=errors,
        console_errors=(res.get("browse") or {}).get("console_errors"),
        screenshot=(res.get("browse") or {}).get("screenshot"),
        error=res.get("error") or (attempt.error if attempt else None), dir=str(box.dir),
        from_pool=fo.get("from_pool"), url=_url(host, box),
    ).to_json()


def _url(host: HostContext | None, box: Box) -> str | None:
    from worktreebox.router.control import urls

    return next(iter(urls(host, box).values()), None) if host is not None else None


def fanout_boxes(host: HostContext, task: str) -> list[Box]:
    """The boxes of the latest fan-out named TASK (or with that fan-out id), in index order."""
    boxes = [b for b in host.list() if (b.data.get(KEY) or {}).get("task") == task
             or (b.data.get(KEY) or {}).get("id") == task]
    if not boxes:
        raise UsageError(f"No fan-out named {task!r} has boxes; 'wtbox ls' lists the boxes.")
    latest = max(boxes, key=lambda b: b.created_at).data[KEY]["id"]
    return sorted((b for b in boxes if b.data[KEY]["id"] == latest), key=lambda b: b.data[KEY].get("index") or 0)


def compare(host: HostContext, refs: list[str] | None = None, fanout: str | None = None,
            sort: str | None = None) -> list[dict[str, Any]]:
    if bool(refs) == bool(fanout):
        raise UsageError("Give either BOX... or --fanout TASK to compare.")
    if fanout:
        boxes = fanout_boxes(host, fanout)
    else:
        boxes = []
        for ref in refs or []:
            b = host.get(ref)
            if b.id not in {x.id for x in boxes}:
                boxes.append(b)
    return sort_rows([row_for(b, host) for b in boxes], sort)


def best_key(row: dict[str, Any]) -> tuple:
    """The order of `--sort best`: runs that worked, checks passed, fewest failing tests, then speed and size."""
    inf = float("inf")

    def low(v: Any) -> float:
        return inf if v is None else v

    return (row.get("run_exit") not in (0, None), row.get("services_error") is not None,
            -(row.get("checks_passed") or 0), low(row.get("tests_failed")), -(row.get("tests_passed") or 0),
            low(row.get("log_errors")), low(row.get("p95_ms")), low(row.get("ready_seconds")),
            low(row.get("diff_lines")), low(row.get("index")))


def sort_rows(rows: list[dict[str, Any]], key: str | None) -> list[dict[str, Any]]:
    if not key:
        return rows
    if key not in SORT_KEYS:
        raise UsageError(f"Cannot sort by {key!r}; use one of {', '.join(SORT_KEYS)}.")
    if key == "best":
        return sorted(rows, key=best_key)
    if key in ("index", "id", "box"):
        return sorted(rows, key=lambda r: (r.get(key) is None, r.get(key) if r.get(key) is not None else 0))
    field, better = next((f, b) for k, f, b, _ in COLUMNS if k == key)
    present = [r for r in rows if r.get(field) is not None]
    missing = [r for r in rows if r.get(field) is None]
    return sorted(present, key=lambda r: r[field], reverse=better == "high") + missing


def best_values(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per column field, the best value among the rows (None when no row has one)."""
    out = {}
    for _, field, better, _ in COLUMNS:
        vals = [r[field] for r in rows if r.get(field) is not None]
        if field == "run_exit":
            out[field] = 0 if 0 in vals else None
        elif vals:
            out[field] = max(vals) if better == "high" else min(vals)
        else:
            out[field] = None
    return out
