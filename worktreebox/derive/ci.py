"""What GitHub Actions and GitLab CI have in common: pick the job that tests, take one matrix
entry (and say which), and sort its commands into install / migrate / test / setup."""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from worktreebox.derive.common import command_kind
from worktreebox.derive.model import Fact, Plan

NODE_LOCKS = ("package-lock.json", "yarn.lock", "pnpm-lock.yaml")


def first_matrix_entry(matrix: Any) -> tuple[dict[str, Any], str]:
    """The first combination of a matrix (axes in order, then `include`), and a sentence saying so."""
    if not isinstance(matrix, dict) or not matrix:
        return {}, ""
    axes = {k: v for k, v in matrix.items() if k not in ("include", "exclude") and isinstance(v, list) and v}
    excluded = [e for e in matrix.get("exclude") or [] if isinstance(e, dict)]
    combos = (dict(zip(axes, values, strict=True)) for values in itertools.product(*axes.values()))
    entry = next((c for c in combos if not any(all(c.get(k) == v for k, v in e.items()) for e in excluded)), {})
    includes = [i for i in matrix.get("include") or [] if isinstance(i, dict)]
    if not entry and includes:
        entry = dict(includes[0])
    sizes = " × ".join(str(len(v)) for v in axes.values())
    chosen = ", ".join(f"{k}={v}" for k, v in entry.items())
    return entry, f"matrix entry taken: {chosen}" + (f" (the first of {sizes})" if sizes else "")


def job_score(name: str, commands: list[str], has_services: bool) -> int:
    """How much a job looks like the one that runs the tests."""
    score = 3 if any(command_kind(c) == "test" for c in commands) else 0
    score += 2 if has_services else 0
    return score + (1 if "test" in name.lower() else 0)


def sort_command(plan: Plan, root: Path, cmd: str, origin: str, *, cwd: str | None = None) -> None:
    """One CI command into the plan: tests to [test], migrations to [database] migrate, installs to
    the dependency layers (or [setup] when no lock file says what to install), builds to [setup]."""
    full = f"cd {cwd} && {cmd}" if cwd and cwd not in (".", "./") else cmd
    kind = command_kind(cmd)
    if kind == "test":
        plan.first("test", Fact(full, origin))
    elif kind == "migrate":
        plan.first("migrate", Fact(full, origin))
    elif kind == "install":
        if cmd.lstrip().startswith(("apt", "sudo apt")):
            plan.note(f"{origin}: `{cmd}` installs system packages; the box uses this host's (install them here once).")
        elif _layer_covers(root, cmd):
            plan.mapped.append(f"{origin}: `{cmd}` → the dependency layers (built once per lock file, shared by boxes)")
        else:
            plan.first("setup", Fact(full, origin))
    elif kind == "build":
        plan.first("setup", Fact(full, origin))
    elif kind == "lint":
        plan.note(f"{origin}: `{cmd}` (a linter) is not mapped; run it with 'wtbox exec BOX -- ...'.")
    else:
        plan.note(f"{origin}: `{cmd}` is not mapped (wtbox cannot tell what it is for).")


def _layer_covers(root: Path, cmd: str) -> bool:
    """The install is what a dependency layer does for this repo's lock files (layers/deps.py)."""
    from worktreebox.derive.common import python_env

    words = cmd.split()
    if words and words[0] in ("npm", "yarn", "pnpm"):
        return any((root / f).is_file() for f in NODE_LOCKS)
    return python_env(root)


def script_lines(value: Any) -> list[str]:
    """A GitLab script (a string or a list of strings, nested lists flattened) as command lines."""
    if isinstance(value, str):
        return [value] if value.strip() else []
    out: list[str] = []
    for item in value or []:
        out += script_lines(item) if isinstance(item, list) else [str(item)] if str(item).strip() else []
    return out
