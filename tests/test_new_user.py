"""What a new user hits first (issue 31): exit codes, Ctrl-C, a broken WTBOX_HOME, task names, state
that lies. The real CLI in a subprocess, real boxes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import CORE_TOML, wait_for


def spawn(args: list[str], home, cwd=None) -> subprocess.Popen:
    env = {**os.environ, "WTBOX_HOME": str(home), "WTBOX_NO_AUTO_GC": "1"}
    return subprocess.Popen([sys.executable, "-m", "worktreebox.cli.main", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)


@pytest.mark.parametrize("args", [["top", "--watch"], ["logs", "{box}", "-f"]])
def test_ctrl_c_ends_watching_commands_with_130(make_repo, run_wtbox, wtbox_home, args):
    """Defect 15: `top --watch` and `logs -f` exited 0 on Ctrl-C; the README promises 130."""
    repo = make_repo(toml=CORE_TOML)
    box = json.loads(run_wtbox("new", "watch", "--json", cwd=repo).stdout)["id"]
    p = spawn([a.format(box=box) for a in args], wtbox_home)
    time.sleep(1.5)  # past its imports, into its loop
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 130 and "Traceback" not in err, err


def test_ctrl_c_while_wtbox_is_loading_prints_no_traceback(wtbox_home):
    """Defect 14: Ctrl-C in the first 50 ms of any command printed a KeyboardInterrupt traceback from the
    launcher's imports. Signals land at a spread of moments; none may show a frame of wtbox's code (what
    is left, Python's own start-up before wtbox's first line, is outside it)."""
    from pathlib import Path

    import worktreebox

    script = Path(sys.executable).with_name("wtbox")
    if not script.exists():
        pytest.skip("no installed wtbox console script")
    package = str(Path(worktreebox.__file__).parent)
    env = {**os.environ, "WTBOX_HOME": str(wtbox_home), "WTBOX_NO_SERVER": "1", "WTBOX_NO_AUTO_GC": "1"}
    interrupted = 0
    for i in range(24):
        p = subprocess.Popen([str(script), "ls"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        time.sleep(0.01 + i * 0.008)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=30)
        frames = [line for line in err.splitlines() if line.strip().startswith('File "')]
        assert not any(package in f for f in frames), err
        interrupted += p.returncode == 130 and err.strip() == "wtbox: interrupted."
    assert interrupted, "no signal landed while wtbox was loading"


def test_fanout_exits_1_when_a_check_fails_and_probe_when_requests_fail(make_repo, run_wtbox):
    """Defect 7: `fanout` exited 0 when a --check failed; `probe` exited 0 with errors."""
    repo = make_repo(toml=CORE_TOML)
    ok = run_wtbox("fanout", "fo", "-n", "1", "--check", "true", "--json", cwd=repo, check=False)
    assert ok.returncode == 0, ok.stderr
    bad = run_wtbox("fanout", "fb", "-n", "2", "--check", "test $WTBOX_ID != nothing && false", "--json", cwd=repo,
                    check=False)
    rows = json.loads(bad.stdout)
    assert bad.returncode == 1 and len(rows) == 2 and "failed" in bad.stderr and "Traceback" not in bad.stderr
    web = make_repo(toml=CORE_TOML + f"""
[services.web]
cmd = "{sys.executable} -m http.server {{{{ ports.web }}}} --bind 127.0.0.1"
ready = "tcp:{{{{ ports.web }}}}"
""")
    box = json.loads(run_wtbox("new", "web", "--json", cwd=web).stdout)["id"]
    assert run_wtbox("probe", box, "/", "-n", "3", check=False).returncode == 0
    probe = run_wtbox("probe", box, "/missing", "-n", "3", "--json", check=False)  # 404s
    assert probe.returncode == 1 and json.loads(probe.stdout)["errors"] == 3 and "3 of 3" in probe.stderr


def test_five_concurrent_new_of_one_name_make_one_box(make_repo, wtbox_home, run_wtbox):
    """Defect 8: five concurrent `new same` made five boxes named `same`; `status same` was then refused."""
    repo = make_repo(toml=CORE_TOML)
    procs = [spawn(["new", "same", "--json"], wtbox_home, cwd=repo) for _ in range(5)]
    results = [(p.wait(timeout=120), p.stdout.read(), p.stderr.read()) for p in procs]
    made = [json.loads(out)["id"] for code, out, _ in results if code == 0]
    refused = [err for code, _, err in results if code != 0]
    assert len(made) == 1, results
    assert len(refused) == 4 and all(err.startswith("wtbox: A box named 'same' already exists") for err in refused)
    assert json.loads(run_wtbox("status", "same", "--json").stdout)["id"] == made[0]
    assert [b["id"] for b in json.loads(run_wtbox("ls", "--json").stdout)] == made


@pytest.mark.parametrize(("task", "slug"), [("日本", "riben"), ("ünïcödé-ταsk-日本", "unicode-task-riben")])
def test_a_task_name_in_any_script_makes_a_box(make_repo, run_wtbox, task, slug):
    """Defect 8: `日本` was refused as having "no letters or digits"; `ünïcödé-ταsk-日本` became `unicode-sk`."""
    repo = make_repo(toml=CORE_TOML)
    box = json.loads(run_wtbox("new", task, "--json", cwd=repo).stdout)
    assert box["id"].rsplit("-", 1)[0] == slug and box["task"] == task
    assert json.loads(run_wtbox("status", task, "--json").stdout)["id"] == box["id"]


def _web_repo(make_repo):
    return make_repo(toml=CORE_TOML + f"""
[services.web]
cmd = "{sys.executable} -m http.server {{{{ ports.web }}}} --bind 127.0.0.1"
ready = "tcp:{{{{ ports.web }}}}"
""")


def test_a_killed_supervisor_shows_in_ls_and_status_with_its_reason(make_repo, run_wtbox):
    """Defect 9: after `kill -9` of a supervisor, `ls` said ready until a command touched the box; plain
    `status` said "(degraded)" with no reason and "web: stopped pid=None" while the service answered."""
    from pathlib import Path

    box = json.loads(run_wtbox("new", "sup", "--json", cwd=_web_repo(make_repo)).stdout)
    supervisor = int((Path(box["dir"]) / "run" / "supervisor.pid").read_text().split()[0])
    os.kill(supervisor, signal.SIGKILL)
    wait_for(lambda: not os.path.exists(f"/proc/{supervisor}"))
    listed = json.loads(run_wtbox("ls", "--json").stdout)[0]
    assert listed["state"] == "degraded" and "supervisor died" in listed["reason"]
    assert "degraded" in run_wtbox("ls").stdout
    status = run_wtbox("status", box["id"]).stdout
    assert "supervisor died" in status and f"wtbox up {box['id']}" in status
    web = next(line for line in status.splitlines() if line.startswith("service  web"))
    assert "pid=None" not in web and "unsupervised" in web, status
    run_wtbox("up", box["id"])
    assert json.loads(run_wtbox("ls", "--json").stdout)[0]["state"] == "ready"


def test_a_box_whose_directory_was_deleted_is_not_ready(make_repo, run_wtbox, wtbox_home):
    """Defect 10: a box whose directory was deleted still showed `ready` in `ls`/`status`."""
    import shutil
    from pathlib import Path

    from worktreebox.providers.mounts.base import unmount_all

    box = json.loads(run_wtbox("new", "gone", "--json", cwd=make_repo(toml=CORE_TOML)).stdout)
    unmount_all(Path(box["dir"]))
    shutil.rmtree(box["dir"])
    listed = json.loads(run_wtbox("ls", "--json").stdout)[0]
    assert listed["state"] == "degraded" and "is gone" in listed["reason"]
    assert "is gone" in run_wtbox("status", box["id"]).stdout
    run_wtbox("rm", box["id"])
    assert json.loads(run_wtbox("ls", "--json").stdout) == []


def test_a_drained_pool_stays_empty_when_wtbox_toml_asks_for_none(make_repo, run_wtbox, wtbox_home):
    """Defect 11: after `pool --drain`, a `new --no-pool` restarted the filler and refilled the pool although
    wtbox.toml has no [pool] (the `--size` given earlier was still recorded)."""
    repo = make_repo(toml=CORE_TOML)
    run_wtbox("pool", str(repo), "--size", "1", "--wait", "60")
    assert json.loads(run_wtbox("pool", "--status", "--json").stdout)["pools"][0]["ready"] == 1
    run_wtbox("pool", str(repo), "--drain")
    run_wtbox("new", "after", "--no-pool", cwd=repo)
    run_wtbox("new", "later", cwd=repo)
    time.sleep(2)  # a filler started now would be making a box by then
    pools = json.loads(run_wtbox("pool", "--status", "--json").stdout)["pools"]
    assert all(p["ready"] == 0 and p["filling"] == 0 and not p["filler"] for p in pools), pools
    assert sorted(b["task"] for b in json.loads(run_wtbox("ls", "--all", "--json").stdout)) == ["after", "later"]


def test_rm_of_a_box_being_made_is_refused_in_one_sentence_and_new_is_unharmed(make_repo, run_wtbox, wtbox_home):
    """Defect 12: `rm` during `new` printed "Removing ... was incomplete (database: role ... does not exist);
    run 'wtbox rm ...' again" though the end state was clean, and `new` said "the supervisor exited"."""
    repo = _web_repo(make_repo)
    env = {**os.environ, "WTBOX_HOME": str(wtbox_home), "WTBOX_NO_AUTO_GC": "1",
           "WTBOX_PHASE_STOP": "new:start:services"}
    p = subprocess.Popen([sys.executable, "-m", "worktreebox.cli.main", "new", "busy", "--json"], cwd=repo, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: json.loads(run_wtbox("ls", "--json").stdout), timeout=60)
        for args in (["rm", "busy"], ["rm", "--force", "busy"]):
            proc = run_wtbox(*args, check=False)
            assert proc.returncode == 1 and "is still being made" in proc.stderr and "incomplete" not in proc.stderr
            assert len(proc.stderr.strip().splitlines()) == 1
        assert json.loads(run_wtbox("ls", "--json").stdout)[0]["state"] == "creating"
    finally:
        p.send_signal(signal.SIGINT)  # its own rollback removes the half-made box
        _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and "half-made box was removed" in err
    assert json.loads(run_wtbox("ls", "--json").stdout) == []


@pytest.mark.parametrize("command", [["ls"], ["new", "x"], ["status", "x"], ["gc"], ["doctor"]])
def test_a_broken_home_is_one_sentence(make_repo, tmp_path, command):
    """Defect 13: WTBOX_HOME at a regular file gave a NotADirectoryError traceback ("internal error"), a
    corrupt registry.sqlite3 "internal error: DatabaseError"; each deserves one sentence that says what to do.
    (A home whose parent is missing is made, parents and all.)"""
    repo = make_repo(toml=CORE_TOML)
    afile = tmp_path / "afile"
    afile.write_text("not a home\n")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "registry.sqlite3").write_text("garbage, not SQLite\n")
    for home, code, words in ((afile, 2, "is a file, not a directory"), (corrupt, 1, "not a readable SQLite")):
        env = {**os.environ, "WTBOX_HOME": str(home), "WTBOX_NO_AUTO_GC": "1"}
        proc = subprocess.run([sys.executable, "-m", "worktreebox.cli.main", *command], cwd=repo, env=env,
                              capture_output=True, text=True, timeout=120)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == code and len(lines) == 1 and words in lines[0], (home, proc.stderr)
        assert "internal error" not in proc.stderr and "Traceback" not in proc.stderr
    assert (corrupt / "registry.sqlite3").read_text() == "garbage, not SQLite\n"  # never "repaired" away
