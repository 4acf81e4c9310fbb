"""What every reader does with what it finds: a backing image, a variable, a command.

A container the repo runs beside its app becomes the box database (PostgreSQL), a backing
service (a kind in config/backing.KINDS), or a sentence saying wtbox does not run it per box.
A command is sorted by what it does (install, migrate, test, lint, build) by its words.
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

from worktreebox.config.backing import kind_of_image
from worktreebox.derive.model import Fact, Plan, Target
from worktreebox.derive.rewrite import rewrite

_SECRET_EXPR = re.compile(r"\$\{\{\s*secrets\.([A-Za-z0-9_]+)\s*\}\}")
_CI_EXPR = re.compile(r"\$\{\{.*?\}\}")

# First words of commands, by what they do (checked in this order).
_KINDS = (
    ("migrate", re.compile(r"(manage\.py\s+migrate|alembic\s+upgrade|flask\b.*\bdb\s+upgrade|prisma\s+migrate|"
                           r"knex\s+migrate|sequelize\s+db:migrate|npm\s+run\s+(db:)?migrate|rake\s+db:|"
                           r"rails\s+db:|yarn\s+(db:)?migrate)")),
    ("install", re.compile(r"^(sudo\s+)?(npm\s+(ci|install|i)\b|yarn(\s+install)?\s*$|pnpm\s+(i|install)\b|"
                           r"pip3?\s+install|python3?\s+-m\s+pip\s+install|poetry\s+install|uv\s+(sync|pip\s+install)|"
                           r"pipenv\s+install|bundle\s+install|go\s+mod\s+download|apt(-get)?\s)")),
    ("lint", re.compile(r"\b(ruff|flake8|pylint|black\s+--check|mypy|eslint|prettier|tsc\s+--noEmit|"
                        r"npm\s+run\s+(lint|format|typecheck))\b")),
    ("test", re.compile(r"(\bpytest\b|-m\s+pytest|manage\.py\s+test|\bnpm\s+(run\s+)?test\b|\byarn\s+test\b|"
                        r"\bpnpm\s+test\b|\bjest\b|\bvitest\b|\bmocha\b|\bgo\s+test\b|\brspec\b|\btox\b|\bnox\b|"
                        r"unittest|\bnode\s+--test\b)")),
    ("build", re.compile(r"(npm\s+run\s+build|yarn\s+build|pnpm\s+build|\bmake\b|collectstatic)")),
)


def command_kind(cmd: str) -> str | None:
    """"install", "migrate", "test", "lint", "build" or None, by the command's words."""
    for kind, rx in _KINDS:
        if rx.search(cmd.strip()):
            return kind
    return None


def shell_command(value: Any) -> str | None:
    """A compose/CI command as one shell line: a string as is, a list joined with quoting."""
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, list) and all(isinstance(v, (str, int, float)) for v in value):
        return shlex.join(str(v) for v in value) or None
    return None


def box_name(name: str) -> str:
    """A compose/CI service name as a wtbox name: lowercase letters, digits and '_', from a letter."""
    out = re.sub(r"[^a-z0-9_]", "_", name.lower()).strip("_")
    if not out or not out[0].isalpha():
        out = "s_" + out
    return out[:24]


def add_container(plan: Plan, name: str, image: str, origin: str, *, hosts: tuple[str, ...] = (),
                  published: tuple[int, ...] = ()) -> Target | None:
    """A container beside the app: the box database, a backing service, or a note that says why not."""
    kind = kind_of_image(image)
    if kind is None:
        plan.note(f"{origin}: {image!r} is not a kind wtbox runs per box (it runs PostgreSQL, Redis, memcached, "
                  "RabbitMQ, an SMTP sink and S3); not mapped: add it as a [services] entry if the app needs it.")
        return None
    from worktreebox.config.backing import KINDS

    if kind == "postgres":
        if plan.database is None:
            plan.database = Fact(image, origin)
        elif plan.database.origin != origin:
            plan.note(f"{origin}: a second PostgreSQL ({image}); the box has one database, "
                      f"from {plan.database.origin}.")
        target = Target("db", "db", 5432)
    else:
        bname = box_name(name)
        existing = plan.backing.get(bname)
        if existing is None:
            plan.backing[bname] = Fact(image, origin)
        target = Target("backing", bname, KINDS[kind].port)
    for h in (name, *hosts):
        plan.hosts.setdefault(h, target)
    for p in published:
        plan.published.setdefault(p, target)
    return target


def add_variable(plan: Plan, name: str, value: Any, origin: str, into: dict[str, Fact] | None = None) -> None:
    """A variable the repo sets for its app: rewritten onto the box when it names a box instance;
    a CI secret or expression is named, never written."""
    if value is None:
        plan.note(f"{origin}: {name} has no value (it is taken from the environment of whoever runs it); not set.")
        return
    text = str(value).lower() if isinstance(value, bool) else str(value)
    if m := _SECRET_EXPR.search(text):
        plan.note(f"{origin}: {name} is the CI secret {m.group(1)}; pass it to the box with "
                  f"'wtbox new TASK --secret {name}' (secrets are never written to wtbox.toml).")
        return
    if _CI_EXPR.search(text):
        plan.note(f"{origin}: {name} = {text!r} is a CI expression wtbox cannot evaluate; not set.")
        return
    hit = rewrite(name, text, plan)
    fact = Fact(hit[0], origin, f"{text} → {hit[1]}") if hit else Fact(literal(text), origin)
    if into is not None:
        into.setdefault(name, fact)
    else:
        plan.add_env(name, fact)


def literal(text: str) -> str:
    """Text that wtbox renders as a Jinja2 template (env values) kept as written."""
    if "{{" in text or "{%" in text or "{#" in text:
        return "{% raw %}" + text.replace("{% endraw %}", "") + "{% endraw %}"
    return text


def read_dotenv(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of an env file (python-dotenv's parser, without interpolation)."""
    from dotenv import dotenv_values

    return {k: v for k, v in dotenv_values(path, interpolate=False).items() if v is not None}


def load_yaml(path: Path, plan: Plan) -> Any:
    """A YAML document, or None with a note naming the file when it cannot be read."""
    import yaml

    try:
        return yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        plan.note(f"{path.name} cannot be read ({e}); skipped.")
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        plan.note(f"{path.name} is not valid YAML{where}; skipped.")
    return None


def python_env(root: Path) -> bool:
    """The dependency layers give this repo a .venv at its root (see layers/deps.py)."""
    names = {p.name for p in root.iterdir()} if root.is_dir() else set()
    return bool({"uv.lock", "poetry.lock"} & names) or any(re.match(r"^requirements[\w.-]*\.txt$", n) for n in names)
