"""`.gitlab-ci.yml`: the job that runs the tests, its `services:`, `variables` and scripts.

As GitLab documents them: `services` as image strings or {name, alias, variables}, reached by
their alias or by the host name GitLab derives from the image (`bitnami/redis:7` →
`bitnami__redis` and `bitnami-redis`); `variables` global, in `default:` and per job (a value or
{value, description}), expanding `$VAR` / `${VAR}` of each other; `extends` and `default:`
merged into the job; `parallel: matrix` (the first entry is taken, and said); `before_script`
and `script` sorted line by line. Keys that only mean something to a CI runner are named once.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from worktreebox.derive.ci import first_matrix_entry, job_score, script_lines, sort_command
from worktreebox.derive.common import add_container, add_variable, command_kind, load_yaml
from worktreebox.derive.interpolate import Interpolation
from worktreebox.derive.model import Fact, Plan

FILE = ".gitlab-ci.yml"
GLOBAL = {"image", "services", "stages", "variables", "default", "include", "workflow", "before_script",
          "after_script", "cache", "spec"}
USED = {"image", "services", "variables", "before_script", "script", "extends", "parallel", "stage", "after_script"}
CI_ONLY = {"rules", "only", "except", "artifacts", "cache", "coverage", "tags", "when", "needs", "dependencies",
           "interruptible", "retry", "timeout", "allow_failure", "environment", "resource_group", "release",
           "trigger", "id_tokens", "secrets", "hooks", "pages", "inherit", "identity"}


def read(root: Path, plan: Plan) -> None:
    path = root / FILE
    if not path.is_file():
        return
    doc = load_yaml(path, plan)
    if not isinstance(doc, dict):
        return
    plan.files.append(FILE)
    if doc.get("include"):
        plan.note(f"{FILE}: include is not read; only this file's jobs are.")
    jobs = {k: v for k, v in doc.items() if k not in GLOBAL and not str(k).startswith(".") and isinstance(v, dict)
            and ("script" in v or "extends" in v)}
    if not jobs:
        return
    merged = {k: _merged(doc, v) for k, v in jobs.items()}
    def score(k: str) -> int:
        job = merged[k]
        tests = 2 if job.get("stage") == "test" else 0
        return job_score(k, script_lines(job.get("script")), bool(job.get("services"))) + tests

    name = max(merged, key=score)
    others = [k for k in merged if k != name]
    if others:
        plan.note(f"{FILE} job {name} was read (it runs the tests); the other jobs ({', '.join(others)}) were not.")
    Job(root, plan, name, merged[name], doc).read()


def _merged(doc: dict[str, Any], job: dict[str, Any], seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """`default:` (and the old global keywords) under `extends` parents under the job itself."""
    out: dict[str, Any] = {k: doc[k] for k in ("image", "services", "before_script") if k in doc}
    out.update(doc.get("default") or {})
    parents = job.get("extends") or []
    for parent in [parents] if isinstance(parents, str) else parents:
        if parent in doc and parent not in seen and isinstance(doc[parent], dict):
            out.update({k: v for k, v in _merged(doc, doc[parent], (*seen, parent)).items() if k != "variables"})
            out.setdefault("variables", {}).update(doc[parent].get("variables") or {})
    variables = {**(out.get("variables") or {}), **(job.get("variables") or {})}
    out.update(job)
    out["variables"] = variables
    return out


class Job:
    def __init__(self, root: Path, plan: Plan, name: str, job: dict[str, Any], doc: dict[str, Any]) -> None:
        self.root, self.plan, self.name, self.job, self.doc = root, plan, name, job, doc

    def origin(self, *more: str) -> str:
        return " ".join([f"{FILE} job {self.name}", *more])

    def read(self) -> None:
        variables = {k: _value(v) for k, v in (self.doc.get("variables") or {}).items()}
        variables.update({k: _value(v) for k, v in (self.job.get("variables") or {}).items()})
        parallel = self.job.get("parallel")
        if isinstance(parallel, dict):
            matrix = (parallel.get("matrix") or [{}])[0]
            entry, said = first_matrix_entry({k: v if isinstance(v, list) else [v] for k, v in matrix.items()})
            variables.update({k: str(v) for k, v in entry.items()})
            if said:
                self.plan.note(f"{self.origin()}: parallel {said}.")
        expand = Interpolation({k: v for k, v in variables.items() if v is not None})
        self.services()
        for key, value in variables.items():
            add_variable(self.plan, key, expand(value) if value is not None else None, self.origin("variables"))
        for name in expand.unset:
            self.plan.note(f"{self.origin('variables')}: ${name} is not set in {FILE} (a runner's variable?); "
                           "read as empty.")
        if self.job.get("image"):
            self.plan.note(f"{self.origin()}: image {_image(self.job['image'])!r} is the CI's; the box uses this host.")
        quiet = sorted(k for k in self.job if k in CI_ONLY)
        if quiet:
            self.plan.note(f"{self.origin()}: {', '.join(quiet)} only mean something to a CI runner; not used.")
        unknown = sorted(k for k in self.job if k not in USED | CI_ONLY | {"default"})
        if unknown:
            self.plan.note(f"{self.origin()}: {', '.join(unknown)} not used by wtbox.")
        self.scripts(expand)

    def services(self) -> None:
        for i, svc in enumerate(self.job.get("services") or []):
            image = _image(svc)
            if not image:
                continue
            alias = str(svc.get("alias", "")) if isinstance(svc, dict) else ""
            aliases = [a.strip() for a in alias.split(",") if a.strip()]
            base = image.split("@")[0].rsplit(":", 1)[0] if ":" in image.split("/")[-1] else image.split("@")[0]
            hosts = (*aliases, base.replace("/", "__"), base.replace("/", "-"))
            add_container(self.plan, aliases[0] if aliases else base.rsplit("/", 1)[-1], image,
                          self.origin(f"services[{i}] ({image})"), hosts=hosts)

    def scripts(self, expand: Interpolation) -> None:
        tests = []
        for key in ("before_script", "script"):
            for n, line in enumerate(script_lines(self.job.get(key))):
                origin = self.origin(f"{key}[{n}]")
                if key == "script" and command_kind(line) not in ("install", "migrate", "lint"):
                    tests.append(line)
                else:
                    sort_command(self.plan, self.root, line, origin)
        if tests:
            self.plan.first("test", Fact(" && ".join(tests), self.origin("script")))


def _image(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("name")
    return value.strip() if isinstance(value, str) and value.strip() else None


def _value(v: Any) -> str | None:
    if isinstance(v, dict):
        v = v.get("value")
    if v is None:
        return None
    return str(v).lower() if isinstance(v, bool) else str(v)
