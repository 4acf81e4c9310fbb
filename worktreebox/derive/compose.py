"""The Compose file: containers beside the app become the box's database and backing services; the
services built from the repo become [services], their variables rewritten onto the box.

Read as the Compose specification defines it: `environment` as a map or a list, `env_file`
(a path, a list, or {path, required}), interpolation from `.env` (interpolate.py), `ports` in
short and long syntax, `depends_on` as a list or a map with conditions, `healthcheck` (CMD,
CMD-SHELL, NONE). A key wtbox does not use is named in one sentence.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from worktreebox.config.backing import kind_of_image
from worktreebox.derive.common import (
    add_container,
    add_variable,
    box_name,
    command_kind,
    load_yaml,
    read_dotenv,
    shell_command,
)
from worktreebox.derive.interpolate import Interpolation, interpolate_tree
from worktreebox.derive.model import Fact, Plan, ServicePlan, Target, tpl

FILES = ("compose.yaml", "compose.yml", "docker-compose.yaml", "docker-compose.yml")
OVERRIDES = ("compose.override.yaml", "compose.override.yml", "docker-compose.override.yaml",
             "docker-compose.override.yml")
# Keys that change nothing in a box (names, terminal, labels): taken without a word.
QUIET = {"container_name", "hostname", "labels", "logging", "stdin_open", "tty", "init", "image", "build",
         "command", "environment", "env_file", "ports", "expose", "depends_on", "healthcheck", "restart",
         "working_dir", "volumes", "profiles", "links", "networks", "platform", "pull_policy", "stop_signal",
         "stop_grace_period"}
TOP_NOTES = {
    "volumes": "named volumes are not used: a box keeps each service's data under its own dir",
    "networks": "networks are not used: a box's processes reach each other on loopback",
    "secrets": "secrets are not read: pass them with 'wtbox new TASK --secret NAME'",
    "configs": "configs are not read",
    "include": "included files are not read",
}
RESTART = {"no": "no", "always": "always", "unless-stopped": "always", "on-failure": "on-failure"}


def find(root: Path) -> Path | None:
    return next((root / f for f in FILES if (root / f).is_file()), None)


def read(root: Path, plan: Plan, path: Path | None = None) -> None:
    path = path or find(root)
    if path is None:
        return
    rel = str(path.relative_to(root)) if path.is_relative_to(root) else path.name
    doc = load_yaml(path, plan)
    if not isinstance(doc, dict):
        if doc is not None:
            plan.note(f"{rel} is not a Compose file (no top-level map); skipped.")
        return
    plan.files.append(rel)
    variables = read_dotenv(path.parent / ".env") if (path.parent / ".env").is_file() else {}
    interp = Interpolation(variables)
    doc = interpolate_tree(doc, interp)
    assert isinstance(doc, dict)  # a map stays a map
    for name in interp.unset:
        plan.note(f"{rel}: ${{{name}}} is not set in .env (Compose would take your shell's); read as empty.")
    for req in interp.required:
        plan.note(f"{rel}: ${{{req}}} is required and not set in .env; read as empty.")
    for o in OVERRIDES:
        if (path.parent / o).is_file():
            plan.note(f"{o} is not merged into {rel}; wtbox read {rel} alone.")
    for key, why in TOP_NOTES.items():
        if doc.get(key):
            plan.note(f"{rel}: top-level {key}: {why}.")
    services = doc.get("services")
    if not isinstance(services, dict):
        plan.note(f"{rel} has no services map; nothing to read.")
        return
    Reader(root, path, rel, plan).read(services)


class Reader:
    def __init__(self, root: Path, path: Path, rel: str, plan: Plan) -> None:
        self.root, self.path, self.rel, self.plan = root, path, rel, plan

    def origin(self, name: str, *more: str) -> str:
        return " ".join([f"{self.rel} services.{name}", *more])

    def read(self, services: dict[str, Any]) -> None:
        apps = {}
        for name, svc in services.items():
            if not isinstance(svc, dict):
                self.plan.note(f"{self.origin(name)} is not a map; skipped.")
            elif svc.get("profiles"):
                self.plan.note(f"{self.origin(name)} runs only with the profiles {svc['profiles']}; not mapped.")
            elif "build" not in svc and isinstance(svc.get("image"), str) and kind_of_image(svc["image"]):
                add_container(self.plan, name, svc["image"], self.origin(name),
                              hosts=tuple(_aliases(svc)), published=tuple(p for p, _, _ in _ports(svc) if p))
            elif "build" not in svc and isinstance(svc.get("image"), str) and not svc.get("command"):
                add_container(self.plan, name, svc["image"], self.origin(name))  # names what is not mapped
            else:
                apps[name] = svc
        for name, svc in apps.items():
            ports = _ports(svc)
            if ports:
                target = Target("app", box_name(name), ports[0][1])
                self.plan.hosts.setdefault(name, target)
        once = {d for svc in apps.values() for d, cond in _depends(svc) if cond == "service_completed_successfully"}
        for name, svc in apps.items():
            self.app(name, svc, one_shot=name in once)

    def app(self, name: str, svc: dict[str, Any], *, one_shot: bool) -> None:
        origin = self.origin(name)
        cmd = shell_command(svc.get("command"))
        if svc.get("entrypoint"):
            self.plan.note(f"{origin}: entrypoint {svc['entrypoint']!r} is the image's; wtbox runs the command alone.")
        if cmd is None:
            self.plan.note(f"{origin} has no command (its image decides how it starts, which wtbox cannot know); "
                           f"write [services.{box_name(name)}] cmd by hand.")
            return
        if one_shot:
            kind = "migrate" if command_kind(cmd) == "migrate" else "setup"
            self.plan.first(kind, Fact(cmd, f"{origin} command (others wait for it to complete)"))
            return
        bname = box_name(name)
        ports = _ports(svc)
        sp = ServicePlan(name=bname, cmd=Fact(cmd, f"{origin} command"))
        if ports:
            sp.port = bname
            sp.cmd = Fact(_port_in(cmd, ports[0][1], bname), f"{origin} command", _port_note(cmd, ports[0][1]))
            sp.env["PORT"] = Fact(tpl(f"ports.{bname}"), f"{origin} ports {ports[0][2]!r}")
            sp.ready = self.ready(svc, origin, bname, ports[0][1])
        sp.depends_on = [box_name(d) for d, _ in _depends(svc) if self.is_app(d)]
        sp.cwd = self.cwd(svc, origin)
        restart = str(svc.get("restart", "")).split(":")[0]
        if restart and restart not in RESTART:
            self.plan.note(f"{origin}: restart {restart!r} is not a Compose policy; wtbox restarts on failure.")
        self.env(svc, origin, sp)
        extra = sorted(k for k in svc if k not in QUIET)
        if extra:
            self.plan.note(f"{origin}: {', '.join(extra)} {'is' if len(extra) == 1 else 'are'} not used by wtbox.")
        self.volumes(svc, origin)
        self.plan.services.setdefault(bname, sp)

    def is_app(self, name: str) -> bool:
        target = self.plan.hosts.get(name)
        return target is None or target.kind == "app"

    def env(self, svc: dict[str, Any], origin: str, sp: ServicePlan) -> None:
        values: dict[str, Any] = {}
        for f in _env_files(svc):
            p = (self.path.parent / f["path"]).resolve()
            if p.is_file() and p.is_relative_to(self.root.resolve()):
                values.update(read_dotenv(p))
            elif f.get("required", True):
                self.plan.note(f"{origin}: env_file {f['path']} is not in the repo; its variables are not set.")
        values.update(_environment(svc.get("environment")))
        for key, value in values.items():
            if key == "PORT":
                continue  # the box gives every service with a port its own $PORT
            before = dict(sp.env)
            add_variable(self.plan, key, value, f"{origin} environment", into=sp.env)
            fact = sp.env.get(key)
            if fact is None or key in before:
                continue
            known = self.plan.env.get(key)
            if known is None:
                self.plan.env[key] = sp.env.pop(key)  # the box env: `wtbox test` and `exec` see it too
            elif known.value == fact.value:
                sp.env.pop(key)

    def ready(self, svc: dict[str, Any], origin: str, bname: str, port: int) -> Fact:
        hc = svc.get("healthcheck")
        test = hc.get("test") if isinstance(hc, dict) and not hc.get("disable") else None
        if isinstance(test, list) and test[:1] in (["CMD"], ["CMD-SHELL"]):
            test = shell_command(test[1:]) if test[0] == "CMD" else " ".join(map(str, test[1:]))
        if isinstance(test, str) and test.strip():
            m = re.search(rf"https?://(localhost|127\.0\.0\.1|0\.0\.0\.0)(:{port})?(/[^\s'\"]*)?", test)
            if m:
                url = f"http://127.0.0.1:{tpl(f'ports.{bname}')}{m.group(3) or '/'}"
                return Fact(url, f"{origin} healthcheck")
            return Fact(_port_in(test, port, bname), f"{origin} healthcheck")
        return Fact("tcp:" + tpl(f"ports.{bname}"), f"{origin} ports")

    def cwd(self, svc: dict[str, Any], origin: str) -> str | None:
        wd = svc.get("working_dir")
        if not wd:
            return None
        for target in _project_binds(svc, self.path.parent):
            if wd == target or wd.startswith(target.rstrip("/") + "/"):
                return wd[len(target):].strip("/") or None
        self.plan.note(f"{origin}: working_dir {wd} is a path inside its image; the service runs in the worktree.")
        return None

    def volumes(self, svc: dict[str, Any], origin: str) -> None:
        others = [v for v in svc.get("volumes") or [] if not _is_project_bind(v, self.path.parent)]
        if others:
            self.plan.note(f"{origin}: volumes {others} are not mounted; the service sees the worktree as it is.")


def _ports(svc: dict[str, Any]) -> list[tuple[int | None, int, str]]:
    """(published, target, as written) per port, short and long syntax; `expose` gives target only."""
    out = []
    for p in svc.get("ports") or []:
        if isinstance(p, dict) and str(p.get("target", "")).isdigit():
            pub = str(p.get("published", "")).split("-")[0]
            out.append((int(pub) if pub.isdigit() else None, int(p["target"]), str(p)))
        elif isinstance(p, (str, int)):
            parts = str(p).split("/")[0].rsplit(":", 2)
            target, pub = parts[-1].split("-")[0], (parts[-2].split("-")[0] if len(parts) > 1 else "")
            if target.isdigit():
                out.append((int(pub) if pub.isdigit() else None, int(target), str(p)))
    for p in svc.get("expose") or []:
        text = str(p).split("/")[0].split("-")[0]
        if text.isdigit():
            out.append((None, int(text), f"expose {p}"))
    return out


def _depends(svc: dict[str, Any]) -> list[tuple[str, str]]:
    deps = svc.get("depends_on") or []
    if isinstance(deps, dict):
        return [(k, (v or {}).get("condition", "service_started") if isinstance(v, dict) else "service_started")
                for k, v in deps.items()]
    return [(d, "service_started") for d in deps if isinstance(d, str)]


def _environment(env: Any) -> dict[str, Any]:
    if isinstance(env, dict):
        return dict(env)
    out: dict[str, Any] = {}
    for item in env or []:
        key, sep, value = str(item).partition("=")
        out[key] = value if sep else None
    return out


def _env_files(svc: dict[str, Any]) -> list[dict[str, Any]]:
    ef = svc.get("env_file") or []
    items = ef if isinstance(ef, list) else [ef]
    return [i if isinstance(i, dict) else {"path": str(i), "required": True} for i in items
            if isinstance(i, (str, dict)) and (i.get("path") if isinstance(i, dict) else i)]


def _aliases(svc: dict[str, Any]) -> list[str]:
    out = [svc["hostname"]] if isinstance(svc.get("hostname"), str) else []
    nets = svc.get("networks")
    if isinstance(nets, dict):
        out += [a for n in nets.values() if isinstance(n, dict) for a in n.get("aliases") or []]
    return out


def _bind(volume: Any) -> tuple[str, str] | None:
    if isinstance(volume, dict) and volume.get("type") == "bind":
        return str(volume.get("source", "")), str(volume.get("target", ""))
    if isinstance(volume, str) and ":" in volume:
        src, _, rest = volume.partition(":")
        return src, rest.split(":")[0]
    return None


def _is_project_bind(volume: Any, base: Path) -> bool:
    b = _bind(volume)
    return b is not None and b[0].startswith(".") and (base / b[0]).resolve() == base.resolve()


def _project_binds(svc: dict[str, Any], base: Path) -> list[str]:
    return [b[1] for v in svc.get("volumes") or [] if _is_project_bind(v, base) and (b := _bind(v))]


def _port_in(cmd: str, port: int, name: str) -> str:
    """The container port in a command becomes the box's port (0.0.0.0 becomes loopback)."""
    cmd = re.sub(rf"\b0\.0\.0\.0:{port}\b", f"127.0.0.1:{port}", cmd)
    return re.sub(rf"(?<![\w.]){port}\b", tpl(f"ports.{name}"), cmd)


def _port_note(cmd: str, port: int) -> str:
    if re.search(rf"(?<![\w.]){port}\b", cmd):
        return f"port {port} → the box's port"
    return f"listens on {port} in its container; in the box it gets $PORT (wtbox cannot tell whether it reads it)"
