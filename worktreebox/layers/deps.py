"""Dependency layers: what a lock file installs, built once per lock and shared by every box.

    deps/<sha256>/paths/<path>   what the build made (e.g. paths/.venv, paths/node_modules)
    deps/<sha256>/meta.json      kind, lock files, toolchain, when

The key is a SHA-256 over the lock files' contents (git blob ids at the box's commit), the
toolchain's versions and the recipe, so a box whose lock did not change gets the layer that
is already there, and a changed lock or a new uv/node gets a new one. Builds run once per key
on this host (single flight, layerstore.py) in a scratch export of the lock's directory; a
failed build leaves nothing and its last output lines say why. Boxes get each path mounted
copy-on-write at the conventional place (.venv beside the Python lock, node_modules beside
package.json): their writes (`pip install`, `npm install`) stay theirs.

Python environments are made relocatable (uv's `--relocatable` entry points) and the project's
own editable install is rewritten to a path relative to the environment, so inside a box it
resolves to the box's worktree, never to the builder's scratch dir.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from worktreebox.errors import ConfigError, WtboxError
from worktreebox.layers.store import LayerStore
from worktreebox.system import git

if TYPE_CHECKING:
    from worktreebox.config.load import DepsConfig

FORMAT = 2  # bump when what a built layer holds changes: old keys are then never reused (2: bytecode)
SKIP_DIRS = {"node_modules", ".venv", ".git", "venv", "__pypackages__"}
PY_LOCKS = ("uv.lock", "poetry.lock")  # in order of preference within one directory
NODE_LOCKS = {"pnpm-lock.yaml": "pnpm", "yarn.lock": "yarn", "package-lock.json": "npm"}
_REQUIREMENTS = re.compile(r"^requirements[\w.-]*\.txt$")


@dataclasses.dataclass
class Layer:
    """One dependency layer of a box: where, made how, from which files."""

    kind: str  # uv | poetry | pip | npm | pnpm | yarn | recipe:<name>
    dir: str  # the lock's directory, relative to the repo root ("" = the root)
    files: list[str]  # repo-relative files whose contents key the layer
    paths: list[str]  # what the build makes, relative to dir; attached in every box
    cmd: str | None = None  # recipes only
    key: str = ""
    toolchain: dict[str, str] = dataclasses.field(default_factory=dict)  # what built it (key_of)

    def to_json(self) -> dict:
        return {"kind": self.kind, "dir": self.dir, "paths": self.paths, "key": self.key, "toolchain": self.toolchain}


def store(home: Path) -> LayerStore:
    return LayerStore(Path(home) / "deps")


# ---------------------------------------------------------------- detection

# Files whose change means new dependencies (the warm pool's key hashes them too).
LOCK_FILES = frozenset({
    "uv.lock", "poetry.lock", "Pipfile.lock", "pdm.lock", "requirements.txt", "package-lock.json", "yarn.lock",
    "pnpm-lock.yaml", "bun.lockb", "Cargo.lock", "go.sum", "Gemfile.lock", "composer.lock", *NODE_LOCKS,
})
_RELEVANT = {"pyproject.toml", ".python-version", "setup.py", "package.json", *LOCK_FILES}
SCANS = ".scans-2"  # deps/.scans-2/<commit>.json: what detection needs of a commit, kept for the next box


def scan(repo: str | Path, sha: str, home: Path, cfg: DepsConfig) -> dict[str, str]:
    """The files of the commit detection looks at (path -> blob id).

    Without [deps] files or recipes only lock files, project files and one path under each
    node_modules/.venv/... directory matter; that small list is kept per commit, so the boxes after
    the first one need neither `git ls-tree` nor a walk over thousands of paths."""
    if cfg.files or cfg.recipes:
        return git.files_at(repo, sha)  # named files can be anywhere
    cache = Path(home) / "deps" / SCANS / f"{sha}.json"
    try:
        found = json.loads(cache.read_text())
        os.utime(cache)  # last use: gc's time-to-live counts from here
        return found
    except (OSError, ValueError):
        pass
    out: dict[str, str] = {}
    covered: set[str] = set()
    for path, blob in git.files_at(repo, sha).items():
        d, _, name = path.rpartition("/")
        parts = d.split("/") if d else []
        skip = next((i for i, part in enumerate(parts) if part in SKIP_DIRS), None)
        if skip is not None:
            prefix = "/".join(parts[:skip + 1])
            if prefix not in covered:  # one tracked file under it is enough to refuse covering it
                covered.add(prefix)
                out[path] = blob
        elif name in _RELEVANT or _REQUIREMENTS.match(name):
            out[path] = blob
    from worktreebox.system.fsutil import atomic_write

    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(cache, json.dumps(out))
    return out


def lock_files(files: dict[str, str]) -> dict[str, str]:
    """The project's lock files among `files` (path -> blob), as the scan sees them: one inside
    node_modules/, .venv/, ... is an installed package's, not the project's."""
    out = {}
    for path, blob in files.items():
        d, _, name = path.rpartition("/")
        if name in LOCK_FILES and not SKIP_DIRS.intersection(d.split("/")):
            out[path] = blob
    return out


def sweep_scans(home: Path, ttl: float, now: float | None = None) -> None:
    """Drop the scans of commits no box was made from for `ttl` seconds (gc)."""
    now = time.time() if now is None else now
    for f in (Path(home) / "deps" / SCANS).glob("*.json"):
        try:
            if now - f.stat().st_mtime > ttl:
                f.unlink()
        except OSError:
            pass


def detect(files: dict[str, str], cfg: DepsConfig) -> list[Layer]:
    """The layers a commit needs: lock files found in its tree (unless detection is off), the
    files [deps] names, and [deps.<name>] recipes."""
    by_dir: dict[str, set[str]] = {}
    for path in files:  # plain string work: a Django-size tree has ~7,000 paths
        d, _, name = path.rpartition("/")
        if d and SKIP_DIRS.intersection(d.split("/")):
            continue
        by_dir.setdefault(d, set()).add(name)
    layers: list[Layer] = []
    if cfg.detect:
        for d in sorted(by_dir):
            layers += _layers_in(d, by_dir[d], files)
    for named in cfg.files:
        layers = _add_named(layers, named, files, by_dir)
    for recipe in cfg.recipes.values():
        missing = [f for f in recipe.lock if _join(recipe.dir, f) not in files]
        if missing:
            raise ConfigError(f"[deps.{recipe.name}] lock: {missing[0]} is not in the commit.")
        layers.append(Layer(kind=f"recipe:{recipe.name}", dir=recipe.dir,
                            files=[_join(recipe.dir, f) for f in recipe.lock], paths=list(recipe.paths),
                            cmd=recipe.cmd))
    _check_attach_points(layers, files)
    return layers


def _layers_in(d: str, names: set[str], files: dict[str, str]) -> list[Layer]:
    out = []
    extra = [n for n in ("pyproject.toml", ".python-version") if n in names]
    for lock in PY_LOCKS:
        if lock in names:
            out.append(Layer(kind=lock.split(".")[0], dir=d, files=[_join(d, n) for n in [lock, *extra]],
                             paths=[".venv"]))
            break
    else:
        reqs = sorted(n for n in names if _REQUIREMENTS.match(n))
        # requirements files count where a Python project lives (or at the root): docs/requirements.txt
        # for a documentation build is not the app's environment
        if reqs and (d == "" or "pyproject.toml" in names or "setup.py" in names):
            out.append(Layer(kind="pip", dir=d, files=[_join(d, n) for n in reqs + extra], paths=[".venv"]))
    for lock, kind in NODE_LOCKS.items():
        if lock in names and "package.json" in names:
            out.append(Layer(kind=kind, dir=d, files=[_join(d, lock), _join(d, "package.json")],
                             paths=["node_modules"]))
            break
    return out


def _add_named(layers: list[Layer], named: str, files: dict[str, str], by_dir: dict[str, set[str]]) -> list[Layer]:
    """A lock file [deps] files names: a *.txt joins (or makes) the root's pip layer, others their dir's."""
    if named not in files:
        raise ConfigError(f"[deps] files: {named} is not in the commit.")
    p = PurePosixPath(named)
    d = str(p.parent) if str(p.parent) != "." else ""
    if any(named in layer.files for layer in layers):
        return layers
    if p.suffix == ".txt":
        pip = next((layer for layer in layers if layer.kind == "pip" and layer.dir == ""), None)
        if pip is None:
            pip = Layer(kind="pip", dir="", files=[], paths=[".venv"])
            layers.append(pip)
        pip.files.append(named)
        return layers
    found = _layers_in(d, {p.name, *by_dir.get(d, set())} if p.name in (*PY_LOCKS, *NODE_LOCKS) else set(), files)
    found = [layer for layer in found if named in layer.files]
    if not found:
        raise ConfigError(f"[deps] files: wtbox does not know how to install {named}; "
                         f"give it a [deps.<name>] recipe with cmd and paths.")
    return layers + found


def _check_attach_points(layers: list[Layer], files: dict[str, str]) -> None:
    """A layer is mounted over its paths: they must not hold tracked files (those would vanish)."""
    for layer in layers:
        for p in layer.paths:
            where = _join(layer.dir, p) + "/"
            if any(f.startswith(where) for f in files):
                raise ConfigError(f"The dependency layer {layer.kind} would cover {where}, which holds files "
                                 f"tracked in git; turn it off with [deps] detect = false or move them.")


def _join(d: str, name: str) -> str:
    return f"{d}/{name}" if d else name


# ---------------------------------------------------------------- keys and toolchains

def key_of(layer: Layer, files: dict[str, str], home: Path) -> str:
    """SHA-256 over what decides the layer's contents: lock files, toolchain, recipe. The toolchain's
    versions are kept on the layer (a box's fingerprint names them)."""
    layer.toolchain = toolchain(layer.kind, home)
    doc = {"format": FORMAT, "kind": layer.kind, "dir": layer.dir, "paths": layer.paths, "cmd": layer.cmd,
           "files": {f: files[f] for f in sorted(layer.files)}, "toolchain": layer.toolchain}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


TOOLS = {
    "uv": ["uv", "python3"], "pip": ["uv", "python3"], "poetry": ["poetry", "python3"],
    "npm": ["node", "npm"], "pnpm": ["node", "pnpm"], "yarn": ["node", "yarn"],
}


def tool(name: str) -> str | None:
    """The executable: on PATH, else (uv) the one installed beside wtbox."""
    found = shutil.which(name)
    if found:
        return found
    beside = Path(sys.executable).with_name(name)
    return str(beside) if beside.exists() else None


def toolchain(kind: str, home: Path) -> dict[str, str]:
    """Versions of the tools a layer kind is built with (cached by the binaries' identity)."""
    out = {}
    for name in TOOLS.get(kind, []):
        exe = tool(name)
        out[name] = _version(exe, home) if exe else "missing"
    for var in ("UV_PYTHON", "UV_INDEX_URL", "PIP_INDEX_URL", "npm_config_registry"):
        if os.environ.get(var):
            out[var] = os.environ[var]
    return out


RUNTIMES = ("python3", "node")  # what a box's services most often run with


def runtime_toolchain(path: str | None, home: Path) -> dict[str, str]:
    """Versions of the interpreters on a box's PATH (its services run with them): one stat and the
    cached answer each; `--version` runs once per binary on this host."""
    out = {}
    for name in RUNTIMES:
        exe = shutil.which(name, path=path)
        if exe:
            out[name] = _version(exe, home)
    return out


def _version(exe: str, home: Path) -> str:
    real = os.path.realpath(exe)
    try:
        st = os.stat(real)
    except OSError:
        return "missing"
    ident = f"{real}:{st.st_mtime_ns}:{st.st_size}"
    cache_file = Path(home) / "deps" / ".toolchains.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    if ident not in cache:
        proc = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
        cache[ident] = (proc.stdout or proc.stderr).strip().splitlines()[0] if proc.returncode == 0 else "unknown"
        from worktreebox.system.fsutil import atomic_write

        cache_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(cache_file, json.dumps(cache, indent=1))
    return cache[ident]


# ---------------------------------------------------------------- building

def missing_tool(layer: Layer) -> str | None:
    """The tool a detected layer needs that this host lacks (the layer is then skipped)."""
    for name in TOOLS.get(layer.kind, []):
        if name != "python3" and tool(name) is None:
            return name
    return None


@contextlib.contextmanager
def use(home: Path, repo: str | Path, sha: str, layer: Layer, *, run: Callable[[str, Path, dict], None],
        on_wait: Callable[[], None] | None = None) -> Iterator[tuple[Path, bool]]:
    """(deps/<key>, built now), built first if missing; kept from gc inside the block.

    `run(cmd, cwd, env)` runs one build command (its output goes to the box's logs) and raises
    with the last lines when it fails.
    """
    def build(tmp: Path) -> None:
        _build(Path(repo), sha, layer, tmp, run, home)

    with store(home).use(layer.key, build, on_wait=on_wait) as found:
        yield found


def _build(repo: Path, sha: str, layer: Layer, tmp: Path, run: Callable[[str, Path, dict], None], home: Path) -> None:
    from worktreebox.layers import downloads

    work = tmp / "work"
    work.mkdir()
    _export(repo, sha, layer.dir, work)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("WTBOX_") and k not in ("VIRTUAL_ENV", "UV_PROJECT_ENVIRONMENT", "PYTHONHOME")}
    env.update(downloads.env(home))
    # The layer holds its packages' bytecode, beside them (no prefix): every box reads it as it is,
    # where each box compiled its dependencies again at its first import (into its own upper dir).
    env.update({"UV_COMPILE_BYTECODE": "1", "PYTHONPYCACHEPREFIX": ""})
    t0 = time.time()
    run(build_command(layer), work, env)
    for p in layer.paths:
        made = work / p
        if not made.is_dir():
            raise WtboxError(f"The dependency build ({layer.kind} in {layer.dir or 'the repo root'}) made no {p}/.")
        if (made / "pyvenv.cfg").is_file():
            relocate_venv(made, work)
        if not (made / ".gitignore").exists():
            (made / ".gitignore").write_text("*\n")  # git status in a box never lists the layer
        dest = tmp / "paths" / p
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.rename(made, dest)
    shutil.rmtree(work)
    meta = {**layer.to_json(), "files": layer.files, "commit": sha, "repo": str(repo),
            "toolchain": toolchain(layer.kind, home), "built_at": t0, "build_seconds": round(time.time() - t0, 2)}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")


def build_command(layer: Layer) -> str:
    """The shell command that makes the layer's paths in an export of its directory."""
    q = shlex.quote
    if layer.kind == "uv":
        uv = q(tool("uv") or "uv")
        # --seed: pip is there, so `pip install` in a box works as people expect; --inexact keeps it
        return f"{uv} venv --quiet --relocatable --seed .venv && {uv} sync --frozen --inexact"
    if layer.kind == "pip":
        uv = q(tool("uv") or "uv")
        names = [PurePosixPath(f).name if PurePosixPath(f).parent == PurePosixPath(layer.dir or ".")
                 else os.path.relpath(f, layer.dir or ".") for f in layer.files if f.endswith(".txt")]
        cmd = f"{uv} venv --quiet --relocatable --seed .venv && {uv} pip install --python .venv/bin/python"
        cmd += "".join(f" -r {q(n)}" for n in names)
        return cmd + (f" && if [ -f pyproject.toml ] && grep -q '^\\[project\\]' pyproject.toml || [ -f setup.py ];"
                      f" then {uv} pip install --python .venv/bin/python --no-deps -e .; fi")
    if layer.kind == "poetry":
        return "POETRY_VIRTUALENVS_IN_PROJECT=true POETRY_VIRTUALENVS_CREATE=true poetry install --no-interaction"
    if layer.kind == "npm":
        return "npm ci --no-audit --no-fund"
    if layer.kind == "pnpm":
        return "pnpm install --frozen-lockfile"
    if layer.kind == "yarn":
        return "if [ -f .yarnrc.yml ]; then yarn install --immutable; else yarn install --frozen-lockfile; fi"
    assert layer.cmd is not None
    return layer.cmd


def _export(repo: Path, sha: str, d: str, dest: Path) -> None:
    """The lock's directory at `sha` (git archive: the build needs the project, e.g. for its editable install)."""
    spec = f"{sha}:{d}" if d else sha
    archive = subprocess.Popen(["git", "-C", str(repo), "archive", "--format=tar", spec], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    untar = subprocess.run(["tar", "-x", "-C", str(dest)], stdin=archive.stdout, capture_output=True)
    assert archive.stdout is not None
    archive.stdout.close()
    err = archive.stderr.read().decode(errors="replace") if archive.stderr else ""
    if archive.wait() != 0 or untar.returncode != 0:
        raise WtboxError(f"Cannot export {d or 'the root'} of {sha[:12]} for the dependency build: "
                         f"{(err or untar.stderr.decode(errors='replace')).strip()}.")


def relocate_venv(venv: Path, project: Path) -> None:
    """Make a virtualenv built at `project/<venv>` work wherever it is attached.

    - the project's own editable install (.pth lines, setuptools' finder mappings) names the
      build's scratch path: rewritten relative to site-packages, so it resolves to the box;
    - entry-point scripts whose shebang names the build's python (poetry, pip) become the
      same relative trampoline uv writes for relocatable environments.
    """
    build_root = str(project)
    for site in venv.glob("lib/python*/site-packages"):
        rel_project = os.path.relpath(project, site)  # e.g. ../../../.. from .venv/lib/pythonX.Y/site-packages
        for pth in site.glob("*.pth"):
            text = pth.read_text(errors="replace")
            if build_root not in text:
                continue
            lines = []
            for line in text.splitlines():
                if line.startswith(build_root) and not line.startswith("import"):
                    line = os.path.normpath(os.path.join(rel_project, os.path.relpath(line, build_root)))
                lines.append(line)
            pth.write_text("\n".join(lines) + "\n")
        for finder in site.glob("__editable__*finder.py"):
            text = finder.read_text()
            if build_root not in text:
                continue
            # a string literal '<build>/x' becomes an expression resolved next to the finder at import time
            pattern = re.compile(r"""(['"])""" + re.escape(build_root) + r"""(/[^'"]*)?\1""")
            text = pattern.sub(lambda m: ("__import__('os').path.normpath(__import__('os').path.join("
                                          f"__import__('os').path.dirname(__file__), {rel_project!r} + "  # noqa: B023 (called before the loop moves on)
                                          f"{(m.group(2) or '')!r}))"), text)
            finder.write_text(text)
    trampoline = "#!/bin/sh\n'''exec' \"$(dirname -- \"$(realpath -- \"$0\")\")\"/'python' \"$0\" \"$@\"\n' '''\n"
    for script in (venv / "bin").iterdir():
        if script.is_symlink() or not script.is_file():
            continue
        try:
            with open(script, "rb") as f:
                head = f.read(256)
        except OSError:
            continue
        if head.startswith(b"#!") and str(venv).encode() in head.split(b"\n", 1)[0]:
            body = script.read_bytes().split(b"\n", 1)[1]
            script.write_bytes(trampoline.encode() + body)
