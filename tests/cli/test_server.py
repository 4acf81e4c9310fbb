"""The CLI server (cliserver.py) through the real launcher (the `wtbox` script): a served command
behaves as the same command run in process, and a stale, dead or foreign server never makes a
command fail."""
from __future__ import annotations

import json
import os
import pty
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from helpers import CORE_TOML, git, wait_for
from sandbox_helpers import needs_sandbox_tools

from worktreebox.cli import protocol as cliproto
from worktreebox.system import cgroups

pytestmark = pytest.mark.slow  # a real CLI server per test, and boxes

WTBOX = Path(sys.executable).with_name("wtbox")
LAUNCHER = [str(WTBOX)] if WTBOX.exists() else [sys.executable, "-m", "worktreebox.cli.launcher"]


class Served:
    """A home with a CLI server the test started (and stops), and the real `wtbox` to call."""

    def __init__(self, home: Path) -> None:
        self.home = home
        (home / "boxes").mkdir(parents=True, exist_ok=True)  # a home in use (a server leaves a gone one)
        self.env = {**os.environ, "WTBOX_HOME": str(home), "WTBOX_NO_AUTO_GC": "1", "WTBOX_SERVER_IDLE": "30"}
        self.env.pop("WTBOX_NO_SERVER", None)
        self.server: subprocess.Popen | None = None

    def start(self, **env: str) -> subprocess.Popen:
        self.server = subprocess.Popen([sys.executable, "-P", "-m", "worktreebox.cli.server", str(self.home)],
                                       env={**self.env, **env}, stdin=subprocess.DEVNULL,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        assert wait_for(lambda: self.status() or self.server.poll() is not None, timeout=30, every=0.05)
        assert self.status()["pid"] == self.server.pid
        return self.server

    def status(self) -> dict | None:
        return cliproto.ask(str(self.home), "status")

    def served(self) -> int:
        st = self.status()
        return st["served"] if st else -1

    def run(self, *args: str, served: bool = True, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
        full = {**self.env, **(env or {})}
        if not served:
            full["WTBOX_NO_SERVER"] = "1"
        return subprocess.run([*LAUNCHER, *args], capture_output=True, text=True, env=full, timeout=120, **kw)

    def popen(self, *args: str, env: dict | None = None) -> subprocess.Popen:
        return subprocess.Popen([*LAUNCHER, *args], env={**self.env, **(env or {})}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def log(self) -> str:
        p = Path(cliproto.log_path(str(self.home)))
        return p.read_text() if p.exists() else ""

    def close(self) -> None:
        # any server of this home, also one a launcher started after an in-process fallback
        st = self.status()
        if st:
            cliproto.ask(str(self.home), "stop")
            wait_for(lambda: not psutil.pid_exists(st["pid"]) or psutil.Process(st["pid"]).status() == "zombie",
                     timeout=10, every=0.05)
        if self.server is not None and self.server.poll() is None:
            self.server.kill()
        if self.server is not None:
            self.server.wait(10)
        subprocess.run([*LAUNCHER, "rm", "--all", "--yes", "--force"], env={**self.env, "WTBOX_NO_SERVER": "1"},
                       capture_output=True)


@pytest.fixture
def srv(tmp_path):
    s = Served(tmp_path / "home")
    yield s
    s.close()


@pytest.fixture
def repo(make_repo):
    return make_repo({"src/app.py": "print('hi')\n"}, toml=CORE_TOML)


def _ages(text: str) -> str:
    """`ls` output with its AGE column (2s, 5m, ...) blanked."""
    import re

    return re.sub(r"(?m)(  )\d+[smhd](  )", r"\1<age>\2", text)


def _ids(text: str) -> str:
    """Output with box ids, ports and times replaced, for comparing two boxes' outputs."""
    import re

    text = re.sub(r"[a-z0-9-]+-[0-9a-f]{8}", "<id>", text)
    text = re.sub(r"\d{4}-\d\d-\d\dT[\d:.]+Z", "<time>", text)
    return re.sub(r"\b\d{4,5}\b", "<n>", text)


def _steady(obj):
    """A status document without what changes between two calls (use time, live accounting: a
    sandboxed box's supervisor runs between them)."""
    if isinstance(obj, dict):
        return {k: _steady(v) for k, v in obj.items()
                if k not in ("last_used_at", "pids") and not k.endswith(("_seconds", "_bytes"))}
    return [_steady(v) for v in obj] if isinstance(obj, list) else obj


def test_served_output_and_exit_codes_match_in_process(srv, repo):
    srv.start()
    before = srv.served()
    # A task name is one box's: the served box is removed before the same task is made in process.
    a = srv.run("new", "same", "--repo", str(repo), "--json")
    assert a.returncode == 0, a.stderr
    ja = json.loads(a.stdout)
    removed_served = srv.run("rm", ja["id"])
    b = srv.run("new", "same", "--repo", str(repo), "--json", served=False)
    assert b.returncode == 0, b.stderr
    jb = json.loads(b.stdout)
    idb = jb["id"]
    assert ja.pop("timings").keys() == jb.pop("timings").keys()
    assert ja.pop("url").startswith("http://web.same.localhost:") and jb.pop("url").startswith("http://web.same.")
    ja.pop("urls"), jb.pop("urls")
    assert _ids(json.dumps(_steady(ja))) == _ids(json.dumps(_steady(jb))) and _ids(a.stderr) == _ids(b.stderr)
    for args in (("ls", "--json"), ("ls",)):
        s, p = srv.run(*args), srv.run(*args, served=False)
        # the AGE column is read at each run: a second may pass between the two (0s, then 1s)
        assert (s.returncode, _ages(s.stdout), s.stderr) == (p.returncode, _ages(p.stdout), p.stderr), args
    s, p = srv.run("status", idb, "--json"), srv.run("status", idb, "--json", served=False)
    assert s.returncode == p.returncode == 0 and _steady(json.loads(s.stdout)) == _steady(json.loads(p.stdout))
    p = srv.run("rm", idb, served=False)
    assert removed_served.returncode == p.returncode == 0
    assert _ids(removed_served.stdout + removed_served.stderr) == _ids(p.stdout + p.stderr)
    assert srv.served() == before + 5  # each served call really went through the server
    assert json.loads(srv.run("ls", "--json").stdout) == []


def test_a_failing_command_gives_the_same_sentence_and_code(srv, repo):
    srv.start()
    for args in (("status", "no-such-box"), ("new",), ("rm", "no-such-box"),
                 ("new", "x", "--repo", str(repo / "nope"))):
        s, p = srv.run(*args), srv.run(*args, served=False)
        assert s.returncode == p.returncode != 0, args
        assert s.stderr == p.stderr and s.stderr.startswith("wtbox: ") and s.stderr.count("\n") == 1, s.stderr
        assert "Traceback" not in s.stderr
    assert srv.served() == 4


def test_stdin_reaches_the_served_command(srv, repo):
    """`rm --all` asks on the terminal: a pty as the launcher's stdin, 'y' typed into it."""
    srv.start()
    for t in ("one", "two"):
        assert srv.run("new", t, "--repo", str(repo)).returncode == 0
    master, slave = pty.openpty()
    code = ("import sys; from worktreebox.cli import launcher; "
            f"sys.exit(launcher.serve({str(srv.home)!r}, ['rm', '--all']))")
    p = subprocess.Popen([sys.executable, "-c", code], stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=srv.env, text=True)
    os.close(slave)
    os.write(master, b"y\n")
    _out, err = p.communicate(timeout=60)
    os.close(master)
    assert p.returncode == 0, err
    assert "Remove all 2 boxes?" in err and err.count("removed") == 2
    assert json.loads(srv.run("ls", "--json").stdout) == []


def _leftovers(home: Path, repo: Path) -> dict:
    boxes = home / "boxes"
    backend = cgroups.for_home(home)
    return {"dirs": sorted(p.name for p in boxes.iterdir()) if boxes.exists() else [],
            "branches": git(repo, "for-each-ref", "--format=%(refname:short)", "refs/heads/wtbox/").split(),
            "cgroups": sorted(backend.box_keys()) if backend is not None else []}


def _halted_new(srv: Served, repo: Path, tmp: Path, name: str, served: bool) -> subprocess.Popen:
    phase = tmp / f"phase-{name}"
    env = {"WTBOX_PHASE_FILE": str(phase), "WTBOX_PHASE_STOP": "new:create:worktree"}
    if not served:
        env["WTBOX_NO_SERVER"] = "1"
    p = srv.popen("new", name, "--repo", str(repo), env=env)
    if not wait_for(lambda: phase.exists() and "new:create:worktree" in phase.read_text(), timeout=60, every=0.05):
        p.kill()
        raise AssertionError(f"wtbox new {name} never reached new:create:worktree")
    return p


def test_ctrl_c_rolls_back_as_in_process(srv, repo, tmp_path):
    srv.start()
    results = []
    for served in (False, True):
        p = _halted_new(srv, repo, tmp_path, f"intr-{served}", served)
        p.send_signal(signal.SIGINT)
        try:
            _out, err = p.communicate(timeout=60)
        finally:
            p.kill()
        results.append((p.returncode, err.strip().splitlines()[-1], _leftovers(srv.home, repo)))
    nothing_left = {"dirs": [], "branches": [], "cgroups": []}
    assert results[0] == results[1] == (130, "wtbox: Interrupted; the half-made box was removed.", nothing_left)
    assert srv.served() == 1
    assert json.loads(srv.run("ls", "--json").stdout) == []


def _served_children(server: int) -> list[psutil.Process]:
    """The server's children that serve a command (not its supervisors' zygote)."""
    return [c for c in psutil.Process(server).children() if "worktreebox.services.zygote" not in " ".join(c.cmdline())]


def test_kill_9_of_the_launcher_kills_the_served_child(srv, repo, tmp_path):
    server = srv.start()
    p = _halted_new(srv, repo, tmp_path, "killed", served=True)
    try:
        [child] = _served_children(server.pid)
    finally:
        p.kill()
        p.wait()
    assert wait_for(lambda: not psutil.pid_exists(child.pid) or child.status() == psutil.STATUS_ZOMBIE, timeout=10)
    assert srv.run("gc", "--grace", "0").returncode == 0
    assert _leftovers(srv.home, repo) == {"dirs": [], "branches": [], "cgroups": []}
    assert json.loads(srv.run("ls", "--json").stdout) == []


@pytest.mark.serial  # it changes wtbox's code for every server and zygote running beside it
def test_changed_code_makes_the_server_refuse_and_exit(srv, repo):
    server = srv.start()
    target = Path(cliproto.__file__)
    st = target.stat()
    try:
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
        r = srv.run("ls", "--json")
        assert r.returncode == 0 and json.loads(r.stdout) == []  # ran in process
        assert server.wait(10) == 0
        assert "protocol.py changed" in srv.log()
        assert wait_for(srv.status, timeout=30, every=0.1)["served"] == 0  # a fresh one, started by the launcher
    finally:
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_idle_exit_and_home_gone(srv, tmp_path):
    server = srv.start(WTBOX_SERVER_IDLE="1")
    assert server.wait(10) == 0
    assert not Path(cliproto.socket_path(str(srv.home))).exists()
    server = srv.start()
    shutil.rmtree(srv.home)
    assert server.wait(10) == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another uid")
def test_another_uid_is_refused(srv):
    srv.start()
    sock = cliproto.socket_path(str(srv.home))
    os.chmod(os.path.dirname(sock), 0o711)
    os.chmod(sock, 0o777)
    # from inside run/ (0711) by a relative path: the test's tmp dirs above it are 0700
    code = ("import os, _socket; from worktreebox.cli import protocol as cliproto; os.setuid(65534); "
            "s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM); s.settimeout(5); s.connect('cli.sock'); "
            "\ntry: cliproto.send(s, {'op': 'status'}); print(s.recv(100))"
            "\nexcept (BrokenPipeError, ConnectionResetError): print(b'')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, env=srv.env,
                       cwd=os.path.dirname(sock))
    assert r.stdout.strip() == "b''", (r.stdout, r.stderr, srv.log())  # connected, and closed without an answer
    assert wait_for(lambda: "refused a connection from uid 65534" in srv.log(), timeout=5), srv.log()
    assert srv.status() is not None  # and still serves us


def test_rm_from_inside_the_box_spares_the_calling_shell(srv, repo):
    srv.start()
    box = json.loads(srv.run("new", "inside", "--repo", str(repo), "--json").stdout)
    served = srv.served()
    # a shell of the box (as `wtbox shell` makes it) that runs `wtbox rm` without the box's variables
    env = {**srv.env, "WTBOX_ID": box["id"], "WTBOX_BOX_DIR": box["dir"]}
    script = 'env -u WTBOX_ID -u WTBOX_BOX_DIR "$@"; echo "survived $?"'
    r = subprocess.run(["/bin/sh", "-c", script, "sh", *LAUNCHER, "rm", "--force", box["id"]], cwd=box["path"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.stdout.strip().endswith("survived 0"), (r.stdout, r.stderr)
    assert srv.served() == served + 1
    assert json.loads(srv.run("ls", "--json").stdout) == []


def test_the_command_sees_the_callers_cwd_and_environment(srv, repo):
    srv.start()
    sub = repo / "src"
    r = srv.run("new", "from-sub", "--json", cwd=sub, env={"WTBOX_PORT_RANGE": "23400-23499", "TZ": "UTC"})
    assert r.returncode == 0, r.stderr
    box = json.loads(r.stdout)
    assert box["repo"] == str(repo)
    assert all(23400 <= p <= 23499 for p in box["ports"].values()), box["ports"]
    assert srv.served() == 1
    assert "WTBOX_PORT_RANGE" not in psutil.Process(srv.server.pid).environ()


def test_server_status_and_stop(srv):
    r = srv.run("server", "status", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["running"] is False
    server = srv.start()
    st = json.loads(srv.run("server", "status", "--json").stdout)
    assert st["running"] is True and st["pid"] == server.pid and st["home"] == str(srv.home)
    r = srv.run("server", "stop")
    assert r.returncode == 0 and f"pid {server.pid}" in r.stderr
    assert server.wait(10) == 0
    assert json.loads(srv.run("server", "status", "--json").stdout)["running"] is False


def test_no_server_answering_starts_one(srv):
    """A served command with nobody listening runs in process and leaves a server for the next."""
    Path(cliproto.run_dir(str(srv.home))).mkdir(mode=0o700)
    Path(cliproto.socket_path(str(srv.home))).touch()  # a stale socket file
    r = srv.run("ls")
    assert r.returncode == 0 and "no boxes" in r.stdout + r.stderr
    assert wait_for(srv.status, timeout=30, every=0.1)
    assert srv.run("ls").returncode == 0 and srv.served() == 1


def test_a_request_from_another_install_is_refused(srv, tmp_path):
    srv.start()
    sock = cliproto.connect(str(srv.home), 5)
    with open(os.devnull) as null:
        fds = [null.fileno()] * 3 + [os.open(str(tmp_path), os.O_RDONLY)]
        cliproto.send(sock, {"op": "run", "argv": ["ls"], "env": {}, "umask": 0o22, "cwd": str(tmp_path), "pid": 1,
                             "install": ["/other/python", "/other/worktreebox"]}, fds)
        os.close(fds[3])
    assert cliproto.recv(sock)[0] == {"refused": "another wtbox install"}
    sock.close()
    assert srv.status()["served"] == 0


def test_the_launcher_imports_nothing_heavy():
    code = "import sys, worktreebox.cli.launcher; print(' '.join(sorted(sys.modules)))"
    mods = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split())
    assert not mods & {"click", "worktreebox.cli.main", "worktreebox.host", "psycopg", "pathlib", "socket",
                       "subprocess", "typing"}  # typing: ~3-5 ms of every command (procfs imported it again)


def test_a_served_child_killed_mid_command_is_one_sentence(srv, repo, tmp_path):
    server = srv.start()
    p = _halted_new(srv, repo, tmp_path, "child-killed", served=True)
    try:
        [child] = _served_children(server.pid)
        child.kill()
        _out, err = p.communicate(timeout=30)
    finally:
        p.kill()
    assert p.returncode == 1 and err.startswith("wtbox: the command ended without an exit status") \
        and err.count("\n") == 1, err
    assert srv.run("gc", "--grace", "0").returncode == 0
    assert _leftovers(srv.home, repo) == {"dirs": [], "branches": [], "cgroups": []}


def test_a_caller_inside_a_box_runs_in_process_and_starts_no_server(srv):
    """With WTBOX_ID set (a box's shell, service or exec) the command is not served, and no server is
    started from there: it would live in that box's cgroup and die with the box."""
    srv.start()
    r = srv.run("ls", env={"WTBOX_ID": "somebox-0000cafe"})
    assert r.returncode == 0 and srv.served() == 0
    assert srv.run("ls").returncode == 0 and srv.served() == 1  # the same call from outside is served
    srv.close()
    srv.server = None
    assert srv.run("ls", env={"WTBOX_ID": "somebox-0000cafe"}).returncode == 0
    time.sleep(1.0)  # a server started by that call would answer by now
    assert srv.status() is None


def test_a_home_deeper_than_sun_path_is_served(tmp_path):
    """The socket path's length is no reason to run in process: unixsock reaches it through its directory."""
    deep = Served(tmp_path / ("deep" * 20) / "home")
    assert len(cliproto.socket_path(str(deep.home)).encode()) > 108
    try:
        deep.start()
        r = deep.run("ls")
        assert r.returncode == 0 and deep.served() == 1, r.stderr
    finally:
        deep.close()


@needs_sandbox_tools()
@pytest.mark.skipif(os.geteuid() != 0, reason="spare sandboxes are made in root mode only")
def test_a_served_new_answers_before_it_asks_for_the_next_spare(srv, repo):
    """Asking for the next spare sandbox (a fork of the zygote, some files) is for the next `new`: a
    served `new` does it after its caller has the answer, with the caller's pipes let go, and what
    goes wrong there is said in the server's log. Asking is made to fail here (the home's spares
    dir is a file), so its warning shows where and when it ran."""
    (srv.home / "spares").write_text("")
    env = {"WTBOX_SANDBOX_SPARES": "1", "WTBOX_SANDBOX": "namespaces"}
    in_process = srv.run("new", "a", "--repo", str(repo), served=False, env=env)
    assert in_process.returncode == 0 and "No spare sandbox was asked for" in in_process.stderr
    srv.start()
    served = srv.run("new", "b", "--repo", str(repo), env=env)
    assert served.returncode == 0, served.stderr
    assert "No spare sandbox" not in served.stderr and srv.served() >= 1
    assert wait_for(lambda: "No spare sandbox was asked for" in srv.log(), timeout=10)
