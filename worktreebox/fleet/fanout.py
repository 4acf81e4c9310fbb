"""Fan-out: N boxes for one task, a command run in each, and the evidence to pick the best.

`run()` creates boxes TASK-1 … TASK-N in parallel (each a normal box), runs the command in
each, saves what it left on the box branch, then measures every attempt the same way
(measure.py: checks, service restart, probes, diff, log errors). Results live in the registry
under box.data["fanout"], so `compare` (compare.py) and `pick` (pick.py) work later from any
process.
"""
from __future__ import annotations

import dataclasses
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from worktreebox import errors
from worktreebox.box import new_id, slugify
from worktreebox.config.load import load_config_for_new
from worktreebox.errors import ParamError, WtboxError
from worktreebox.fleet import pool
from worktreebox.fleet.compare import KEY, FanoutRow, row_for
from worktreebox.fleet.measure import (
    CHECK_LOG,
    browse_attempt,
    current_ready,
    log_errors,
    restart_services,
    run_probe,
    test_counts,
)
from worktreebox.providers import sandbox
from worktreebox.services import boxenv
from worktreebox.system import git, procs
from worktreebox.system.cgroups import RUN, Leaf
from worktreebox.telemetry.logs.run import OutputTail, join_pumps, start_logged
from worktreebox.telemetry.logs.writer import LogWriter

if TYPE_CHECKING:
    from worktreebox.box import Box
    from worktreebox.fleet.snapshots import Snapshot
    from worktreebox.host import Host
    from worktreebox.resources.base import Origin

RUN_LOG = "run"

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
    from_box: str | None = None  # every attempt a fork of this box's current state (fork.py)


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
            keep_lines: int = 40, cgroup: Leaf | None = None, launcher: procs.Launcher | None = None) -> dict[str, Any]:
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
            proc, threads = start_logged(cmd, cwd, env, writer, tail, cgroup, launcher)
            self._procs.add(proc)
        timed_out = False
        try:
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                procs.stop_group(proc)
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
        procs.stop_groups(running)  # all at once: one wait for N commands


# ---------------------------------------------------------------------- the fan-out

class Fanout:
    """One fan-out: plan (refuse early), then attempts in parallel threads."""

    def __init__(self, host: Host, opts: Options, on_change: Callable[[Attempt], None] | None = None,
                 new_host: Callable[[Path], Host] | None = None) -> None:
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
            raise ParamError("{n} must be at least 1.", "n")
        if o.jobs is not None and o.jobs < 1:
            raise ParamError("{jobs} must be at least 1.", "jobs")
        for i in (1, o.n):
            slugify(f"{o.task}-{i}")
        self._source: Box | None = None
        self._origin: Origin | None = None
        self._snapshot: Snapshot | None = None
        if o.from_box:
            self._plan_from_box(o.from_box)
            return
        self._repo = git.resolve_repo(o.repo)
        self._base_sha = git.resolve_commit(self._repo, o.ref or "HEAD")
        self._config = load_config_for_new(self._repo, self._base_sha, explicit_ref=o.ref is not None)
        self._target = pool.resolve_target(self._repo, self._base_sha, explicit_ref=o.ref is not None,
                                           config=self._config, home=self.host.home)
        if o.warm and self._target.why_not:
            raise ParamError(f"{{warm}}: the pool cannot serve this repo: {self._target.why_not}.", "warm")
        self._check_room()
        self.id = new_id(o.task)

    def _check_room(self) -> None:
        o = self.opts
        limit = self.host.config.max_boxes
        live = len(self.host.registry.select_box_ids())
        if o.n > limit - live:
            raise WtboxError(
                f"A fan-out of {o.n} boxes does not fit: this host has {live} of its {limit} boxes ([host] max_boxes), "
                f"so at most {max(0, limit - live)} more; remove boxes or ask for fewer.")
        if not o.wait:
            from worktreebox.admission import check

            check(self.host, more=o.n)  # fan-out boxes stay up for compare: all n count

    def _plan_from_box(self, ref: str) -> None:
        """Attempts that start from BOX's state: its repo, its tree, and (at start) a snapshot of it."""
        from worktreebox.fleet import snapshots

        if self.opts.warm:
            raise ParamError("{warm} fills the pool, but forks of {from_box} never come from it.", "warm", "from_box")
        self._source = self.host.get(ref)
        snapshots.check_box(self._source)
        self._repo = Path(self._source.repo)
        self._base_sha = self._source.data["worktree"]["tree"]
        self._config = load_config_for_new(self._repo, self._base_sha, explicit_ref=True)
        self._check_room()
        self.id = new_id(self.opts.task)

    def start(self) -> list[Any]:
        from concurrent.futures import ThreadPoolExecutor

        if self.id is None:
            self.plan()
        if self.opts.warm:
            pool.top_up(self.host, self._target, self.opts.n, new_host=self.new_host)
        if self._source is not None:  # one snapshot of BOX now; every attempt is a fork of it
            from worktreebox.fleet import fork, snapshots

            self._snapshot = snapshots.take(self.host, self._source, internal=True)
            self._origin = fork.origin_of(self._snapshot)
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
            self._drop_snapshot()
        return self.rows()

    def _drop_snapshot(self) -> None:
        if self._source is not None and self._snapshot is not None:
            from worktreebox.fleet import snapshots

            snapshots.remove(self.host, self._source, self._snapshot.name)
            self._snapshot = None

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
                if self._origin is not None:
                    box, from_pool = host.new(a.task, repo=self._repo, ref=self._base_sha, config=self._config,
                                              origin=self._origin, progress=lambda m: self._set(a, CREATING, m),
                                              wait=self.opts.wait, on_wait=lambda m: self._set(a, CREATING, m)), False
                else:
                    box, from_pool = pool.new_box(host, a.task, repo=self._repo, ref=self._base_sha,
                                                  config=self._config, target=self._target,
                                                  use_pool=self.opts.use_pool,
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
                             "started_at": a.started_at, "state": CREATING, "result": {}, "from_pool": from_pool,
                             "from_box": self._source.id if self._source else None}
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

    def _measure(self, host: Host, a: Attempt, box: Box) -> None:
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
                                cgroup=Leaf(host.home, box.id, RUN), launcher=host.launcher(box))
            if self.runner.stopped.is_set():
                raise _Stop()
            res["run"] = {"cmd": cmd, **{k: r[k] for k in ("exit", "seconds", "timed_out")},
                          "last_lines": r["last_lines"][-10:]}
            step(SAVING)
            try:
                res["commit"] = git.save_work(box.path, f"wtbox fanout {o.task}: attempt {a.index} of {o.n}",
                                              f"Run: {cmd}\nExit code: {r['exit']}\nBox: {box.id}", label=box.id,
                                              launcher=host.launcher(box))
                sandbox.bring_back(box)  # the attempt on its branch in the repository, as without a sandbox
            except WtboxError as e:
                res.setdefault("problems", []).append(str(e))
        # Without --check, the repo's test command ([test] cmd, `wtbox test`) is the check.
        wanted = o.checks or ((self._config.test.cmd,) if self._config is not None and self._config.test.cmd else ())
        if wanted:
            checks = []
            for j, cmd in enumerate(wanted, 1):
                step(CHECKING, f"{j}/{len(wanted)}: {cmd}")
                r = self.runner.run(cmd, box.path, env, box.logs_dir, CHECK_LOG, redact, o.timeout,
                                    cgroup=Leaf(host.home, box.id, RUN), launcher=host.launcher(box))
                if self.runner.stopped.is_set():
                    raise _Stop()
                checks.append({"cmd": cmd, "exit": r["exit"], "seconds": r["seconds"], "timed_out": r["timed_out"],
                               **test_counts(r["last_lines"])})
            res["checks"] = checks
        if o.run:
            step(SERVICES)
            res["services"] = restart_services(host, box)
        else:  # nothing changed since the services started with the box
            res["services"] = current_ready(box) or {}
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
        res["diff"] = git.diff_stat(box.path, box.data.get("base_sha"), launcher=host.launcher(box))
        res["log_errors"] = log_errors(box)


class _Stop(Exception):
    """Raised inside a worker when the fan-out was interrupted."""


def run(host: Host, opts: Options, on_change: Callable[[Attempt], None] | None = None,
        tick: Callable[[], None] | None = None) -> list[dict[str, Any]]:
    """Plan, create, run and measure; the comparison rows (one per attempt, in index order)."""
    return Fanout(host, opts, on_change).run(tick)
