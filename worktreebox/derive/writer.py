"""A Plan as wtbox.toml (each value commented with its origin) and as `init --explain`'s report.

The text is checked by parsing it back with the config loader before anyone sees it: `init`
never writes a file `new` would refuse.
"""
from __future__ import annotations

import json
import re
from typing import Any

from worktreebox.config.backing import kind_of_image
from worktreebox.derive.model import Fact, Plan, ServicePlan

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def toml_str(text: str) -> str:
    """A TOML basic string (JSON's escapes are TOML's; DEL is the one control JSON leaves raw)."""
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _comment(fact: Fact) -> str:
    text = f"from {fact.origin}" + (f" ({fact.note})" if fact.note else "")
    return "  # " + " ".join(text.split())


def _line(key: str, fact: Fact) -> str:
    value = fact.value
    if isinstance(value, list):
        rendered = "[" + ", ".join(toml_str(v) for v in value) + "]"
    else:
        rendered = toml_str(str(value))
    return f"{key} = {rendered}{_comment(fact)}"


def runtime_here(image: str) -> str:
    """Which runtime a backing image gets on this host, in words (for comments and --explain)."""
    from worktreebox.providers.backing import choice

    kind = kind_of_image(image) or "?"
    cls, why = choice(kind, image)
    return f"{cls.runtime}: {cls.describe()}" if cls else f"no runtime on this host ({'; '.join(why)})"


def render(plan: Plan) -> str:
    out = ["# wtbox.toml written by `wtbox init` from " + ", ".join(plan.files) + ".",
           "# Each value says where it came from; `wtbox init --explain` lists what was not mapped.", ""]
    ports = [s.port for s in plan.services.values() if s.port]
    out += ["[box]", f"ports = [{', '.join(toml_str(p) for p in ports)}]  # a leased port per service that listens"
            if ports else "ports = [\"web\"]  # no service of the repo listens on a port; one is leased anyway", ""]
    env = {k: f for k, f in plan.env.items() if _ENV_NAME.match(k)}
    for bad in sorted(set(plan.env) - set(env)):
        plan.note(f"{plan.env[bad].origin}: {bad!r} is not a variable name a shell can export; not set.")
    if env:
        out += ["[box.env]", *(_line(k, f) for k, f in env.items()), ""]
    out += _database(plan)
    for name, fact in plan.backing.items():
        out += [f"[backing.{name}]", _line("image", fact), f"# runs here as {runtime_here(fact.value)}", ""]
    if plan.setup:
        out += ["[setup]", _line("cmd", plan.setup), ""]
    for svc in plan.services.values():
        out += _service(svc)
    if plan.test:
        out += ["[test]", _line("cmd", plan.test), ""]
    else:
        out += ["# [test] cmd: no test command in the repo's files; `wtbox test` needs one.", ""]
    if plan.notes:
        out += ["# Not mapped (see `wtbox init --explain`):", *(f"# - {' '.join(n.split())}" for n in plan.notes)]
    return "\n".join(out).rstrip() + "\n"


def _database(plan: Plan) -> list[str]:
    if plan.database is None:
        return ["[database]", 'mode = "none"  # no PostgreSQL in the repo\'s files: the box gets no database', ""]
    stands = f"{plan.database.origin} ({plan.database.value})"
    lines = ["[database]", f"# the box's own PostgreSQL database (role, database, golden copy) stands for {stands}"]
    if plan.migrate:
        lines.append(_line("migrate", plan.migrate))
    return [*lines, ""]


def _service(svc: ServicePlan) -> list[str]:
    lines = [f"[services.{svc.name}]", _line("cmd", svc.cmd)]
    if svc.cwd:
        lines.append(_line("cwd", Fact(svc.cwd, svc.cmd.origin)))
    if svc.ready:
        lines.append(_line("ready", svc.ready))
    if svc.depends_on:
        lines.append(_line("depends_on", Fact(svc.depends_on, svc.cmd.origin + " depends_on")))
    env = {k: f for k, f in svc.env.items() if _ENV_NAME.match(k)}
    if env:
        lines += ["", f"[services.{svc.name}.env]", *(_line(k, f) for k, f in env.items())]
    return [*lines, ""]


def check(text: str) -> None:
    """The written text loads as wtbox.toml (a bug here is init's, so it fails loudly)."""
    from worktreebox.config.load import parse_repo_config

    parse_repo_config(text, "wtbox.toml (as `wtbox init` would write it)")


def explain(plan: Plan) -> dict[str, Any]:
    """`init --explain --json`: what was read, what each piece became, and what was not mapped."""
    return {
        "files": plan.files,
        "database": {"from": plan.database.origin, "image": plan.database.value} if plan.database else None,
        "backing": {n: {"image": f.value, "from": f.origin, "runtime": runtime_here(f.value)}
                    for n, f in plan.backing.items()},
        "services": {n: {"cmd": s.cmd.value, "from": s.cmd.origin, "port": s.port} for n, s in plan.services.items()},
        "env": {k: {"value": f.value, "from": f.origin, "rewritten": f.note or None} for k, f in plan.env.items()},
        "setup": _fact(plan.setup), "migrate": _fact(plan.migrate), "test": _fact(plan.test),
        "covered": plan.mapped, "not_mapped": plan.notes,
    }


def _fact(f: Fact | None) -> dict[str, str] | None:
    return {"cmd": f.value, "from": f.origin} if f else None


def explain_text(plan: Plan) -> str:
    rows = [f"read: {', '.join(plan.files) or 'nothing wtbox knows'}"]
    if plan.database:
        rows.append(f"database   the box's own PostgreSQL  ← {plan.database.origin} ({plan.database.value})")
    for n, f in plan.backing.items():
        rows.append(f"backing    {n}: {f.value} → {runtime_here(f.value)}  ← {f.origin}")
    for n, s in plan.services.items():
        rows.append(f"service    {n}: {s.cmd.value}  ← {s.cmd.origin}")
    for k, f in plan.env.items():
        rows.append(f"env        {k} = {f.value}  ← {f.origin}" + (f" ({f.note})" if f.note else ""))
    for what in ("setup", "migrate", "test"):
        f = getattr(plan, what)
        if f:
            rows.append(f"{what:<10} {f.value}  ← {f.origin}")
    rows += [f"covered    {m}" for m in plan.mapped]
    if plan.notes:
        rows += ["not mapped:", *(f"  - {n}" for n in plan.notes)]
    return "\n".join(rows) + "\n"
