"""`wtbox init`: a wtbox.toml from what the repo already declares (docs in the README, "wtbox init").

Readers, one per source, fill one Plan (model.py) in this order, the first to say a thing
winning: the Compose file, the devcontainer, GitHub Actions, GitLab CI, the Procfile,
package.json, manage.py / pyproject.toml. `writer.py` turns the Plan into wtbox.toml with a
comment on each line saying where it came from, and into `init --explain`'s report.
"""
from __future__ import annotations

from pathlib import Path

from worktreebox.derive import compose, github, gitlab, stack
from worktreebox.derive.common import python_env
from worktreebox.derive.model import Fact, Plan

READERS = (compose.read, stack.read_devcontainer, github.read, gitlab.read, stack.read_procfile,
           stack.read_package_json, stack.read_python)
NODE_FIRST_WORDS = ("npm", "npx", "yarn", "pnpm", "node")
ACTIVATE = ". .venv/bin/activate && "


def derive(root: Path) -> Plan:
    """Everything the repo at `root` declares that a box needs, with where each piece came from."""
    plan = Plan()
    for read in READERS:
        read(root, plan)
    for svc in plan.services.values():  # one-shots became setup/migrate, which run before any service
        svc.depends_on = [d for d in svc.depends_on if d in plan.services]
    if python_env(root):
        _activate(plan)
    return plan


def _activate(plan: Plan) -> None:
    """CI ran `pip install` into the job's Python; a box has the dependency layer's .venv instead,
    so Python commands run with it activated (npm and node commands are left alone)."""
    def one(fact: Fact | None) -> Fact | None:
        first = fact.value.split()[0] if fact is not None and fact.value.split() else ""
        if fact is None or first in NODE_FIRST_WORDS or fact.value.startswith(ACTIVATE):
            return fact
        return Fact(ACTIVATE + fact.value, fact.origin, fact.note or "run in the dependency layer's .venv")

    plan.setup, plan.migrate, plan.test = one(plan.setup), one(plan.migrate), one(plan.test)
    for svc in plan.services.values():
        svc.cmd = one(svc.cmd)
