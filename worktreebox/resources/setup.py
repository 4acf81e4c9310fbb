"""`[setup] cmd`: run once in a new box, after its dependency layers and before its migrations.

The order real apps need: tree -> dependency layers -> setup -> migrations -> services (a
migration that needs what setup installs, e.g. `.venv/bin/alembic`, finds it).
"""
from __future__ import annotations

from worktreebox.config.templating import render
from worktreebox.errors import WtboxError
from worktreebox.resources.base import Creation, Resource
from worktreebox.services.boxenv import process_env, redactor_for
from worktreebox.system import cgroups
from worktreebox.telemetry.logs.run import run_logged


class Setup(Resource):
    name = "setup"
    start_phase = "setup"

    def start(self, c: Creation) -> None:
        if c.config.setup.cmd and not c.origin:  # a fork's files already hold what setup made
            run_setup(c)


def run_setup(c: Creation) -> None:
    """Run `[setup] cmd` in the worktree with the box env; its output goes to logs/setup.jsonl."""
    box, cfg = c.box, c.config
    cmd = render(cfg.setup.cmd or "", c.facts, f"{cfg.source}: [setup] cmd")
    c.note("running [setup] cmd")
    from worktreebox.resources import sandbox

    rc, last = run_logged(cmd, box.path, process_env(box, c.secrets), box.logs_dir, "setup",
                          redactor_for(box, c.secrets), timeout=cfg.setup.timeout,
                          cgroup=cgroups.Leaf(c.host.home, box.id, cgroups.SETUP), launcher=sandbox.launcher(box))
    if rc != 0:
        tail = "\n".join("  " + line for line in last) or "  (no output)"
        raise WtboxError(f"[setup] cmd failed with exit code {rc}; its last output lines:\n{tail}")
