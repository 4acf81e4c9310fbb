"""`wtbox test BOX`: the repo's test command ([test] cmd, which `wtbox init` finds in CI) run in the box.

It runs as `exec` would run it (the box env with its running secrets, the worktree, the box's
cgroup), its output captured as the box's `test` log and, from the CLI, shown as it comes.
The result (exit code, seconds, pytest/jest-style counts, commit) is kept in box.data["test"]:
`compare` shows it as the box's check when no fan-out check was run, and `fanout` runs this
command as its check when no --check is given.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from worktreebox.errors import UsageError, WtboxError
from worktreebox.services import boxenv
from worktreebox.system import cgroups
from worktreebox.telemetry.logs.run import OutputTail, join_pumps, start_logged
from worktreebox.telemetry.logs.writer import LogWriter

if TYPE_CHECKING:
    from worktreebox.box import Box
    from worktreebox.host import Host

LOG = "test"
DATA_KEY = "test"
KEEP_LINES = 20


def test_command(host: Host, box: Box) -> tuple[str, float]:
    """([test] cmd rendered over the box facts, timeout) of the box's wtbox.toml; a UsageError that
    says where to get one when it has none."""
    from worktreebox.config.templating import render

    cfg = host.repo_config(box)
    if not cfg.test.cmd:
        raise UsageError(f"{box.id} has no test command: add [test] cmd to {cfg.source} "
                         "(`wtbox init` finds it in the repo's CI), or pass one with --cmd.")
    return render(cfg.test.cmd, box.facts(), f"{cfg.source}: [test] cmd"), cfg.test.timeout


def run_test(host: Host, box: Box, cmd: str | None = None, timeout: float | None = None,
             on_line: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the test command in the box; {cmd, exit, seconds, timed_out, passed/failed/errors, last_lines}."""
    from worktreebox.fleet.measure import test_counts

    if not box.path.is_dir():
        raise WtboxError(f"The worktree of {box.id} is gone ({box.path}); remove the box with 'wtbox rm {box.id}'.")
    if cmd is None:
        cmd, default_timeout = test_command(host, box)
        timeout = timeout or default_timeout
    secrets = host.running_secrets(box)
    redact = boxenv.redactor_for(box, secrets)
    host.registry.touch(box.id)
    writer = LogWriter(box.logs_dir, LOG, redact)
    tail = _Tail(redact, KEEP_LINES, on_line)
    t0 = time.monotonic()
    proc, pumps = start_logged(cmd, box.path, host.exec_env(box, secrets), writer, tail,
                               cgroups.Leaf(host.home, box.id, cgroups.RUN), launcher=host.launcher(box))
    timed_out = False
    try:
        code = proc.wait(timeout=timeout)
    except Exception:  # TimeoutExpired, or Ctrl-C: the command's whole group goes
        from worktreebox.system import procs

        procs.stop_group(proc, 3.0)
        timed_out, code = True, 124
    finally:
        join_pumps(pumps)
        writer.close()
    lines = tail.lines()
    result = {"cmd": cmd, "exit": code, "seconds": round(time.monotonic() - t0, 3), "timed_out": timed_out,
              **test_counts(lines), "last_lines": lines, "at": time.time()}
    box.data[DATA_KEY] = {k: v for k, v in result.items() if k != "last_lines"}
    host.registry.save_box(box)
    return result


run_test.__test__ = False  # type: ignore[attr-defined]  # not a pytest test
test_command.__test__ = False  # type: ignore[attr-defined]


class _Tail(OutputTail):
    """The last lines, and each line shown as it comes (the CLI's terminal)."""

    def __init__(self, redact: Callable[[str], str], keep: int, on_line: Callable[[str], None] | None) -> None:
        super().__init__(redact, keep)
        self._on_line = on_line

    def __call__(self, text: str) -> None:
        super().__call__(text)
        if self._on_line is not None:
            self._on_line(self._redact(text))
