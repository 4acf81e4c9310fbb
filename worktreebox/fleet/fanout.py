"""Fan-out: N boxes for one task, a command run in each, and the evidence to pick the best.

`run()` creates boxes TASK-1 … TASK-N in parallel (each a normal box), runs the command in
each, saves what it left on the box branch, then measures every attempt the same way
(checks, service restart, probes, diff, log errors). Results live in the registry under
box.data["fanout"], so `compare` (here) and `pick` (pick.py) work later from any process.
A comparison row is a `FanoutRow`; its JSON names the box `id` (and, for one release, `box`).
"""
from __future__ import annotations

import dataclasses
import re
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from worktreebox import errors
from worktreebox.box import new_id, slugify
from worktreebox.config.load import load_config_for_new
from worktreebox.errors import UsageError, WtboxError
from worktreebox.fleet import pool
from worktreebox.resources import services as svc
from worktreebox.resources.browser import snapshot
from worktreebox.services import boxenv
from worktreebox.services.client import services_status
from worktreebox.system import git, procs
from worktreebox.system.cgroups import RUN, Leaf
from worktreebox.telemetry.logs.reader import available_services, read_records
from worktreebox.telemetry.logs.run import OutputTail, join_pumps, start_logged
from worktreebox.telemetry.logs.writer import LogWriter

if TYPE_CHECKING:
    from worktreebox.box import Box
    from worktreebox.context import HostContext

KEY = "fanout"
RUN_LOG = "run"
CHECK_LOG = "check"
# Logs whose errors are not counted as "errors in logs": a failing check is already its own column.
_NOT_COUNTED = {CHECK_LOG, "browser"}  # console errors have their own column (--browse)
KILL_WAIT = 3.0

# Attempt states, in the order an attempt goes through them.
QUEUED, CREATING, RUNNING, SAVING, CHECKING, SERVICES, PROBING, DONE = (
    "queued", "creating", "running", "saving", "checking", "services", "probing", "done")
FAILED, INTERRUPTED = "failed", "interrupted"
FINAL = {DONE, FAILED, INTERRUPTED}


class Interrupted(errors.Interrupted):
    """Ctrl-C during a fan-out: the runs were stopped, the boxes left for inspection."""

    def __init__(self, message: str, rows: list[dict[str, Any]]) -> None:
        super().__init__(message)
        self.rows = rows


@dataclasses.dataclass
class Options:
    task: str
    n: int
    run: str | None = None
    checks: tuple[str, ...] = ()
    probes: tuple[str, ...] = ()
    repo: str | Path | None = None
    ref: str | None = None
    timeout: float | None = None  # seconds, for --run and each --check
    jobs: int | None = None
    probe_requests: int = 100
    probe_concurrency: int = 4
    warm: bool = False  # top the warm pool up to n boxes first, then claim them all
    use_pool: bool = True
    browse: str | None = None  # a PATH to load in each box's Chromium: screenshot + console errors
    wait: bool = True  # for room on a full host ([host] max_active / max_load); False: refuse at once


@dataclasses.dataclass
class Attempt:
    index: int
    task: str
    state: str = QUEUED
    detail: str = ""
    box: Box | None = None
    error: str | None = None
    started_at: float | None = None
    ended_at: float | None = None

    @property
    def box_id(self) -> str | None:
        return self.box.id if self.box else None


# ---------------------------------------------------------------------- processes

class Runner:
    """Runs shell commands with output captured as log records, and can kill all of them at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._procs: set[subprocess.Popen] = set()
        self.stopped = threading.Event()

    def run(self, cmd: str, cwd: Path, env: dict[str, str], logs_dir: Path, service: str,
            redactor: Callable[[str], str] | None, timeout: float | None,
            keep_lines: int = 40, cgroup: Leaf | None = None) -> dict[str, Any]:
        """{exit, seconds, timed_out, last_lines}; the same record shape as service logs (logs/<service>.jsonl)."""
        redact = redactor or (lambda s: s)
        writer = LogWriter(logs_dir, service, redact)
        tail = OutputTail(redact, keep_lines)
        writer.event("info", f"$ {cmd}", event="start")
        t0 = time.perf_counter()
        with self._lock:
            if self.stopped.is_set():
                writer.close()
                return {"exit": None, "seconds": 0.0, "timed_out": False, "last_lines": []}
            # Own session: Ctrl-C on the terminal reaches only us, and we end each group deliberately.
            proc, threads = start_logged(cmd, cwd, env, writer, tail, cgroup)
            self._procs.add(proc)
        timed_out = False
        try:
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                procs.stop_group(proc, KILL_WAIT)
                rc = 124
        finally:
            with self._lock:
                self._procs.discard(proc)
            join_pumps(threads)
        seconds = time.perf_counter() - t0
        if timed_out:
            msg = f"wtbox: timed out after {timeout:g}s"
            writer.line("stderr", msg)
            tail(msg)
        writer.event("info", f"exited with code {rc} after {seconds:.2f}s", event="exit", code=rc)
        writer.close()
        return {"exit": rc, "seconds": round(seconds, 3), "timed_out": timed_out, "last_lines": tail.lines()}

    def stop(self) -> None:
        """End every running command (SIGTERM to its group, then SIGKILL); no new ones start."""
        with self._lock:
            self.stopped.set()
            running = list(self._procs)
        procs.stop_groups(running, KILL_WAIT)  # all at once: one wait for N commands


# ---------------------------------------------------------------------- the fan-out

class Fanout:
    """One fan-out: plan (refuse early), then attempts in parallel threads."""

    def __init__(self, host: HostContext, opts: Options, on_change: Callable[[Attempt], None] | None = None,
                 new_host: Callable[[Path], HostContext] | None = None) -> None:
        self.host = host
        # Each attempt makes its box through its own host object (its own registry connection,
        # like a separate `wtbox new`): by default another one of the caller's kind.
        self.new_host = new_host or type(host)
        self.opts = opts
        self.on_change = on_change or (lambda a: None)
        self.runner = Runner()
        self.attempts = [Attempt(i, f"{opts.task}-{i}") for i in range(1, opts.n + 1)]
        self.id: str | None = None
        self._repo: Path | None = None
        self._base_sha: str | None = None
        self._config: Any = None

    # -- planning: every refusal happens here, before anything is created
    def plan(self) -> None:
        o = self.opts
        slugify(o.task)
        if o.n < 1:
            raise UsageError("-n must be at least 1.")
        if o.jobs is not None and o.jobs < 1:
            raise UsageError("--jobs must be at least 1.")
        if o.probes and not all(p.startswith(("/", "http://", "https://")) for p in o.probes):
            bad = next(p for p in o.probes if not p.startswith(("/", "http://", "https://")))
            raise UsageError(f"--probe {bad!r} is neither a path such as /health nor an http:// URL.")
        if o.browse and not o.browse.startswith(("/", "http://", "https://")):
            raise UsageError(f"--browse {o.browse!r} is neither a path such as / nor an http:// URL.")
        for i in (1, o.n):
            slugify(f"{o.task}-{i}")
        self._repo = git.resolve_repo(o.repo)
        self._base_sha = git.resolve_commit(self._repo, o.ref or "HEAD")
        self._config = load_config_for_new(self._repo, self._base_sha, explicit_ref=o.ref is not None)
        self._target = pool.resolve_target(self._repo, self._base_sha, explicit_ref=o.ref is not None,
                                           config=self._config, home=self.host.home)
        if o.warm and self._target.why_not:
            raise UsageError(f"--warm: the pool cannot serve this repo: {self._target.why_not}.")
        limit = self.host.config.max_boxes
        live = len(self.host.registry.select_box_ids())
        if o.n > limit - live:
            raise WtboxError(
                f"A fan-out of {o.n} boxes does not fit: this host has {live} of its {limit} boxes ([host] max_boxes), "
                f"so at most {max(0, limit - live)} more; remove boxes or ask for fewer with -n.")
        if not o.wait:
            from worktreebox.admission import check

            check(self.host, more=o.n)  # fan-out boxes stay up for compare: all n count
        self.id = new_id(o.task)

    # -- running
    def start(self) -> list[Any]:
        from concurrent.futures import ThreadPoolExecutor

        if self.id is None:
            self.plan()
        if self.opts.warm:
            pool.top_up(self.host, self._target, self.opts.n, new_host=self.new_host)
        self._pool = ThreadPoolExecutor(max_workers=min(self.opts.jobs or self.opts.n, self.opts.n),
                                        thread_name_prefix="fanout")
        self._futures = [self._pool.submit(self._attempt, a) for a in self.attempts]
        return self._futures

    def wait(self, tick: Callable[[], None] | None = None, interval: float = 0.1) -> list[dict[str, Any]]:
        """Wait for every attempt (calling tick() meanwhile); Ctrl-C stops them all and raises Interrupted."""
        from concurrent.futures import wait as wait_futures

        try:
            pending = set(self._futures)
            while pending:
                _, pending = wait_futures(pending, timeout=interval)
                if tick:
                    tick()
        except KeyboardInterrupt:
            self.interrupt()
            if tick:
                tick()
            raise Interrupted(self._interrupt_message(), self.rows()) from None
        finally:
            self._pool.shutdown(wait=False, cancel_futures=True)
        return self.rows()

    def run(self, tick: Callable[[], None] | None = None) -> list[dict[str, Any]]:
        self.plan()
        self.start()
        return self.wait(tick)

    def interrupt(self) -> None:
        """Stop all runs and wait (bounded) for the workers to leave their boxes in a recorded state."""
        from concurrent.futures import wait as wait_futures

        self.runner.stop()
        for f in self._futures:
            f.cancel()
        wait_futures(self._futures, timeout=60)
        for a in self.attempts:
            if a.state not in FINAL:  # a worker still busy (e.g. waiting for a service): record it anyway
                self._set(a, INTERRUPTED, "")
                if a.box is not None:
                    try:
                        self.host.registry.save_box(a.box)
                    except Exception:
                        pass

    def _interrupt_message(self) -> str:
        ids = [a.box_id for a in self.attempts if a.box_id]
        if not ids:
            return "Interrupted before any box was made; nothing was left behind."
        return (f"Interrupted; the runs were stopped and {len(ids)} box{'es' if len(ids) != 1 else ''} left for "
                f"inspection; remove them with 'wtbox rm --force {' '.join(ids)}' (--force discards their work).")

    def rows(self) -> list[dict[str, Any]]:
        return [row_for(a.box, self.host, attempt=a) if a.box else FanoutRow.without_box(a).to_json()
                for a in self.attempts]

    # -- one attempt (in a worker thread)
    def _set(self, a: Attempt, state: str, detail: str = "") -> None:
        a.state, a.detail = state, detail
        if state in FINAL:
            a.ended_at = time.time()
        if a.box is not None:
            fo = a.box.data.setdefault(KEY, {})
            fo["state"] = state
        try:
            self.on_change(a)
        except Exception:
            pass

    def _attempt(self, a: Attempt) -> None:
        if self.runner.stopped.is_set():
            self._set(a, INTERRUPTED, "not started")
            return
        a.started_at = time.time()
        host = self.new_host(self.host.home)
        try:
            self._set(a, CREATING)
            try:
                box, from_pool = pool.new_box(host, a.task, repo=self._repo, ref=self._base_sha,
                                              config=self._config, target=self._target, use_pool=self.opts.use_pool,
                                              progress=lambda m: self._set(a, CREATING, m), wait=self.opts.wait,
                                              on_wait=lambda m: self._set(a, CREATING, m))
            except WtboxError as e:
                a.error = str(e)
                self._set(a, FAILED, "creating the box failed")
                return
            a.box = box
            o = self.opts
            box.data[KEY] = {"id": self.id, "task": o.task, "index": a.index, "n": o.n, "run": o.run,
                             "checks": list(o.checks), "probes": list(o.probes), "base_sha": self._base_sha,
                             "started_at": a.started_at, "state": CREATING, "result": {}, "from_pool": from_pool}
            host.registry.save_box(box)
            self._measure(host, a, box)
            if self.runner.stopped.is_set():
                self._set(a, INTERRUPTED)
            else:
                self._set(a, DONE)
        except _Stop:
            self._set(a, INTERRUPTED)
        except Exception as e:  # one attempt's surprise never stops the others
            a.error = f"{type(e).__name__}: {e}"
            self._set(a, FAILED, a.error)
        finally:
            if a.box is not None:
                fo = a.box.data[KEY]
                fo["ended_at"] = a.ended_at or time.time()
                if a.error:
                    fo["result"]["error"] = a.error
                try:
                    host.registry.save_box(a.box)
                except Exception:
                    pass
            host.registry.close()

    def _measure(self, host: HostContext, a: Attempt, box: Box) -> None:
        o = self.opts
        res: dict[str, Any] = box.data[KEY]["result"]
        env = boxenv.process_env(box)
        env["WTBOX_FANOUT_INDEX"] = str(a.index)
        env["WTBOX_FANOUT_N"] = str(o.n)
        redact = boxenv.redactor_for(box, {})

        def step(state: str, detail: str = "") -> None:
            if self.runner.stopped.is_set():
                raise _Stop()
            self._set(a, state, detail)
            host.registry.save_box(box)

        if o.run:
            step(RUNNING)
            cmd = o.run.replace("{i}", str(a.index)).replace("{box}", box.id)
            r = self.runner.run(cmd, box.path, env, box.logs_dir, RUN_LOG, redact, o.timeout,
                                cgroup=Leaf(host.home, box.id, RUN))
            if self.runner.stopped.is_set():
                raise _Stop()
            res["run"] = {"cmd": cmd, **{k: r[k] for k in ("exit", "seconds", "timed_out")},
                          "last_lines": r["last_lines"][-10:]}
            step(SAVING)
            try:
                res["commit"] = git.save_work(box.path, f"wtbox fanout {o.task}: attempt {a.index} of {o.n}",
                                              f"Run: {cmd}\nExit code: {r['exit']}\nBox: {box.id}", label=box.id)
            except WtboxError as e:
                res.setdefault("problems", []).append(str(e))
        if o.checks:
            checks = []
            for j, cmd in enumerate(o.checks, 1):
                step(CHECKING, f"{j}/{len(o.checks)}: {cmd}")
                r = self.runner.run(cmd, box.path, env, box.logs_dir, CHECK_LOG, redact, o.timeout,
                                    cgroup=Leaf(host.home, box.id, RUN))
                if self.runner.stopped.is_set():
                    raise _Stop()
                checks.append({"cmd": cmd, "exit": r["exit"], "seconds": r["seconds"], "timed_out": r["timed_out"],
                               **test_counts(r["last_lines"])})
            res["checks"] = checks
        if o.run:
            step(SERVICES)
            res["services"] = restart_services(host, box)
        else:  # nothing changed since the services started with the box
            res["services"] = _current_ready(box) or {}
        if o.probes:
            if res["services"].get("error"):
                res["probes"] = {p: {"error": "services are not ready"} for p in o.probes}
            else:
                res["probes"] = {}
                for p in o.probes:
                    step(PROBING, p)
                    res["probes"][p] = run_probe(host, box, p, o.probe_requests, o.probe_concurrency)
        if o.browse:
            step(PROBING, f"browse {o.browse}")
            res["browse"] = browse_attempt(host, box, o.browse)
        res["diff"] = git.diff_stat(box.path, box.data.get("base_sha"))
        res["log_errors"] = log_errors(box)


class _Stop(Exception):
    """Raised inside a worker when the fan-out was interrupted."""


def run(host: HostContext, opts: Options, on_change: Callable[[Attempt], None] | None = None,
        tick: Callable[[], None] | None = None) -> list[dict[str, Any]]:
    """Plan, create, run and measure; the comparison rows (one per attempt, in index order)."""
    return Fanout(host, opts, on_change).run(tick)


# ---------------------------------------------------------------------- measurements

_COUNT = re.compile(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed)\b")


def test_counts(lines: list[str]) -> dict[str, int]:
    """pytest-style counts from a summary line ("2 failed, 3 passed, 1 error in 0.1s"); {} when there is none."""
    for line in reversed(lines):
        found = _COUNT.findall(line)
        if found:
            out: dict[str, int] = {}
            for num, word in found:
                key = "errors" if word.startswith("error") else word
                out[key] = out.get(key, 0) + int(num)
            return out
    return {}


test_counts.__test__ = False  # type: ignore[attr-defined]  # not a pytest test


def restart_services(host: HostContext, box: Box) -> dict[str, Any]:
    """Restart the box's services (so they run the attempt's code) and time until they are all ready."""
    try:
        cfg = host.repo_config(box)
    except WtboxError as e:
        return {"error": str(e)}
    if not cfg.services:
        return {}
    t0 = time.perf_counter()
    try:
        status = svc.services_restart(host, box)
    except (WtboxError, OSError, ValueError) as e:  # OSError/ValueError: the supervisor went away mid-command
        return {"error": str(e).splitlines()[0], "seconds": round(time.perf_counter() - t0, 3)}
    readies = [s.get("ready_seconds") for s in status.values() if s.get("ready_seconds") is not None]
    return {"seconds": round(time.perf_counter() - t0, 3), "ready_seconds": round(max(readies), 3) if readies else None,
            "services": {n: {"state": s.get("state"), "ready_seconds": s.get("ready_seconds")}
                         for n, s in status.items()}}


def run_probe(host: HostContext, box: Box, target: str, n: int, concurrency: int) -> dict[str, Any]:
    """`--probe PATH` of one attempt: Host.probe's figures (recorded in the box's metrics), or the error."""
    try:
        r = host.probe(box, target, n=n, concurrency=concurrency)
    except WtboxError as e:
        return {"error": str(e)}
    return {k: r.get(k) for k in ("url", "n", "answered", "errors", "p50_ms", "p95_ms", "p99_ms", "max_ms", "rps",
                                  "recorded")}


def browse_attempt(host: HostContext, box: Box, target: str) -> dict[str, Any]:
    """`--browse PATH`: a screenshot in the box dir and the console errors of one load."""
    try:
        url = host.probe_url(box, target)
    except WtboxError as e:
        return {"error": str(e), "screenshot": None, "console_errors": None}
    return snapshot(host, box, url, box.dir / "browser" / "fanout.png")


def log_errors(box: Box) -> int | None:
    """Error-level records in the box's logs (services, run, events; not the checks)."""
    if not box.logs_dir.is_dir():
        return None
    names = [s for s in available_services(box.logs_dir) if s not in _NOT_COUNTED and not s.startswith("_")]
    try:
        recs = read_records(box.logs_dir, services=names or ["-"], min_level="error", include_events=True)
    except OSError:
        return None
    return sum(1 for r in recs if r.get("service") not in _NOT_COUNTED)


# ---------------------------------------------------------------------- comparison

# (key, field, "low"|"high" is better, header)
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
    def without_box(cls, a: Attempt) -> FanoutRow:
        """An attempt whose box was never made."""
        return cls(task=a.task, index=a.index, state=a.state, error=a.error)


def row_for(box: Box, host: HostContext | None = None, attempt: Attempt | None = None) -> dict[str, Any]:
    """One comparison row: from the recorded fan-out result, else what can be derived from the box now."""
    fo = box.data.get(KEY) or {}
    res = fo.get("result") or {}
    run_ = res.get("run") or {}
    checks = res.get("checks")
    diff = res["diff"] if "diff" in res else git.diff_stat(box.path, box.data.get("base_sha"))
    errors = res["log_errors"] if "log_errors" in res else log_errors(box)
    services = res.get("services")
    if services is None and host is not None:
        services = _current_ready(box)
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


def _current_ready(box: Box) -> dict[str, Any] | None:
    status = services_status(box)
    readies = [s.get("ready_seconds") for s in status.values() if s.get("ready_seconds") is not None]
    return {"ready_seconds": max(readies)} if readies else None


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
