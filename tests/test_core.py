"""Box core: create/list/status/env/exec/rm, ports, caches, resolution, hostile input."""
from __future__ import annotations

import json
import socket
import stat
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers import CORE_TOML, git

from worktreebox.errors import UsageError

CONTRACT = {"id", "task", "branch", "path", "state", "created_at", "ports", "env"}


def test_new_ls_status_env_exec_rm(make_repo, run_wtbox, wtbox_home):
    repo = make_repo({"app.py": "print('hi')\n"}, toml=CORE_TOML + '\n[box]\nports = ["web", "api"]\n')
    out = json.loads(run_wtbox("new", "fix-login", "--repo", str(repo), "--json").stdout)
    assert out.keys() >= CONTRACT
    box_id = out["id"]
    assert box_id.startswith("fix-login-") and len(box_id.rsplit("-", 1)[1]) == 8
    assert out["branch"] == f"wtbox/{box_id}"
    assert out["path"] == str(wtbox_home / "boxes" / box_id / "worktree")
    assert (Path(out["path"]) / "app.py").read_text() == "print('hi')\n"
    assert set(out["ports"]) == {"web", "api"} and out["ports"]["api"] == out["ports"]["web"] + 1
    assert out["env"]["PORT"] == str(out["ports"]["web"])
    assert out["env"]["WTBOX_PORT_API"] == str(out["ports"]["api"])
    assert out["env"]["XDG_CACHE_HOME"] == str(wtbox_home / "boxes" / box_id / "cache")
    assert out["env"]["TMPDIR"] == str(wtbox_home / "boxes" / box_id / "tmp")
    assert "PYTHONPYCACHEPREFIX" in out["env"]
    assert out["state"] == "ready"

    env_file = wtbox_home / "boxes" / box_id / "env"
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    assert f"WTBOX_ID={box_id}" in env_file.read_text()

    listed = json.loads(run_wtbox("ls", "--json").stdout)
    assert [b["id"] for b in listed] == [box_id] and listed[0].keys() >= CONTRACT
    status = json.loads(run_wtbox("status", box_id, "--json").stdout)
    assert status.keys() >= CONTRACT and status["ports"] == out["ports"]
    env_json = json.loads(run_wtbox("env", box_id, "--format", "json").stdout)
    assert env_json == out["env"]
    sh = run_wtbox("env", box_id, "--format", "sh").stdout
    assert f"export WTBOX_ID={box_id}" in sh

    proc = run_wtbox("exec", box_id, "--", "sh", "-c", 'echo "$PORT $(pwd)"; exit 7', check=False)
    assert proc.returncode == 7
    assert proc.stdout.strip() == f"{out['ports']['web']} {out['path']}"

    run_wtbox("rm", box_id)
    assert json.loads(run_wtbox("ls", "--json").stdout) == []
    assert not (wtbox_home / "boxes" / box_id).exists()
    # the worktree's files go in a detached delete; it finishes within moments
    import time

    deadline = time.monotonic() + 10
    while any((wtbox_home / "trash").glob("*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any((wtbox_home / "trash").glob("*"))
    assert f"wtbox/{box_id}" not in git(repo, "branch", "--list")
    assert box_id not in git(repo, "worktree", "list")


def test_python_api_context_manager(host, make_repo):
    repo = make_repo(toml=CORE_TOML)
    with host.new("api-task", repo=repo) as box:
        assert box.path.is_dir()
        assert host.get(box.id).state == "ready"
        path = box.path
    assert not path.exists()
    assert host.list() == []


def test_copy_and_env_templates(host, make_repo):
    toml = CORE_TOML + """
[box]
ports = ["web"]
copy = [".env.example:.env", "missing.txt"]
env = { BASE_URL = "http://127.0.0.1:{{ ports.web }}/", BOX = "{{ box.id }}" }
"""
    repo = make_repo(toml=toml)
    (repo / ".env.example").write_text("SECRET_KEY=dev\n")  # untracked in the main checkout
    with host.new("copy", repo=repo) as box:
        assert (box.path / ".env").read_text() == "SECRET_KEY=dev\n"
        assert box.env["BASE_URL"] == f"http://127.0.0.1:{box.ports['web']}/"
        assert box.env["BOX"] == box.id


def test_twenty_parallel_new_get_distinct_ports(make_repo, run_wtbox, wtbox_home):
    repo = make_repo(toml=CORE_TOML + '\n[box]\nports = ["web", "api"]\n')
    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(lambda i: run_wtbox("new", f"par-{i}", "--repo", str(repo), "--json", check=False),
                                range(20)))
    failures = [r.stderr for r in results if r.returncode != 0]
    assert not failures, failures
    boxes = [json.loads(r.stdout) for r in results]
    ids = {b["id"] for b in boxes}
    ports = [p for b in boxes for p in b["ports"].values()]
    assert len(ids) == 20
    assert len({b["branch"] for b in boxes}) == 20 and len({b["path"] for b in boxes}) == 20
    assert len(ports) == len(set(ports)) == 40
    listed = json.loads(run_wtbox("ls", "--json").stdout)
    assert {b["id"] for b in listed} == ids
    run_wtbox("rm", "--all", "--yes")
    assert json.loads(run_wtbox("ls", "--json").stdout) == []
    from worktreebox.registry import Registry

    registry = Registry(wtbox_home / "registry.sqlite3")
    # Every box's lease is gone; the router keeps its host-level one (a tunnel to it stays valid).
    assert registry.lease_owners() == {"@router"} and len(registry.ports_of("@router")) == 1


def test_leases_released_on_rm_and_reused(host, make_repo):
    repo = make_repo(toml=CORE_TOML)
    a = host.new("a", repo=repo)
    port = a.ports["web"]
    b = host.new("b", repo=repo)
    assert b.ports["web"] != port
    host.rm(a.id)
    assert port not in host.registry.leased_ports()
    c = host.new("c", repo=repo)
    assert c.ports["web"] == port  # the lowest free block is reused


def test_port_taken_by_foreign_process_is_skipped(host, make_repo, monkeypatch):
    from worktreebox.resources.ports import default_range

    lo, _ = default_range()
    monkeypatch.setenv("WTBOX_PORT_RANGE", f"{lo + 500}-{lo + 600}")
    host._config = None
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", lo + 500))
    sock.listen()
    try:
        box = host.new("skip", repo=make_repo(toml=CORE_TOML))
        # the bound port is never leased; which free one comes next depends on what other
        # sessions on this host lease at the same moment (leases are host-wide)
        assert lo + 500 < box.ports["web"] <= lo + 600
    finally:
        sock.close()


def test_rm_refuses_unsaved_work(make_repo, run_wtbox, wtbox_home):
    repo = make_repo(toml=CORE_TOML)
    box = json.loads(run_wtbox("new", "work", "--repo", str(repo), "--json").stdout)
    wt = Path(box["path"])
    # 1. uncommitted file
    (wt / "new.txt").write_text("precious")
    proc = run_wtbox("rm", box["id"], check=False)
    assert proc.returncode == 1 and "uncommitted" in proc.stderr and "Traceback" not in proc.stderr
    assert (wt / "new.txt").exists()
    # 2. committed but on no other branch
    git(wt, "add", "new.txt")
    git(wt, "-c", "user.email=t@e", "-c", "user.name=t", "commit", "-qm", "work")
    proc = run_wtbox("rm", box["id"], check=False)
    assert proc.returncode == 1 and "no other branch" in proc.stderr
    assert json.loads(run_wtbox("ls", "--json").stdout)[0]["id"] == box["id"]
    # 3. once the commit is on another branch of the repository, rm goes through without --force (a
    # sandboxed box commits in a git dir of its own: its branch comes into the repository first)
    from worktreebox.host import Host
    from worktreebox.providers import sandbox

    sandbox.bring_back(Host(wtbox_home).get(box["id"]))
    git(repo, "branch", "saved", box["branch"])
    run_wtbox("rm", box["id"])
    assert not wt.exists()
    # 4. --force discards
    box2 = json.loads(run_wtbox("new", "work", "--repo", str(repo), "--json").stdout)
    (Path(box2["path"]) / "junk").write_text("x")
    run_wtbox("rm", "--force", box2["id"])
    assert not Path(box2["path"]).exists()


@pytest.mark.parametrize("task", ["../x", "a;rm -rf /", "x" * 300, "-rf", "", "   ", "💥💥", "ünïcødé task"])
def test_hostile_task_names(task, make_repo, run_wtbox, wtbox_home):
    repo = make_repo(toml=CORE_TOML)
    proc = run_wtbox("new", "--repo", str(repo), "--json", "--", task, check=False)
    assert "Traceback" not in proc.stderr
    if proc.returncode == 0:  # accepted names become a safe slug
        box = json.loads(proc.stdout)
        assert box["id"].rsplit("-", 1)[0].replace("-", "").isalnum()
        assert Path(box["path"]).resolve().is_relative_to((wtbox_home / "boxes").resolve())
        run_wtbox("rm", "--force", box["id"])
    else:
        assert proc.returncode == 2
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (wtbox_home / "boxes").exists() or not any((wtbox_home / "boxes").iterdir())
    assert git(repo, "branch", "--list", "wtbox/*") == ""


def test_hostile_names_that_must_be_refused(make_repo, run_wtbox):
    repo = make_repo(toml=CORE_TOML)
    for task in ["", "-rf", "x" * 300, "💥"]:
        proc = run_wtbox("new", "--repo", str(repo), "--", task, check=False)
        assert proc.returncode == 2, (task, proc.stderr)


def _one_error(proc, code):
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wtbox: ") and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_bad_repos_and_config(tmp_path, make_repo, run_wtbox, wtbox_home):
    _one_error(run_wtbox("new", "t", "--repo", str(tmp_path / "missing"), check=False), 2)
    plain = tmp_path / "plain"
    plain.mkdir()
    _one_error(run_wtbox("new", "t", "--repo", str(plain), check=False), 2)
    bare = tmp_path / "bare.git"
    subprocess.run(["git", "init", "-q", "--bare", str(bare)], check=True)
    assert "bare" in _one_error(run_wtbox("new", "t", "--repo", str(bare), check=False), 2)
    empty = tmp_path / "empty"
    subprocess.run(["git", "init", "-q", str(empty)], check=True)
    assert "no commits" in _one_error(run_wtbox("new", "t", "--repo", str(empty), check=False), 2)
    broken = make_repo(toml="[box\nports = [")
    msg = _one_error(run_wtbox("new", "t", "--repo", str(broken), check=False), 2)
    assert "wtbox.toml" in msg
    wrong_type = make_repo(toml=CORE_TOML + "\n[box]\nports = 5\n")
    msg = _one_error(run_wtbox("new", "t", "--repo", str(wrong_type), check=False), 2)
    assert "[box] ports" in msg
    bad_tpl = make_repo(toml=CORE_TOML + '\n[box]\nenv = { X = "{{ ports.nope }}" }\n')
    msg = _one_error(run_wtbox("new", "t", "--repo", str(bad_tpl), check=False), 2)
    assert "env.X" in msg
    _one_error(run_wtbox("new", "t", "--repo", str(bad_tpl), "--from", "no-such-ref", check=False), 2)
    _one_error(run_wtbox("status", "nope", check=False), 2)
    _one_error(run_wtbox("rm", "nope", check=False), 2)
    # nothing half-made anywhere
    assert json.loads(run_wtbox("ls", "--json").stdout) == []
    assert not (wtbox_home / "boxes").exists() or not any((wtbox_home / "boxes").iterdir())
    for repo in (broken, wrong_type, bad_tpl):
        assert git(repo, "branch", "--list", "wtbox/*") == ""


def test_box_resolution(make_repo, run_wtbox):
    repo = make_repo(toml=CORE_TOML)
    a = json.loads(run_wtbox("new", "alpha", "--repo", str(repo), "--json").stdout)
    b = json.loads(run_wtbox("new", "beta", "--repo", str(repo), "--json").stdout)
    get = lambda ref, **kw: json.loads(run_wtbox("status", *([ref] if ref else []), "--json", **kw).stdout)["id"]
    assert get(a["id"]) == a["id"]
    assert get(a["id"][:4]) == a["id"]          # unique prefix
    assert get("beta") == b["id"]               # task name
    sub = Path(b["path"]) / "deep"
    sub.mkdir()
    assert get(None, cwd=sub) == b["id"]        # cwd inside the box
    proc = run_wtbox("status", "--json", cwd=repo, check=False)
    assert proc.returncode == 2
    proc = run_wtbox("new", "alpha", "--repo", str(repo), "--json", check=False)  # a task name is one box's
    assert proc.returncode == 1 and f"A box named 'alpha' already exists ({a['id']})" in proc.stderr
    assert get("alpha") == a["id"]


def test_an_exact_task_name_wins_over_an_id_prefix(make_repo, host):
    """`status s7` while `s70-...` exists: the box whose task is s7, not an ambiguity (issue 27)."""
    repo = make_repo(toml=CORE_TOML)
    s7 = host.new("s7", repo=repo)
    s70 = host.new("s70", repo=repo)
    assert host.get("s7").id == s7.id
    assert host.get("s70").id == s70.id
    host.new("s71", repo=repo)
    with pytest.raises(UsageError, match=r"'s' matches 3 boxes"):  # no exact name, several ids: refused
        host.get("s")
    from worktreebox.registry import TaskTaken

    with pytest.raises(TaskTaken):  # a second box named s7 is refused when made (main's rule since)
        host.new("s7", repo=repo)
    assert host.get("s7").id == s7.id


def test_repo_defaults_to_cwd_and_from_ref(make_repo, run_wtbox):
    repo = make_repo(toml=CORE_TOML)
    first = git(repo, "rev-parse", "HEAD").strip()
    (repo / "second.txt").write_text("2")
    git(repo, "add", "second.txt")
    git(repo, "commit", "-qm", "second")
    box = json.loads(run_wtbox("new", "cwd", "--json", cwd=repo / ".").stdout)
    assert (Path(box["path"]) / "second.txt").exists()
    old = json.loads(run_wtbox("new", "old", "--from", first, "--json", cwd=repo).stdout)
    assert not (Path(old["path"]) / "second.txt").exists()
    # a box made from an old commit holds no unsaved work: rm needs no --force
    run_wtbox("rm", old["id"], box["id"])


def test_box_vanished_underneath(host, make_repo, run_wtbox):
    import shutil

    from worktreebox.providers.mounts.base import unmount_all

    box = host.new("vanish", repo=make_repo(toml=CORE_TOML))
    unmount_all(box.dir)  # a copy-on-write worktree is a mount: the dir can only vanish once it is gone (reboot)
    shutil.rmtree(box.dir)
    status = json.loads(run_wtbox("status", box.id, "--json").stdout)
    assert "problem" in status
    proc = run_wtbox("exec", box.id, "--", "true", check=False)
    assert proc.returncode == 1 and "gone" in proc.stderr
    run_wtbox("rm", box.id)
    assert host.list() == []
    assert git(Path(box.repo), "branch", "--list", "wtbox/*") == ""


def test_init_and_doctor(tmp_path, run_wtbox):
    run_wtbox("init", "--repo", str(tmp_path))
    text = (tmp_path / "wtbox.toml").read_text()
    import tomllib

    tomllib.loads(text)  # the starter parses
    assert "[box]" in text
    proc = run_wtbox("init", "--repo", str(tmp_path), check=False)
    assert proc.returncode == 2
    doc = json.loads(run_wtbox("doctor", "--json", check=False).stdout)
    names = {c["check"] for c in doc["checks"]}
    assert {"git", "postgres", "victoria-metrics", "port range", "disk"} <= names


def test_rm_all_without_yes_and_no_tty_refuses(host, make_repo, run_wtbox):
    host.new("x", repo=make_repo(toml=CORE_TOML))
    proc = run_wtbox("rm", "--all", check=False, input="")
    assert proc.returncode == 2
    assert len(host.list()) == 1
