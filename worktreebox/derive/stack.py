"""What a repo's own project files say when no container or CI file says it: Procfile, package.json,
.devcontainer/devcontainer.json, manage.py (Django), pyproject.toml (pytest)."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from worktreebox.derive import compose
from worktreebox.derive.ci import sort_command
from worktreebox.derive.common import add_variable, box_name, command_kind
from worktreebox.derive.model import Fact, Plan, ServicePlan, tpl

NPM_DEFAULT_TEST = "no test specified"  # `npm init`'s placeholder test script
DEVCONTAINER = (".devcontainer/devcontainer.json", ".devcontainer.json")


def read_procfile(root: Path, plan: Plan) -> None:
    path = root / "Procfile"
    if not path.is_file():
        return
    plan.files.append("Procfile")
    if plan.services:
        plan.note(f"Procfile not used for services: {next(iter(plan.services.values())).cmd.origin} declared them.")
        return
    for line in path.read_text(errors="replace").splitlines():
        name, sep, cmd = line.partition(":")
        if not sep or not cmd.strip() or line.lstrip().startswith("#"):
            continue
        origin, cmd = f"Procfile {name.strip()}", cmd.strip()
        if name.strip() == "release":  # Heroku's release phase: migrations, before the processes start
            plan.first("migrate" if command_kind(cmd) == "migrate" else "setup", Fact(cmd, origin))
            continue
        _add_service(plan, box_name(name.strip()), cmd, origin, port=name.strip() == "web" or "$PORT" in cmd)


def _add_service(plan: Plan, name: str, cmd: str, origin: str, *, port: bool) -> None:
    sp = ServicePlan(name=name, cmd=Fact(cmd, origin))
    if port:
        sp.port = name
        sp.env["PORT"] = Fact(tpl(f"ports.{name}"), f"{origin} ($PORT is the box's port)")
        sp.ready = Fact("tcp:" + tpl(f"ports.{name}"), f"{origin} (it listens on $PORT)")
    plan.services.setdefault(name, sp)


def read_package_json(root: Path, plan: Plan) -> None:
    path = root / "package.json"
    if not path.is_file():
        return
    try:
        pkg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        plan.note(f"package.json cannot be read ({e}); skipped.")
        return
    plan.files.append("package.json")
    scripts = pkg.get("scripts") if isinstance(pkg.get("scripts"), dict) else {}
    test = scripts.get("test")
    if isinstance(test, str) and NPM_DEFAULT_TEST not in test:
        plan.first("test", Fact("npm test", f"package.json scripts.test ({test})"))
    start = next((k for k in ("start", "dev", "serve") if isinstance(scripts.get(k), str)), None)
    if start and not plan.services:
        cmd = "npm start" if start == "start" else f"npm run {start}"
        _add_service(plan, "web", cmd, f"package.json scripts.{start} ({scripts[start]})", port=True)
        plan.note(f"package.json scripts.{start}: the box gives it $PORT; wtbox cannot tell whether the app reads it.")
    for key in ("migrate", "db:migrate"):
        if isinstance(scripts.get(key), str):
            plan.first("migrate", Fact(f"npm run {key}", f"package.json scripts.{key}"))
    engines = pkg.get("engines") if isinstance(pkg.get("engines"), dict) else {}
    if engines.get("node"):
        plan.note(f"package.json engines.node {engines['node']!r}: the box uses this host's node.")


def read_devcontainer(root: Path, plan: Plan) -> None:
    path = next((root / f for f in DEVCONTAINER if (root / f).is_file()), None)
    if path is None:
        return
    import json5

    rel = str(path.relative_to(root))
    try:
        dc = json5.loads(path.read_text())
    except (OSError, ValueError) as e:
        plan.note(f"{rel} cannot be read ({e}); skipped.")
        return
    if not isinstance(dc, dict):
        return
    plan.files.append(rel)
    files = dc.get("dockerComposeFile")
    for f in [files] if isinstance(files, str) else files or []:
        target = (path.parent / f).resolve()
        if target.is_file() and target.is_relative_to(root.resolve()) and not _compose_read(plan, root, target):
            compose.read(root, plan, target)
            _drop_workspace(plan, dc.get("service"), rel)
    for key in ("postCreateCommand", "updateContentCommand", "postStartCommand"):
        for cmd in _commands(dc.get(key)):
            sort_command(plan, root, cmd, f"{rel} {key}")
    for scope in ("containerEnv", "remoteEnv"):
        for k, v in (dc.get(scope) or {}).items():
            add_variable(plan, k, v, f"{rel} {scope}")
    if dc.get("forwardPorts"):
        plan.note(f"{rel}: forwardPorts {dc['forwardPorts']} are not forwarded; a box's services get leased ports.")
    if dc.get("image") or dc.get("build"):
        plan.note(f"{rel}: the dev container's image is not used; the box runs on this host's toolchain.")
    if dc.get("features"):
        plan.note(f"{rel}: features {sorted(dc['features'])} are not installed; install what the app needs "
                  "on the host.")


def _compose_read(plan: Plan, root: Path, target: Path) -> bool:
    return str(target.relative_to(root.resolve())) in plan.files


def _drop_workspace(plan: Plan, service: Any, rel: str) -> None:
    """The devcontainer's own `service` is the editor's container (often `sleep infinity`), not the app."""
    if isinstance(service, str) and box_name(service) in plan.services:
        del plan.services[box_name(service)]
        plan.note(f"{rel}: service {service!r} is the dev container itself; not run as a box service.")


def _commands(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value] if value.strip() else []
    if isinstance(value, list):
        from worktreebox.derive.common import shell_command

        cmd = shell_command(value)
        return [cmd] if cmd else []
    if isinstance(value, dict):
        return [c for v in value.values() for c in _commands(v)]
    return []


def read_python(root: Path, plan: Plan) -> None:
    """manage.py (Django): the dev server, its tests, its migrations; pyproject.toml's pytest."""
    if (root / "manage.py").is_file():
        plan.files.append("manage.py")
        origin = "manage.py (Django)"
        if not plan.services:
            _add_service(plan, "web", "python manage.py runserver 127.0.0.1:$PORT --noreload", origin, port=True)
        # Django's own commands, unless the repo's files named others (then these are no news)
        plan.migrate = plan.migrate or Fact("python manage.py migrate --noinput", origin)
        plan.test = plan.test or Fact("python manage.py test", origin)
    pyproject = root / "pyproject.toml"
    text = pyproject.read_text(errors="replace") if pyproject.is_file() else ""
    if re.search(r"^\[tool\.pytest\.ini_options\]", text, re.M):
        plan.files.append("pyproject.toml")
        plan.test = plan.test or Fact("python -m pytest", "pyproject.toml [tool.pytest.ini_options]")
