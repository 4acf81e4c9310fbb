"""Dependency layers against the real package managers: uv from PyPI, npm from the npm registry.

One layer per lock file on the host, mounted copy-on-write into every box: boxes share it,
their own installs stay theirs, the project's editable install resolves to the box, a failed
build leaves nothing, and the fallback (a copy) behaves the same.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers import CORE_TOML, git

from worktreebox.layers.deps import tool
from worktreebox.providers.mounts.base import mounts_under

UV = tool("uv")
NPM = shutil.which("npm")

PYPROJECT = """\
[project]
name = "mypkg"
version = "0.1.0"
requires-python = ">=3.11"
dependencies = ["six"]

[project.scripts]
mycli = "mypkg:main"

[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"
"""
PACKAGE_JSON = '{"name": "app", "version": "1.0.0", "private": true, "dependencies": {"is-number": "7.0.0"}}\n'


@pytest.fixture(scope="session")
def download_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(autouse=True)
def shared_downloads(wtbox_home, download_cache):
    """The tests' homes share one download cache (as boxes of one home do), so each test does not
    fetch the same wheels and tarballs again."""
    (wtbox_home / "downloads").mkdir(parents=True)
    for sub in ("uv", "pip", "npm"):
        (download_cache / sub).mkdir(exist_ok=True)
        (wtbox_home / "downloads" / sub).symlink_to(download_cache / sub)


def _entries(home: Path) -> list[str]:
    root = home / "deps"
    return sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) if root.exists() else []


def _uv_repo(make_repo, tmp_path: Path, toml: str = CORE_TOML, name: str | None = None) -> Path:
    repo = make_repo({"pyproject.toml": PYPROJECT, "src/mypkg/__init__.py": "def main():\n    print(__file__)\n",
                      ".gitignore": ".venv/\n"}, toml=toml, name=name)
    env = {**os.environ, "UV_CACHE_DIR": str(Path(os.readlink(tmp_path / "home" / "downloads" / "uv")))}
    subprocess.run([UV, "lock", "--quiet"], cwd=repo, check=True, env=env, timeout=300)
    git(repo, "add", "uv.lock")
    git(repo, "commit", "-qm", "lock")
    return repo


def _new(run_wtbox, repo: Path, task: str, **kw) -> dict:
    return json.loads(run_wtbox("new", task, "--repo", str(repo), "--json", timeout=600, **kw).stdout)


def _in_box(run_wtbox, box: dict, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return run_wtbox("exec", box["id"], "--", *cmd, check=check, timeout=300)


@pytest.mark.skipif(UV is None, reason="uv is not installed")
def test_five_boxes_share_one_uv_layer_and_keep_their_own_installs(make_repo, run_wtbox, wtbox_home, tmp_path):
    repo = _uv_repo(make_repo, tmp_path)
    with ThreadPoolExecutor(5) as pool:
        boxes = list(pool.map(lambda i: _new(run_wtbox, repo, f"py-{i}"), range(5)))
    keys = _entries(wtbox_home)
    assert len(keys) == 1  # built once, for all five
    assert [b["deps"] for b in boxes] == [[{"kind": "uv", "dir": "", "paths": [".venv"], "key": keys[0]}]] * 5
    layer = wtbox_home / "deps" / keys[0] / "paths" / ".venv"
    # built with its bytecode: a box's first import of its dependencies compiles nothing
    assert list(layer.glob("lib/python*/site-packages/__pycache__/six.*.pyc"))
    for b in boxes:
        wt = Path(b["path"])
        assert any(m.target == str(wt / ".venv") for m in mounts_under(b["dir"]))
        # the project's own editable install resolves to this box's worktree, never to the builder's path
        out = _in_box(run_wtbox, b, ".venv/bin/python", "-c", "import mypkg, six; print(mypkg.__file__)").stdout
        assert out.strip() == str(wt / "src" / "mypkg" / "__init__.py")
        cached = _in_box(run_wtbox, b, ".venv/bin/python", "-c", "import six; print(six.__spec__.cached)").stdout
        assert (layer / Path(cached.strip()).relative_to(wt / ".venv")).is_file(), cached  # the layer's own .pyc
        assert _in_box(run_wtbox, b, ".venv/bin/mycli").stdout.strip() == str(wt / "src" / "mypkg" / "__init__.py")
        assert git(wt, "status", "--porcelain") == ""
        assert b["timings"]["deps"] >= 0
    a, other = boxes[0], boxes[1]
    # `pip install` in one box stays in that box
    _in_box(run_wtbox, a, ".venv/bin/python", "-m", "pip", "install", "--quiet", "idna")
    assert _in_box(run_wtbox, a, ".venv/bin/python", "-c", "import idna").returncode == 0
    assert _in_box(run_wtbox, other, ".venv/bin/python", "-c", "import idna", check=False).returncode != 0
    assert not list(layer.glob("lib/python*/site-packages/idna"))
    assert git(Path(a["path"]), "status", "--porcelain") == ""
    # pip's and uv's download caches: the host's (layer builds share them); a sandboxed box's own,
    # since a cache two boxes write is a way from one into the other (resources/caches.py)
    sandboxed = a["sandbox"]["provider"] != "off"
    shared = (lambda sub: Path(a["dir"]) / "cache" / "downloads" / sub) if sandboxed else \
        (lambda sub: (wtbox_home / "downloads" / sub).resolve())
    cache = _in_box(run_wtbox, a, ".venv/bin/python", "-m", "pip", "cache", "dir").stdout.strip()
    assert Path(cache).resolve() == shared("pip")
    uv_cache = _in_box(run_wtbox, a, UV, "cache", "dir").stdout.strip()
    assert Path(uv_cache).resolve() == shared("uv")
    assert a["env"]["XDG_CACHE_HOME"] != other["env"]["XDG_CACHE_HOME"]

    run_wtbox("rm", "--all", "--yes", "--force")
    assert mounts_under(wtbox_home) == []
    assert _entries(wtbox_home) == keys  # kept for the next box ...
    out = json.loads(run_wtbox("gc", "--grace", "0", "--json", env={"WTBOX_LAYER_TTL": "0"}).stdout)
    assert f"deps/{keys[0]}" in out["layers"] and _entries(wtbox_home) == []  # ... until unused for layer_ttl



@pytest.mark.skipif(NPM is None, reason="npm is not installed")
def test_npm_layer_is_shared_and_npm_install_stays_in_its_box(make_repo, run_wtbox, wtbox_home, tmp_path):
    repo = make_repo({"package.json": PACKAGE_JSON, "web/index.js": "console.log(require('is-number')(5))\n"},
                     toml=CORE_TOML)
    npm_env = {**os.environ, "npm_config_cache": str(wtbox_home / "downloads" / "npm")}
    subprocess.run([NPM, "install", "--package-lock-only", "--no-audit", "--no-fund"], cwd=repo, check=True,
                   env=npm_env, capture_output=True, timeout=300)
    git(repo, "add", "package-lock.json")
    git(repo, "commit", "-qm", "lock")
    a, b = (_new(run_wtbox, repo, f"js-{i}") for i in range(2))
    assert a["deps"] == b["deps"] and a["deps"][0]["kind"] == "npm" and a["deps"][0]["paths"] == ["node_modules"]
    assert _in_box(run_wtbox, a, "node", "web/index.js").stdout.strip() == "true"
    assert git(Path(a["path"]), "status", "--porcelain") == ""  # node_modules is not listed, ignored or not
    _in_box(run_wtbox, a, NPM, "install", "--no-audit", "--no-fund", "--no-save", "left-pad@1.3.0")
    assert (Path(a["path"]) / "node_modules" / "left-pad").is_dir()
    assert not (Path(b["path"]) / "node_modules" / "left-pad").exists()
    assert not (wtbox_home / "deps" / a["deps"][0]["key"] / "paths" / "node_modules" / "left-pad").exists()
    assert _in_box(run_wtbox, b, "node", "web/index.js").stdout.strip() == "true"
    run_wtbox("rm", "--all", "--yes", "--force")
    assert mounts_under(wtbox_home) == []


def test_a_failed_build_leaves_nothing_and_says_why(make_repo, run_wtbox, wtbox_home):
    toml = CORE_TOML + ('\n[deps]\ndetect = false\n[deps.gen]\ncmd = "echo fetching; echo no such index >&2; exit 7"\n'
                        'paths = ["out"]\n')
    repo = make_repo(toml=toml)
    proc = run_wtbox("new", "bad", "--repo", str(repo), check=False)
    assert proc.returncode == 1 and "exit code 7" in proc.stderr and "no such index" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert json.loads(run_wtbox("ls", "--json").stdout) == []
    assert _entries(wtbox_home) == [] and not [p for p in (wtbox_home / "deps").iterdir() if p.name.startswith(".tmp")]
    assert mounts_under(wtbox_home) == []


def _built_in(*boxes: dict) -> int:
    """How many of these boxes built a layer: the build's output is in the box's logs (the build runs
    in a sandbox of its own, which writes nowhere else)."""
    logs = [Path(b["dir"]) / "logs" / "deps.jsonl" for b in boxes]
    return sum(1 for log in logs if log.exists() and '"built"' in log.read_text())


def test_recipe_layer_and_detection_off(make_repo, run_wtbox, wtbox_home, tmp_path):
    toml = CORE_TOML + '''
[deps]
detect = false
[deps.gen]
cmd = "echo built && mkdir -p vendor/bundle && cat Gemfile.lock > vendor/bundle/gems"
paths = ["vendor/bundle"]
lock = ["Gemfile.lock"]
'''
    repo = make_repo({"Gemfile.lock": "rack (3.0)\n", "package.json": PACKAGE_JSON, "package-lock.json": "{}\n"},
                     toml=toml)
    a = _new(run_wtbox, repo, "rb-a")
    b = _new(run_wtbox, repo, "rb-b")
    assert [layer["kind"] for layer in a["deps"]] == ["recipe:gen"]  # package-lock.json ignored: detect = false
    assert _built_in(a, b) == 1  # once for both boxes
    for box in (a, b):
        assert (Path(box["path"]) / "vendor" / "bundle" / "gems").read_text() == "rack (3.0)\n"
    (Path(a["path"]) / "vendor" / "bundle" / "gems").write_text("mine\n")
    assert (Path(b["path"]) / "vendor" / "bundle" / "gems").read_text() == "rack (3.0)\n"
    (repo / "README.md").write_text("# other files changed\n")
    git(repo, "commit", "-qam", "docs")
    assert _new(run_wtbox, repo, "rb-docs")["deps"][0]["key"] == a["deps"][0]["key"]  # same lock: same layer
    (repo / "Gemfile.lock").write_text("rack (3.1)\n")
    git(repo, "commit", "-qam", "bump")
    c = _new(run_wtbox, repo, "rb-c")
    assert c["deps"][0]["key"] != a["deps"][0]["key"] and _built_in(c) == 1
    run_wtbox("rm", "--all", "--yes", "--force")

    bad = make_repo(toml=CORE_TOML + '\n[deps.x]\ncmd = "true"\n')
    proc = run_wtbox("new", "bad", "--repo", str(bad), check=False)
    assert proc.returncode == 2 and "[deps.x] paths" in proc.stderr


@pytest.mark.skipif(UV is None, reason="uv is not installed")
@pytest.mark.parametrize("fallback", ["checkout", "fuse-overlayfs"])
def test_fallbacks_attach_the_same_layer(fallback, make_repo, run_wtbox, wtbox_home, tmp_path):
    from worktreebox.providers import mounts

    try:
        mounts.choose(tmp_path / "probe", fallback, refresh=True)
    except Exception as e:
        pytest.skip(f"{fallback} does not work here: {e}")
    repo = _uv_repo(make_repo, tmp_path)
    env = {"WTBOX_MOUNTS": fallback}
    a = json.loads(run_wtbox("new", "fb-a", "--repo", str(repo), "--json", env=env, timeout=600).stdout)
    b = json.loads(run_wtbox("new", "fb-b", "--repo", str(repo), "--json", env=env, timeout=600).stdout)
    assert a["deps"] == b["deps"] and len(_entries(wtbox_home)) == 1
    for box in (a, b):
        out = _in_box(run_wtbox, box, ".venv/bin/python", "-c", "import mypkg, six; print(mypkg.__file__)").stdout
        assert out.strip() == str(Path(box["path"]) / "src" / "mypkg" / "__init__.py")
        assert git(Path(box["path"]), "status", "--porcelain") == ""
    _in_box(run_wtbox, a, ".venv/bin/python", "-m", "pip", "install", "--quiet", "idna")
    assert _in_box(run_wtbox, b, ".venv/bin/python", "-c", "import idna", check=False).returncode != 0
    run_wtbox("rm", "--all", "--yes", "--force")
    assert mounts_under(wtbox_home) == []


MIGRATE_WITH_DEPS = """\
import os, subprocess, sys
import six  # from the dependency layer: the migration runs after it is attached
assert open("generated.txt").read() == "from setup\\n", "[setup] cmd has not run yet"
subprocess.run(["psql", "-q", os.environ["DATABASE_URL"], "-c", "CREATE TABLE made_by_migrate (x int)"], check=True)
print("migrated", os.environ["PGDATABASE"], "with", sys.executable)
"""


@pytest.mark.skipif(UV is None or not shutil.which("psql"), reason="needs uv and psql")
@pytest.mark.parametrize("mode", ["database", "schema"])
def test_migrations_run_after_the_dependency_layer_and_setup(mode, make_repo, run_wtbox, wtbox_home, tmp_path,
                                                             pg_cluster):
    """tree -> deps -> [setup] -> migrations -> services; in database mode the golden copy is migrated in a
    box's tree that has the layer and ran setup (not a bare export of the commit)."""
    toml = f"""
[setup]
cmd = "echo 'from setup' > generated.txt"
[database]
mode = "{mode}"
migrate = ".venv/bin/python migrate.py"
[observability]
enabled = false
"""
    repo = _uv_repo(make_repo, tmp_path, toml=toml)
    (repo / "migrate.py").write_text(MIGRATE_WITH_DEPS)
    (repo / ".gitignore").write_text(".venv/\ngenerated.txt\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "migrate")
    boxes = [_new(run_wtbox, repo, f"mig-{i}") for i in range(2)]
    for b in boxes:
        t = b["timings"]
        assert {"tree", "deps", "database", "setup", "migrate", "services"} <= t.keys()
        proc = _in_box(run_wtbox, b, "psql", "-qtA", "-c", "SELECT count(*) FROM made_by_migrate")
        assert proc.stdout.strip() == "0"
    logs = [(Path(b["dir"]) / "logs" / "migrate.jsonl") for b in boxes]
    runs = sum(path.read_text().count("migrated") for path in logs if path.exists())
    assert runs == (1 if mode == "database" else 2)  # once per migration set in database mode
    run_wtbox("rm", "--all", "--yes", "--force")


def test_a_layer_that_would_cover_tracked_files_is_refused(make_repo, run_wtbox, wtbox_home):
    repo = make_repo({"package.json": PACKAGE_JSON, "package-lock.json": "{}\n",
                      "node_modules/vendored/index.js": "module.exports = 1\n"}, toml=CORE_TOML)
    for _ in range(2):  # the second time from the commit's cached scan
        proc = run_wtbox("new", "vendored", "--repo", str(repo), check=False)
        assert proc.returncode == 2 and "node_modules/" in proc.stderr and "tracked in git" in proc.stderr
    assert json.loads(run_wtbox("ls", "--json").stdout) == [] and mounts_under(wtbox_home) == []
