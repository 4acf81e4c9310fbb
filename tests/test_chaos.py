"""Crash safety: kill -9 `wtbox new` / `wtbox rm` at random moments, then `wtbox gc --grace 0`
must leave nothing of any box except the ones that are fully alive and listed by `wtbox ls`.

Runs with every resource this machine has: a PostgreSQL database per box (the default mode;
own embedded cluster), a service under the supervisor, a VictoriaMetrics per box, a Redis per
box ([backing.redis], with its output keeper), and the copy-on-write worktree of the host's
mount provider. A second test kills `new` while it builds a tree or a dependency layer.
"""
from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import chaos_rng, git, wait_for

from worktreebox.box import hex_of
from worktreebox.providers.backing.base import probe
from worktreebox.system import cgroups

pytestmark = pytest.mark.chaos

ITERATIONS = int(os.environ.get("WTBOX_CHAOS_ITERATIONS", "30"))
HAVE_PG = bool(shutil.which("pg_ctl") or list(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl")))
HAVE_VM = bool(shutil.which("victoria-metrics"))
HAVE_REDIS = bool(shutil.which("redis-server"))  # a backing service per box ([backing.redis])

SERVICE = '''
import http.server, os
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
'''


def _toml() -> str:
    parts = ['[box]\nports = ["web"]\n',
             # the default database mode (a database per box); without PostgreSQL, none
             "" if HAVE_PG else '[database]\nmode = "none"\n',
             f"[observability]\nenabled = {'true' if HAVE_VM else 'false'}\n",
             f'[services.web]\ncmd = "{sys.executable} server.py"\nready = "tcp:{{{{ ports.web }}}}"\n',
             '[backing.redis]\nimage = "redis:7"\n' if HAVE_REDIS else ""]
    return "\n".join(parts)


@pytest.fixture
def outside():
    """A dir for homes that run their own embedded PostgreSQL, outside pytest's basetemp.

    A pytest session started beside this one (another engineer's, or any `pytest` run without
    scripts/test.sh's --basetemp) chmods /tmp/pytest-of-<user> back to 0700 and prunes all but its
    three newest numbered dirs. The cluster runs as an unprivileged user; closing the path to its
    data dir under it is a PANIC at its next checkpoint ("could not open file
    .../global/pg_control: Permission denied"): the `rm` that follows fails and gc cannot reach
    the server. That is why this test failed after test_database.py, test_embedded_pg.py and
    test_gc.py and passed alone: their minutes gave such a session time to start. (The session
    cluster of pg_fixtures.py and test_embedded_pg.py live outside it for the same reason.)"""
    import tempfile

    from worktreebox.providers.mounts.base import unmount_all
    from worktreebox.providers.postgres.embedded import EmbeddedCluster

    out = Path(tempfile.mkdtemp(prefix="wtbox-chaos-"))
    yield out
    for pid_file in out.glob("*/postgres/postmaster.pid"):  # a test that failed before its `db stop`
        EmbeddedCluster(pid_file.parent.parent).stop()
    unmount_all(out)
    shutil.rmtree(out, ignore_errors=True)


def _answers(port: int) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
            return r.status == 200 and r.read() == b"ok"
    except OSError:
        return False


class Chaos:
    def __init__(self, home: Path, repo: Path, tmp: Path, *, database: bool = HAVE_PG) -> None:
        self.home, self.repo, self.tmp, self.database = home, repo, tmp, database
        self.env = {**os.environ, "WTBOX_HOME": str(home), "WTBOX_NO_AUTO_GC": "1"}
        self.env.pop("WTBOX_POSTGRES_URL", None)  # its own embedded cluster: every wt_* in it is ours

    def wtbox(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-m", "worktreebox.cli.main", *args], capture_output=True, text=True,
                              env=self.env, timeout=180)
        if check and proc.returncode != 0:
            raise AssertionError(f"wtbox {' '.join(args)}: {proc.returncode}\n{proc.stderr}")
        return proc

    def spawn(self, *args: str) -> tuple[subprocess.Popen, Path]:
        phase_file = self.tmp / f"phase-{time.monotonic_ns()}"
        env = {**self.env, "WTBOX_PHASE_FILE": str(phase_file)}
        p = subprocess.Popen([sys.executable, "-m", "worktreebox.cli.main", *args], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env=env)
        return p, phase_file

    def timed(self, *args: str) -> float:
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "worktreebox.cli.main", *args], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, env=self.env, timeout=120)
        assert proc.returncode == 0, (args, proc.stderr)
        return time.monotonic() - t0

    def live(self) -> list[dict]:
        return json.loads(self.wtbox("ls", "--json").stdout)

    def check_alive_boxes(self, expect_degraded: set[str] = frozenset()) -> None:
        """Every listed box works: its worktree exists and its service answers; a degraded one
        (its supervisor died) says why and comes back with `up`, on the same port."""
        for b in self.live():
            assert Path(b["path"]).is_dir(), b
            if b["id"] in expect_degraded or b["state"] == "degraded":
                assert b["state"] == "degraded" and "supervisor" in b.get("reason", ""), b
                if not _sandboxed(b):  # (a sandboxed box is reached through its supervisor's forwards)
                    assert _answers(b["ports"]["web"]), b  # unsupervised, but not hung
                self.wtbox("up", b["id"])
                b = next(x for x in self.live() if x["id"] == b["id"])
            assert b["state"] == "ready", b
            assert _answers(b["ports"]["web"]), b
            if HAVE_REDIS:
                assert probe("redis", b["ports"]["redis"]), b

    # ------------------------------------------------------------ what exists
    def leftovers(self, alive: set[str]) -> dict[str, set]:
        """What is left of boxes that are not `alive`: a live box's own spare name (the holder it took
        keeps it) and the spares gc keeps for the next `new` (made, or being made) are not left over."""
        from worktreebox.providers.sandbox import spares

        kept = spares.kept(self.home)
        found = self._found({*alive, *kept, *(f"{spares.PREFIX}{hex_of(i)}" for i in alive)})
        kept |= spares.kept(self.home)  # (one a maker finished meanwhile)
        return {k: {x for x in v if x not in kept and not (k == "cgroups" and f"{spares.PREFIX}{x}" in kept)}
                for k, v in found.items()}

    def _found(self, alive: set[str]) -> dict[str, set]:
        from worktreebox.box import pg_name
        from worktreebox.registry import Registry

        boxes_dir = self.home / "boxes"
        found: dict[str, set] = {}
        found["dirs"] = {p.name for p in boxes_dir.iterdir()} if boxes_dir.exists() else set()
        found["branches"] = {b.strip().removeprefix("wtbox/") for b in
                             git(self.repo, "for-each-ref", "--format=%(refname:short)", "refs/heads/wtbox/").split()}
        found["worktrees"] = {Path(line.split()[1]).parent.name for line in
                              git(self.repo, "worktree", "list", "--porcelain").splitlines()
                              if line.startswith("worktree ") and str(boxes_dir) in line}
        found["processes"] = set()
        found["vm_processes"] = set()
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            env = dict(e.decode(errors="replace").split("=", 1) for e in environ if b"=" in e)
            # every process of a box carries WTBOX_ID and WTBOX_BOX_DIR (which tells this home's from others')
            if env.get("WTBOX_ID") and env.get("WTBOX_BOX_DIR", "").startswith(str(boxes_dir)):
                found["processes"].add(env["WTBOX_ID"])
                if b"victoria-metrics" in cmd:
                    found["vm_processes"].add(env["WTBOX_ID"])
        # box cgroups of this home, empty or not (every hierarchy: a kill can fall between two mkdirs)
        backend = cgroups.for_home(self.home)
        alive_hex = {hex_of(i) for i in alive}
        found["cgroups"] = {k for k in backend.box_keys() if k not in alive_hex} if backend is not None else set()
        reg = Registry(self.home / "registry.sqlite3")
        found["leases"] = {o for o in reg.lease_owners() if not o.startswith("@")}
        found["rows"] = reg.select_box_ids()
        reg.close()
        found["metrics_dirs"] = {p.parent.name for p in boxes_dir.glob("*/metrics")} if boxes_dir.exists() else set()
        found["backing_dirs"] = {p.parent.name for p in boxes_dir.glob("*/backing")} if boxes_dir.exists() else set()
        found["mounts"] = _mounts_of(self.home, alive)
        found["half_built"] = _half_built(self.home)
        if self.database:
            names = self.pg_names()
            alive_pg = {pg_name(i) for i in alive}
            found["pg_objects"] = {n for n in names if n not in alive_pg}
        return {k: {x for x in v if x not in alive} if k != "pg_objects" else v for k, v in found.items()}

    def pg_names(self) -> set[str]:
        from worktreebox.host import Host
        from worktreebox.providers import postgres

        saved = os.environ.pop("WTBOX_POSTGRES_URL", None)
        try:
            srv = postgres.server(Host(self.home))
            with srv.session(srv.shared_db) as conn:
                rows = conn.execute(
                    "SELECT rolname FROM pg_roles WHERE rolname LIKE 'wt\\_%' "
                    "UNION SELECT nspname FROM pg_namespace WHERE nspname LIKE 'wt\\_%' "
                    "UNION SELECT datname FROM pg_database"
                    " WHERE datname LIKE 'wt\\_%' AND datname NOT LIKE 'wt_golden%'"
                    " AND datname NOT LIKE 'wt_spare%'"  # spares are the host's, made ahead for the next box
                ).fetchall()
            return {r[0] for r in rows}
        finally:
            if saved is not None:
                os.environ["WTBOX_POSTGRES_URL"] = saved


def _sandboxed(box: dict) -> bool:
    return (Path(box["dir"]) / "run" / "sandbox.json").exists()  # its holder's record


def _mounts_of(home: Path, alive: set[str]) -> set[str]:
    """Box ids (or the path, for anything else) of every mount under the home: boxes/ itself counts
    once no box is alive (it is a shared mount while sandboxed boxes live)."""
    from worktreebox.providers.mounts.base import mounts_under

    boxes = str(home / "boxes") + "/"
    return {m.target[len(boxes):].split("/", 1)[0] if m.target.startswith(boxes) else m.target
            for m in mounts_under(home) if not (alive and m.target == boxes.rstrip("/"))}


def _half_built(home: Path) -> set[str]:
    """Temp dirs of tree and layer builds (a finished build is renamed into place)."""
    return {f"{store}/{p.name}" for store in ("trees", "deps") if (home / store).is_dir()
            for p in (home / store).iterdir() if p.name.startswith(".tmp-")}


def test_kill_dash_nine_anywhere_then_gc_leaves_nothing(tmp_path, make_repo, outside):
    repo = make_repo({"server.py": SERVICE}, toml=_toml())
    home = outside / "home"
    chaos = Chaos(home, repo, tmp_path)
    # spare sandboxes on, as users have them: a `new` killed after it took one must leave what gc removes
    chaos.env["WTBOX_SANDBOX_SPARES"] = "1"
    rng = chaos_rng()
    if HAVE_PG:
        chaos.wtbox("db", "start")
    try:
        # calibrate: the usual (warm) run time of each command on this machine
        chaos.timed("new", "warmup", "--repo", str(repo))
        chaos.timed("rm", "warmup")
        new_time = chaos.timed("new", "calib", "--repo", str(repo))
        rm_time = chaos.timed("rm", "calib")
        phases: collections.Counter = collections.Counter()
        for i in range(ITERATIONS):
            live = chaos.live()
            if len(live) < 2 and rng.random() < 0.5:  # keep boxes around so that rm gets killed too
                made = json.loads(chaos.wtbox("new", f"alive-{i}", "--repo", str(repo), "--json").stdout)
                phases["new-from-a-spare" if (made.get("sandbox") or {}).get("spare") else "new"] += 1
                live = chaos.live()
            if live and rng.random() < 0.25:
                # the box's supervisor dies (kill -9) under a live box; its service must go on
                # answering, the box must be reported degraded, and `up` must bring it back
                victim = rng.choice(live)["id"]
                pid_file = home / "boxes" / victim / "run" / "supervisor.pid"
                if pid_file.exists():
                    os.kill(int(pid_file.read_text().split()[0]), signal.SIGKILL)
                phases["kill-supervisor"] += 1
                chaos.wtbox("gc", "--grace", "0")
                chaos.check_alive_boxes(expect_degraded={victim})
                continue
            if live and rng.random() < 0.45:
                victim = rng.choice(live)["id"]
                p, phase_file = chaos.spawn("rm", "--force", victim)
                usual, op = rm_time, "rm"
            else:
                p, phase_file = chaos.spawn("new", f"chaos-{i}", "--repo", str(repo))
                usual, op = new_time, "new"
            time.sleep(rng.uniform(0, usual))
            p.send_signal(signal.SIGKILL)
            p.wait()
            hit = phase_file.read_text().split()[-1] if phase_file.exists() and phase_file.read_text() else "start"
            phases[f"{op}@{hit}"] += 1
            chaos.wtbox("gc", "--grace", "0")
            alive = {b["id"] for b in chaos.live()}
            chaos.check_alive_boxes()
            left = chaos.leftovers(alive)
            assert not any(left.values()), (i, op, hit, {k: v for k, v in left.items() if v})
        print(f"\nchaos: {ITERATIONS} kills; by phase: {dict(sorted(phases.items()))}")
    finally:
        chaos.wtbox("rm", "--all", "--yes", "--force", check=False)
        chaos.wtbox("gc", "--grace", "0", "--spares", check=False)
        final = chaos._found(set())
        if HAVE_PG:
            chaos.wtbox("db", "stop", check=False)
    assert not any(final.values()), final


@pytest.mark.skipif(cgroups.for_home("/") is None, reason=f"no cgroups here: {cgroups.unavailable('/')}")
@pytest.mark.parametrize("stop_at", [
    "new:create:worktree",  # the box's cgroup exists, the registry row does not know of it yet
    "new:start:services",   # VictoriaMetrics runs inside the cgroup; the services are about to start
])
def test_kill_between_cgroup_creation_and_registry_write(tmp_path, make_repo, stop_at, outside):
    """A `new` killed right after it made the box's cgroup: gc leaves no cgroup (empty or not) behind."""
    repo = make_repo({"server.py": SERVICE}, toml=_toml())
    chaos = Chaos(outside / "home", repo, tmp_path)
    if HAVE_PG:
        chaos.wtbox("db", "start")
    try:
        chaos.env["WTBOX_PHASE_STOP"] = stop_at
        p, phase_file = chaos.spawn("new", "halted", "--repo", str(repo))
        chaos.env.pop("WTBOX_PHASE_STOP")
        assert wait_for(lambda: phase_file.exists() and stop_at in phase_file.read_text().split()[-1], timeout=60)
        backend = cgroups.for_home(chaos.home)
        [box_id] = backend.box_keys()
        if stop_at == "new:start:services":
            assert backend.pids(box_id)  # VictoriaMetrics, in the box's _metrics leaf
        p.send_signal(signal.SIGKILL)
        p.wait()
        chaos.wtbox("gc", "--grace", "0")
        left = chaos.leftovers(set())
        assert not any(left.values()), {k: v for k, v in left.items() if v}
        assert not any(d.exists() for d in backend.box_dirs(box_id))
    finally:
        chaos.wtbox("gc", "--grace", "0", check=False)
        if HAVE_PG:
            chaos.wtbox("db", "stop", check=False)


@pytest.mark.skipif(not HAVE_PG, reason="PostgreSQL is not installed")
def test_kill_dash_nine_during_the_first_cluster_start(outside):
    """initdb and the first start are the one host-level step of `new`; a kill there must not wedge the host."""
    rng = chaos_rng()
    env = {**os.environ, "WTBOX_NO_AUTO_GC": "1"}
    env.pop("WTBOX_POSTGRES_URL", None)
    for i in range(4):
        home = outside / f"home{i}"
        run_env = {**env, "WTBOX_HOME": str(home)}
        p = subprocess.Popen([sys.executable, "-m", "worktreebox.cli.main", "db", "start"], env=run_env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.05, 1.5))
        p.send_signal(signal.SIGKILL)
        p.wait()
        try:
            ok = subprocess.run([sys.executable, "-m", "worktreebox.cli.main", "db", "start", "--json"], env=run_env,
                                capture_output=True, text=True, timeout=120)
            assert ok.returncode == 0, ok.stderr
            assert json.loads(ok.stdout).get("running") is True, ok.stdout
        finally:
            subprocess.run([sys.executable, "-m", "worktreebox.cli.main", "db", "stop"], env=run_env,
                           capture_output=True)


LAYER_TOML = """
[database]
mode = "none"
[observability]
enabled = false
[deps]
detect = false
[deps.gen]
cmd = "sleep 0.4 && mkdir -p out && cat lock.txt > out/lock && sleep 0.4"
paths = ["out"]
lock = ["lock.txt"]
"""


def test_kill_dash_nine_during_tree_and_layer_builds(tmp_path, make_repo):
    """Every iteration needs a new tree (new commit) and a new layer (new lock), so the kills land in
    their builds, in the mounts and before the registry write. After `gc`: no stale mount, no half-built
    tree or layer, and the next box on the same commit gets a complete tree and layer."""
    files = {f"pkg{i % 20}/mod{i}.py": f"X = {i}\n" * 40 for i in range(1500)}
    repo = make_repo({**files, "lock.txt": "v0\n"}, toml=LAYER_TOML)
    home = tmp_path / "home"
    chaos = Chaos(home, repo, tmp_path, database=False)
    rng = chaos_rng()
    phases: collections.Counter = collections.Counter()
    for i in range(int(os.environ.get("WTBOX_CHAOS_LAYER_ITERATIONS", "6"))):
        (repo / "lock.txt").write_text(f"v{i + 1}\n")
        git(repo, "commit", "-qam", f"lock {i + 1}")
        first = chaos.timed("new", f"calib-{i}", "--repo", str(repo)) if i == 0 else None
        if first is not None:  # calibrate once on a cold tree and layer, then start over on a new commit
            usual = first
            chaos.wtbox("rm", "--force", f"calib-{i}")
            (repo / "lock.txt").write_text(f"v{i + 1}b\n")
            git(repo, "commit", "-qam", "again")
        p, phase_file = chaos.spawn("new", f"chaos-{i}", "--repo", str(repo))
        time.sleep(rng.uniform(0, usual))
        p.send_signal(signal.SIGKILL)
        p.wait()
        hit = phase_file.read_text().split()[-1] if phase_file.exists() and phase_file.read_text() else "start"
        phases[hit] += 1
        chaos.wtbox("gc", "--grace", "0")
        alive = {b["id"] for b in chaos.live()}
        left = chaos.leftovers(alive)
        assert not any(left.values()), (i, hit, {k: v for k, v in left.items() if v})
        # whatever the kill left, a box on this commit now gets a whole tree and a whole layer
        box = json.loads(chaos.wtbox("new", f"after-{i}", "--repo", str(repo), "--json").stdout)
        wt = Path(box["path"])
        assert git(wt, "status", "--porcelain") == ""
        assert (wt / "pkg3" / "mod1463.py").read_text() == "X = 1463\n" * 40
        assert (wt / "out" / "lock").read_text() == (repo / "lock.txt").read_text()
        chaos.wtbox("rm", "--all", "--yes", "--force")
    chaos.wtbox("gc", "--grace", "0")
    assert not any(chaos.leftovers(set()).values())
    print(f"\nlayer chaos: kills by phase: {dict(sorted(phases.items()))}")
