"""GitHub Actions workflows: the job that runs the tests, its `services:`, `env` and `run:` steps.

As GitHub documents them: `services.<id>` with `image`, `env`, `ports` (a job on the runner
reaches them on localhost at the published port; a job in a `container:` by their id),
`strategy.matrix` (the first entry is taken, and said), `env` at workflow, job and step level,
`${{ matrix.* }}`, `${{ env.* }}` and `${{ job.services.<id>.ports[N] }}` expressions (others
are named, never guessed), `working-directory`.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from worktreebox.derive.ci import first_matrix_entry, job_score, sort_command
from worktreebox.derive.common import add_container, add_variable, load_yaml, shell_command
from worktreebox.derive.model import Plan

QUIET_USES = ("actions/checkout", "actions/cache", "actions/upload-artifact", "actions/download-artifact")
SETUP_USES = re.compile(r"^actions/setup-(\w+)")
_EXPR = re.compile(r"\$\{\{\s*(.*?)\s*\}\}")
_SERVICE_PORT = re.compile(r"^job\.services\.([\w-]+)\.ports\[['\"]?(\d+)['\"]?\]$")


def workflows(root: Path) -> list[Path]:
    d = root / ".github" / "workflows"
    return sorted(p for p in d.glob("*.y*ml") if p.suffix in (".yml", ".yaml")) if d.is_dir() else []


def read(root: Path, plan: Plan) -> None:
    candidates = []
    for path in workflows(root):
        doc = load_yaml(path, plan)
        jobs = doc.get("jobs") if isinstance(doc, dict) else None
        if not isinstance(jobs, dict):
            continue
        for name, job in jobs.items():
            if isinstance(job, dict):
                runs = [r for s in job.get("steps") or [] if isinstance(s, dict) and (r := shell_command(s.get("run")))]
                candidates.append((job_score(name, runs, bool(job.get("services"))), path, name, job, doc))
    if not candidates:
        return
    best = max(candidates, key=lambda c: c[0])
    _, path, name, job, doc = best
    rel = str(path.relative_to(root))
    plan.files.append(rel)
    others = [f"{c[1].name}:{c[2]}" for c in candidates if c is not best]
    if others:
        plan.note(f"{rel} job {name} was read (it runs the tests); the other jobs ({', '.join(others)}) were not.")
    Job(root, plan, rel, name, job, doc).read()


class Job:
    def __init__(self, root: Path, plan: Plan, rel: str, name: str, job: dict[str, Any], doc: dict[str, Any]) -> None:
        self.root, self.plan, self.rel, self.name, self.job = root, plan, rel, name, job
        env = doc.get("env")
        self.workflow_env: dict[str, Any] = env if isinstance(env, dict) else {}
        self.matrix: dict[str, Any] = {}
        self.env: dict[str, Any] = {}

    def origin(self, *more: str) -> str:
        return " ".join([f"{self.rel} job {self.name}", *more])

    def read(self) -> None:
        strategy = self.job.get("strategy")
        self.matrix, said = first_matrix_entry(strategy.get("matrix") if isinstance(strategy, dict) else None)
        if said:
            self.plan.note(f"{self.origin()}: {said}.")
        if self.job.get("container"):
            self.plan.note(f"{self.origin()}: runs in a container; the box runs its steps on this host.")
        self.services()
        for scope, env in (("env", self.workflow_env), ("env", self.job.get("env"))):
            for key, value in (env or {}).items():
                self.env[key] = self.expand(str(value))
                add_variable(self.plan, key, self.env[key], self.origin(scope))
        for i, step in enumerate(self.job.get("steps") or []):
            if isinstance(step, dict):
                self.step(i, step)

    def services(self) -> None:
        for sid, svc in (self.job.get("services") or {}).items():
            image = svc.get("image") if isinstance(svc, dict) else svc
            if not isinstance(image, str) or not image.strip():
                self.plan.note(f"{self.origin(f'services.{sid}')} has no image wtbox can read; not mapped.")
                continue
            published = tuple(int(p) for p in (_published(x) for x in (svc.get("ports") or [])
                                                if isinstance(svc, dict)) if p)
            if isinstance(svc, dict) and svc.get("options"):
                self.plan.note(f"{self.origin(f'services.{sid}')}: options {svc['options']!r} are docker's; wtbox "
                               "waits until the service answers its own protocol instead.")
            # A job on the runner reaches it on localhost:<published>, one in a container by its id.
            add_container(self.plan, sid, self.expand(image), self.origin(f"services.{sid}"), published=published)

    def step(self, i: int, step: dict[str, Any]) -> None:
        label = step.get("name") or step.get("id") or (f"uses {step['uses']}" if step.get("uses") else f"#{i + 1}")
        origin = f'{self.origin()}, step "{label}"'
        uses = str(step.get("uses") or "")
        if uses:
            self.uses(uses, step, origin)
            return
        run = shell_command(step.get("run"))
        if not run:
            return
        if step.get("shell") not in (None, "bash", "sh"):
            self.plan.note(f"{origin}: shell {step['shell']!r}; wtbox runs commands with /bin/sh.")
        for key, value in (step.get("env") or {}).items():
            add_variable(self.plan, key, self.expand(str(value)), f"{origin} env")
        sort_command(self.plan, self.root, self.expand(run), origin, cwd=step.get("working-directory"))

    def uses(self, uses: str, step: dict[str, Any], origin: str) -> None:
        if uses.startswith(QUIET_USES):
            return
        m = SETUP_USES.match(uses)
        if m:
            versions = {k: self.expand(str(v)) for k, v in (step.get("with") or {}).items() if "version" in k}
            said = ", ".join(f"{k} {v}" for k, v in versions.items()) or "a version"
            self.plan.note(f"{origin}: CI sets up {m.group(1)} ({said}); the box uses this host's {m.group(1)}.")
            return
        self.plan.note(f"{origin}: the action {uses} is not run in a box.")

    def expand(self, text: str) -> str:
        """${{ matrix.x }}, ${{ env.X }} and ${{ job.services.<id>.ports[N] }}; others are left as written."""
        def one(m: re.Match[str]) -> str:
            expr = m.group(1)
            if expr.startswith("matrix.") and expr[7:] in self.matrix:
                return str(self.matrix[expr[7:]])
            if expr.startswith("env.") and expr[4:] in {**self.workflow_env, **self.env}:
                return str({**self.workflow_env, **self.env}[expr[4:]])
            if (sp := _SERVICE_PORT.match(expr)) is not None:
                return sp.group(2)  # the canonical port: rewrite.py maps localhost:<it> onto the service
            return m.group(0)

        return _EXPR.sub(one, text)


def _published(port: Any) -> int | None:
    text = str(port).split("/")[0]
    pub = text.split(":")[0] if ":" in text else text
    return int(pub) if pub.isdigit() else None
