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
# The dependency layer's .venv first on PATH (its activate script needs bash to find itself).
# [database] migrate runs as written, in the worktree; the others are templates.
VENV_PATH = 'export PATH="{{ box.path }}/.venv/bin:$PATH" && '
VENV_PATH_MIGRATE = 'export PATH="$PWD/.venv/bin:$PATH" && '


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
    so Python commands run with it first on PATH (npm and node commands are left alone)."""
    def one(fact: Fact | None, prefix: str = VENV_PATH) -> Fact | None:
        first = fact.value.split()[0] if fact is not None and fact.value.split() else ""
        if fact is None or first in NODE_FIRST_WORDS or fact.value.startswith(prefix):
            return fact
        return Fact(prefix + fact.value, fact.origin, fact.note or "with the dependency layer's .venv on PATH")

    plan.setup, plan.migrate, plan.test = one(plan.setup), one(plan.migrate, VENV_PATH_MIGRATE), one(plan.test)
    for svc in plan.services.values():
        svc.cmd = one(svc.cmd) or svc.cmd  # one() keeps a command (it only prefixes it)
