"""Issue 29's stacks, each declaring what it needs only in its own files (no wtbox.toml): `wtbox init`,
then three boxes at once, each with its own Redis and database, `wtbox test` passing in all three at
once, and `rm` leaving no process, port or data of any backing service.

- tests/apps/stacks/django: Django + Celery + Redis, described by compose.yaml
- tests/apps/stacks/express: Express + PostgreSQL + Redis, described by a GitHub Actions workflow
- tests/apps/stacks/flask: Flask with a Procfile and a .gitlab-ci.yml

The three boxes of a stack share one dependency layer (built once, by whichever `new` comes first).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from helpers import box_pids, git, redis_cmd

from worktreebox.providers.backing import runtime_class

APPS = Path(__file__).parent / "apps" / "stacks"
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(runtime_class("redis", "native").unavailable() is not None,
                                 reason="no redis-server on this host")]


def stack_repo(tmp_path: Path, name: str) -> Path:
    repo = tmp_path / name
    shutil.copytree(APPS / name, repo)
    git(repo, "init", "-q", "-b", "main")
    git(repo, "config", "user.email", "test@example.com")
    git(repo, "config", "user.name", "Test")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "the app, as its team keeps it")
    return repo


def at_once(run_env: dict, *argvs: list[str], timeout: float = 900) -> list[subprocess.CompletedProcess]:
    """Several wtbox commands started together; their results once all have ended."""
    procs = [subprocess.Popen([sys.executable, "-m", "worktreebox.cli.main", *a], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=run_env) for a in argvs]
    out = []
    for p, argv in zip(procs, argvs, strict=True):
        stdout, stderr = p.communicate(timeout=timeout)
        out.append(subprocess.CompletedProcess(argv, p.returncode, stdout, stderr))
    return out




def run_stack(tmp_path: Path, run_wtbox, wtbox_home: Path, name: str, expect: dict[str, str]) -> None:
    repo = stack_repo(tmp_path, name)
    assert not (repo / "wtbox.toml").exists()
    run_wtbox("init", "--repo", str(repo))
    text = (repo / "wtbox.toml").read_text()
    for line in expect.values():
        assert line in text, (line, text)
    config = tomllib.loads(text)
    git(repo, "add", "wtbox.toml")
    git(repo, "commit", "-q", "-m", "wtbox init")
    env = {**os.environ, "WTBOX_HOME": str(wtbox_home), "WTBOX_NO_AUTO_GC": "1"}
    made = at_once(env, *(["new", f"{name}-{i}", "--repo", str(repo), "--json"] for i in range(3)))
    for p in made:
        assert p.returncode == 0, p.stderr
    boxes = [json.loads(p.stdout) for p in made]
    try:
        redis_name = next(iter(config["backing"]))
        ports = [b["ports"][redis_name] for b in boxes]
        assert len(set(ports)) == 3
        redis_cmd(ports[0], "SET", "only-in-the-first", "1")
        assert [redis_cmd(p, "EXISTS", "only-in-the-first") for p in ports] == [b":1\r\n", b":0\r\n", b":0\r\n"]
        assert len({b["database"]["name"] for b in boxes}) == 3
        tested = at_once(env, *(["test", b["id"], "--json"] for b in boxes))
        for p in tested:
            assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-2000:])
        pids = {b["id"]: box_pids(b["id"]) for b in boxes}
        assert all(pids.values())
    finally:
        run_wtbox("rm", "--force", *(b["id"] for b in boxes))
    for b in boxes:
        assert box_pids(b["id"]) == set()
        for port in b["ports"].values():
            with socket.socket() as s:
                assert s.connect_ex(("127.0.0.1", port)) != 0, (b["id"], port)
        assert not Path(b["dir"]).exists()


def test_django_celery_redis_from_compose(tmp_path, run_wtbox, wtbox_home):
    run_stack(tmp_path, run_wtbox, wtbox_home, "django", {
        "redis": '[backing.redis]\nimage = "redis:7"  # from compose.yaml services.redis',
        "broker": 'CELERY_BROKER_URL = "{{ backing.redis.url }}/1"  # from compose.yaml services.web environment',
        "db": 'DATABASE_URL = "{{ db.url }}"',
        "worker": "[services.worker]",
        "test": 'python manage.py test"  # from manage.py (Django)',
    })


@pytest.mark.skipif(not shutil.which("npm"), reason="no npm on this host")
def test_express_postgres_redis_from_github_actions(tmp_path, run_wtbox, wtbox_home):
    run_stack(tmp_path, run_wtbox, wtbox_home, "express", {
        "redis": '[backing.redis]\nimage = "redis:7"  # from .github/workflows/test.yml job test services.redis',
        "url": 'REDIS_URL = "{{ backing.redis.url }}"  # from .github/workflows/test.yml job test env',
        "test": 'cmd = "npm test"  # from .github/workflows/test.yml job test, step "Run tests"',
        "web": 'cmd = "npm start"  # from package.json scripts.start',
    })


def test_flask_procfile_and_gitlab_ci(tmp_path, run_wtbox, wtbox_home):
    run_stack(tmp_path, run_wtbox, wtbox_home, "flask", {
        "redis": "[backing.redis]",
        "db": 'DATABASE_URL = "{{ db.url }}"  # from .gitlab-ci.yml job test variables',
        "web": "# from Procfile web",
        "test": 'pytest -q"  # from .gitlab-ci.yml job test script',
    })
