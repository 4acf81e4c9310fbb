"""Shared fixtures: a private WTBOX_HOME per test, real git repos, the CLI as a subprocess."""
from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import (  # noqa: F401 (CORE_TOML, git: old imports from conftest)
    CORE_TOML,
    git,
    remove_all_boxes,
    remove_box_cgroups,
    stop_router,
    stop_routers_under,
)

# one real PostgreSQL cluster for the whole session, its fixtures for every test (tests/pg_fixtures.py)
pytest_plugins = ["pg_fixtures"]

ROOT = Path(__file__).resolve().parent.parent
# Every test runs wtbox in process, as before the CLI server; tests/cli/test_server.py turns it on.
os.environ["WTBOX_NO_SERVER"] = "1"
# No spare sandboxes (made ahead after each `new`, outliving the test's boxes): tests/test_spares.py
# turns them on and removes them.
os.environ["WTBOX_SANDBOX_SPARES"] = "0"
os.environ["WTBOX_SANDBOX_SPARE_DELAY"] = "0"  # a test that waits for a spare waits for its making only

# A test that asks for one of these makes boxes or talks to the session's PostgreSQL: real
# processes for seconds. It is marked `slow` here, so a new test is marked without anyone thinking
# of it; a slow test that uses none of them says so itself (@pytest.mark.slow).
SLOW_FIXTURES = frozenset({"host", "run_wtbox", "pg_cluster", "pg_host", "shared_postgres"})


def pytest_addoption(parser):
    parser.addoption("--wtbox-pass", choices=("all", "parallel", "serial"), default="all",
                     help="scripts/test.sh's passes: the tests not marked serial (on xdist workers), "
                          "then the serial ones alone")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)
        if item.get_closest_marker("serial") is not None or item.get_closest_marker("chaos") is not None:
            item.add_marker(pytest.mark.slow)  # it measures real processes' time, or kills them at random
    which = config.getoption("--wtbox-pass")
    if which == "all":
        return
    wanted = which == "serial"
    keep = [i for i in items if (i.get_closest_marker("serial") is not None) == wanted]
    dropped = [i for i in items if (i.get_closest_marker("serial") is not None) != wanted]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


@pytest.fixture(autouse=True)
def postgres_for_slow_tests(request):
    """A slow test may make boxes with a database: the session's cluster is there for it (started on
    first use, so `-m "not slow"` never starts one)."""
    if request.node.get_closest_marker("slow") is not None:
        request.getfixturevalue("shared_postgres")


@pytest.fixture(autouse=True)
def no_stray_cgroups(request):
    """After each test, remove the cgroups of the boxes left in any wtbox home under its tmp_path,
    and stop its router: the home goes with the tmp dir, the cgroups and Caddy would not."""
    if "tmp_path" not in request.fixturenames:
        yield
        return
    tmp = request.getfixturevalue("tmp_path")  # now, so it is torn down after this check
    yield
    for pattern in ("*/registry.sqlite3", "*/*/registry.sqlite3", "*/*/*/registry.sqlite3"):
        for registry in tmp.glob(pattern):
            remove_box_cgroups(registry.parent)
            stop_router(registry.parent)
    stop_routers_under(tmp)  # also of homes the test deleted


@pytest.fixture
def wtbox_home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("WTBOX_HOME", str(home))
    monkeypatch.setenv("WTBOX_NO_AUTO_GC", "1")
    # each test home leases from its own slice, so homes that run side by side (helpers,
    # benchmarks) rarely offer each other the same port
    base = 20000 + random.randrange(100) * 100
    monkeypatch.setenv("WTBOX_PORT_RANGE", f"{base}-{base + 99}")
    return home


@pytest.fixture(autouse=True)
def no_mounts_left(tmp_path):
    """Boxes a test left behind (or a test that failed half-way) keep their copy-on-write mounts:
    take down whatever is mounted under the test's dir, whichever homes it made there."""
    yield
    from worktreebox.providers.mounts.base import unmount_all

    unmount_all(tmp_path)


@pytest.fixture
def make_repo(tmp_path):
    """make_repo(files={'path': 'text'}, toml='...') -> a real git repo with one commit."""
    counter = [0]

    def make(files: dict[str, str] | None = None, toml: str | None = None, name: str | None = None) -> Path:
        counter[0] += 1
        repo = tmp_path / (name or f"repo{counter[0]}")
        repo.mkdir()
        git(repo, "init", "-q", "-b", "main")
        git(repo, "config", "user.email", "test@example.com")
        git(repo, "config", "user.name", "Test")
        content = {"README.md": "# demo\n", **(files or {})}
        if toml is not None:
            content["wtbox.toml"] = toml
        for rel, text in content.items():
            p = repo / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(text)
            if rel.endswith(".sh"):
                p.chmod(0o755)
        git(repo, "add", "-A")
        git(repo, "commit", "-q", "-m", "initial")
        return repo

    return make


@pytest.fixture
def host(wtbox_home):
    from worktreebox.host import Host

    h = Host(wtbox_home)
    yield h
    remove_all_boxes(h)


@pytest.fixture
def run_wtbox(wtbox_home):
    """Run the real CLI in a subprocess: run_wtbox('ls', '--json', cwd=..., check=True)."""

    def run(*args: str, check: bool = True, input: str | None = None, env: dict | None = None,
            cwd: str | Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        full_env = {**os.environ, "WTBOX_HOME": str(wtbox_home), "WTBOX_NO_AUTO_GC": "1", **(env or {})}
        proc = subprocess.run([sys.executable, "-m", "worktreebox.cli.main", *args], capture_output=True, text=True,
                              input=input, env=full_env, cwd=cwd, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"wtbox {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc

    return run
