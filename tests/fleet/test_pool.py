"""The warm pool (worktreebox/fleet/pool.py): boxes made ahead, claimed by `new`, against real git,
PostgreSQL, VictoriaMetrics and services."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import git, remove_all_boxes, wait_for

# Answers with what its process sees: the box identity promised in the README ("Warm pool").
SERVER = '''
import http.server, json, os, sys, time
time.sleep(float(os.environ.get("SLEEP", "0")))
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({k: os.environ.get(k) for k in ("WTBOX_ID", "PGUSER", "TMPDIR")}
                          | {"cwd": os.getcwd(), "pid": os.getpid()}).encode()
        self.send_response(200); self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
'''


def toml(*, db: str = "none", metrics: bool = False, extra: str = "") -> str:
    return f'''
[box]
ports = ["web"]
[database]
mode = "{db}"
[observability]
enabled = {"true" if metrics else "false"}
[services.web]
cmd = "{sys.executable} server.py {{{{ ports.web }}}}"
ready = "http://127.0.0.1:{{{{ ports.web }}}}/"
{extra}
'''


def get(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
        return json.loads(r.read())


@pytest.fixture
def phost(host):
    """The test's host; every pool filler and pooled box is gone afterwards."""
    from worktreebox.fleet import pool as P

    yield host
    for repo in {b.repo for b in host.list()} | set(host.registry.select_repos()):
        P.stop_filler(host, repo)
    remove_all_boxes(host)


def fill(host, repo: Path, n: int):
    from worktreebox.fleet import pool as P

    t = P.resolve_target(repo)
    P.top_up(host, t, n)
    return t


def test_concurrent_claims_never_get_the_same_box(phost, make_repo, tmp_path):
    from worktreebox.fleet import pool as P

    repo = make_repo({"server.py": SERVER}, toml=toml())
    fill(phost, repo, 2)
    pooled = {b.id for b in P.pool_boxes(phost)}
    assert len(pooled) == 2
    go = tmp_path / "go"
    script = f'''
import json, os, sys, time
from worktreebox.fleet import pool as P
from worktreebox.host import Host
while not os.path.exists({str(go)!r}): time.sleep(0.001)
h = Host(os.environ["WTBOX_HOME"])
b = P.claim(h, "race-" + sys.argv[1], P.resolve_target({str(repo)!r}))
print(json.dumps(b and {{"id": b.id, "pool_id": b.data["pool_id"]}}))
'''
    procs = [subprocess.Popen([sys.executable, "-c", script, str(i)], stdout=subprocess.PIPE, text=True)
             for i in range(8)]
    time.sleep(0.5)
    go.touch()
    results = [json.loads(p.communicate(timeout=60)[0]) for p in procs]
    claimed = [r for r in results if r]
    assert len(claimed) == 2, results
    assert {r["pool_id"] for r in claimed} == pooled  # each pooled box went to exactly one claim
    assert len({r["id"] for r in claimed}) == 2
    assert P.pool_boxes(phost) == []
    for r in claimed:
        b = phost.get(r["id"])
        assert b.state == "ready" and b.pool is None


def test_claimed_box_has_the_id_derived_names_and_its_own_resources(phost, make_repo, run_wtbox, wtbox_home):
    from worktreebox.box import hex_of
    from worktreebox.system import procs

    repo = make_repo({"server.py": SERVER}, toml=toml(db="schema", metrics=True))
    fill(phost, repo, 1)
    (pool_box,) = [b for b in phost.list() if b.pool]
    before = get(pool_box.ports["web"])

    out = json.loads(run_wtbox("new", "fix-login", "--repo", str(repo), "--json").stdout)
    assert out["from_pool"] is True
    box_id = out["id"]
    assert box_id == f"fix-login-{hex_of(pool_box.id)}"
    assert out["task"] == "fix-login" and out["branch"] == f"wtbox/{box_id}"
    assert out["dir"] == str(wtbox_home / "boxes" / box_id) and Path(out["dir"]).is_dir()
    assert not Path(out["dir"]).is_symlink()
    assert git(repo, "rev-parse", "--abbrev-ref", "HEAD") == "main\n"
    assert git(Path(out["path"]), "rev-parse", "--abbrev-ref", "HEAD").strip() == f"wtbox/{box_id}"
    assert f"wtbox/{pool_box.id}" not in git(repo, "branch", "--list")
    assert out["database"]["user"] == f"wt_{hex_of(box_id)}"
    assert "timings" in out and out["timings"]["fast_forward"] is False
    # the service kept running through the claim: same process, now in the renamed dir
    now = get(out["ports"]["web"])
    assert now["pid"] == before["pid"]
    assert now["WTBOX_ID"] == pool_box.id and hex_of(now["WTBOX_ID"]) == hex_of(box_id)  # the README's promise
    assert os.path.realpath(now["cwd"]) == os.path.realpath(out["path"])
    assert now["PGUSER"] == f"wt_{hex_of(box_id)}"
    assert Path(now["TMPDIR"]).is_dir()  # the old path still leads into the box
    env_file = (Path(out["dir"]) / "env").read_text()
    assert f"WTBOX_ID={box_id}" in env_file and pool_box.id not in env_file
    # every process started from now on carries the box's id and its real paths
    ex = run_wtbox("exec", box_id, "--", "sh", "-c", "echo $WTBOX_ID $TMPDIR $WTBOX_BOX_DIR").stdout.split()
    assert ex == [box_id, f"{out['dir']}/tmp", out["dir"]]
    st = json.loads(run_wtbox("status", box_id, "--json").stdout)
    assert [s["state"] for s in st["services"]] == ["ready"]
    assert st["metrics"]["url"]
    urllib.request.urlopen(st["metrics"]["url"] + "/health", timeout=5).read()

    fresh = json.loads(run_wtbox("new", "other", "--repo", str(repo), "--no-pool", "--json").stdout)
    assert fresh["from_pool"] is False
    assert fresh["ports"]["web"] != out["ports"]["web"]
    assert fresh["database"]["user"] != out["database"]["user"]
    assert st["metrics"]["url"] != json.loads(run_wtbox("status", fresh["id"], "--json").stdout)["metrics"]["url"]

    run_wtbox("rm", "--force", box_id)
    boxes = wtbox_home / "boxes"
    assert not (boxes / box_id).exists() and not (boxes / pool_box.id).is_symlink()
    assert not procs.find_box_processes(box_id, boxes / box_id)
    assert not procs.find_box_processes(pool_box.id, boxes / pool_box.id)
    assert f"wtbox/{box_id}" not in git(repo, "branch", "--list")
    gc = json.loads(run_wtbox("gc", "--grace", "0", "--dry-run", "--json").stdout)
    assert gc["actions"] == []
    from worktreebox.fleet.gc import discover_all

    assert not [i for i in discover_all(phost) if hex_of(i) == hex_of(box_id)]


def test_moved_base_is_fast_forwarded_in_place(phost, make_repo, run_wtbox):
    repo = make_repo({"server.py": SERVER, "a.txt": "one\n"}, toml=toml())
    fill(phost, repo, 1)
    (pool_box,) = [b for b in phost.list() if b.pool]
    pid = get(pool_box.ports["web"])["pid"]
    (repo / "a.txt").write_text("two\n")
    git(repo, "commit", "-qam", "two")
    (repo / "b.txt").write_text("new\n")
    git(repo, "add", "b.txt")
    git(repo, "commit", "-qm", "three")
    head = git(repo, "rev-parse", "HEAD").strip()
    out = json.loads(run_wtbox("new", "moved", "--repo", str(repo), "--json").stdout)
    assert out["from_pool"] is True and out["timings"]["fast_forward"] is True
    wt = Path(out["path"])
    assert (wt / "a.txt").read_text() == "two\n" and (wt / "b.txt").read_text() == "new\n"
    assert git(wt, "rev-parse", "HEAD").strip() == head
    assert git(wt, "status", "--porcelain") == ""
    assert phost.get(out["id"]).data["base_sha"] == head
    assert get(out["ports"]["web"])["pid"] == pid  # no restart_on_update: services untouched
    # a box whose base is not an ancestor of the caller's is never taken
    fill(phost, repo, 1)
    git(repo, "checkout", "-q", "-b", "side", "HEAD~2")
    out2 = json.loads(run_wtbox("new", "side", "--repo", str(repo), "--json").stdout)
    assert out2["from_pool"] is False


def test_restart_on_update_restarts_services_after_fast_forward(phost, make_repo, run_wtbox):
    repo = make_repo({"server.py": SERVER}, toml=toml(extra="[pool]\nrestart_on_update = true\n"))
    phost.registry.set_pool_size(str(repo), 0)  # no filler: this test fills by hand
    fill(phost, repo, 1)
    (pool_box,) = [b for b in phost.list() if b.pool]
    pid = get(pool_box.ports["web"])["pid"]
    (repo / "c.txt").write_text("c\n")
    git(repo, "add", "c.txt")
    git(repo, "commit", "-qm", "c")
    out = json.loads(run_wtbox("new", "restarted", "--repo", str(repo), "--json").stdout)
    assert out["from_pool"] is True
    assert get(out["ports"]["web"])["pid"] != pid


def test_changed_wtbox_toml_rebuilds_the_pool(phost, make_repo, run_wtbox):
    from worktreebox.fleet import pool as P

    repo = make_repo({"server.py": SERVER}, toml=toml(extra="[pool]\nsize = 1\n"))
    env = {"WTBOX_POOL_IDLE": "30"}
    st = json.loads(run_wtbox("pool", str(repo), "--wait", "60", "--json", env=env).stdout)
    assert st["pools"][0]["ready"] == 1 and st["pools"][0]["size"] == 1
    (old,) = P.pool_boxes(phost)
    # an edit of wtbox.toml in the checkout (what `new` reads) changes the pool key
    (repo / "wtbox.toml").write_text(toml(extra="[pool]\nsize = 1\n[box.env]\nFLAVOUR = \"two\"\n"))
    wait_for(lambda: [b for b in P.pool_boxes(phost) if b.id != old.id and b.state == "ready"], timeout=60)
    boxes = P.pool_boxes(phost)
    assert [b.id for b in boxes] != [old.id] and old.id not in {b.id for b in phost.list()}
    assert boxes[0].env.get("FLAVOUR") == "two"
    out = json.loads(run_wtbox("new", "flavoured", "--repo", str(repo), "--json").stdout)
    assert out["from_pool"] is True and out["env"]["FLAVOUR"] == "two"
    # the filler refills after the claim
    assert wait_for(lambda: [b for b in P.pool_boxes(phost) if b.state == "ready"], timeout=60)
    st = json.loads(run_wtbox("pool", "--status", "--json").stdout)
    assert [(p["repo"], p["size"], p["ready"]) for p in st["pools"]] == [(str(repo), 1, 1)]
    run_wtbox("pool", str(repo), "--drain")
    assert P.pool_boxes(phost) == [] and not st["pools"][0]["filling"]
    assert wait_for(lambda: not P.status(phost, str(repo))[0]["filler"], timeout=10)


def test_gc_removes_stale_pool_boxes(phost, make_repo, run_wtbox):
    from worktreebox.fleet import pool as P

    repo = make_repo({"server.py": SERVER}, toml=toml())
    fill(phost, repo, 1)
    (repo / "package-lock.json").write_text("{}\n")  # a lock file changed: new dependencies
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "deps")
    gc = json.loads(run_wtbox("gc", "--grace", "0", "--json").stdout)
    assert [a["reason"] for a in gc["actions"]] == ["pooled box whose commit or config no longer matches its repo"]
    assert P.pool_boxes(phost) == []


def test_no_pool_secrets_ls_and_max_boxes(phost, make_repo, run_wtbox, wtbox_home):
    from worktreebox.fleet import pool as P

    repo = make_repo({"server.py": SERVER}, toml=toml())
    fill(phost, repo, 2)
    out = json.loads(run_wtbox("new", "fresh", "--repo", str(repo), "--no-pool", "--json").stdout)
    assert out["from_pool"] is False
    # pool boxes hold no secrets: a `new` with one never takes them
    out = json.loads(run_wtbox("new", "secret", "--repo", str(repo), "--secret", "TOKEN", "--json",
                               env={"TOKEN": "s3cr3t"}).stdout)
    assert out["from_pool"] is False
    assert len(P.pool_boxes(phost)) == 2
    listed = [b["id"] for b in json.loads(run_wtbox("ls", "--json").stdout)]
    everything = [b["id"] for b in json.loads(run_wtbox("ls", "--all", "--json").stdout)]
    assert sorted(i.rsplit("-", 1)[0] for i in listed) == ["fresh", "secret"]
    assert len(everything) == 4 and all(i.startswith("pool-") for i in set(everything) - set(listed))
    # max_boxes counts pooled boxes: a fresh box no longer fits, a claim does
    (wtbox_home / "config.toml").write_text("[host]\nmax_boxes = 4\n")
    bad = run_wtbox("new", "nope", "--repo", str(repo), "--no-pool", check=False)
    assert bad.returncode == 1 and "max_boxes" in bad.stderr
    out = json.loads(run_wtbox("new", "fits", "--repo", str(repo), "--json").stdout)
    assert out["from_pool"] is True


def test_pool_config_errors_name_file_and_key(make_repo, run_wtbox, phost):
    repo = make_repo({"server.py": SERVER}, toml=toml(extra="[pool]\nsize = \"two\"\n"))
    bad = run_wtbox("new", "x", "--repo", str(repo), check=False)
    assert bad.returncode == 2 and "[pool] size" in bad.stderr and "wtbox.toml" in bad.stderr
    repo2 = make_repo({"server.py": SERVER}, toml=toml(extra="[box.env]\nTASK = \"{{ box.task }}\"\n"))
    bad = run_wtbox("pool", str(repo2), "--size", "1", check=False)
    assert bad.returncode == 2 and "box.task" in bad.stderr
    bad = run_wtbox("pool", str(repo), "--size", "1", "--drain", check=False)
    assert bad.returncode == 2


def test_fanout_claims_from_the_pool_and_warm_tops_it_up(phost, make_repo, run_wtbox):
    from worktreebox.fleet import pool as P

    repo = make_repo({"server.py": SERVER}, toml=toml())
    phost.registry.set_pool_size(str(repo), 0)
    rows = json.loads(run_wtbox("fanout", "try", "-n", "2", "--repo", str(repo), "--warm", "--json").stdout)
    assert [r["from_pool"] for r in rows] == [True, True]
    assert sorted(r["id"].rsplit("-", 1)[0] for r in rows) == ["try-1", "try-2"]
    assert P.pool_boxes(phost) == []


def test_a_box_running_as_background_can_be_claimed(phost, make_repo):
    """A pooled box that went background (cpu.idle, while a busy host made it so) keeps its idle
    flag through the claim, and the claim raises its CPU weight all the same: the kernel refuses a
    weight for an idle group (EINVAL), which once made every such claim fail."""
    from worktreebox.fleet import pool as P
    from worktreebox.system import cgroups

    repo = make_repo({"server.py": SERVER}, toml=toml())
    fill(phost, repo, 1)
    (pool_box,) = P.pool_boxes(phost)
    backend = cgroups.for_home(phost.home)
    if backend is None or not backend.set_background(pool_box.id, True):
        pytest.skip("no cgroups, or a kernel without cpu.idle (Linux < 5.15)")
    box = P.claim(phost, "busy-claim", P.resolve_target(repo))
    assert box is not None and box.data["pool_id"] == pool_box.id
    assert backend.background(box.id)
    backend.set_background(box.id, False)  # (an idle group reports the idle weight, not its own)
    assert backend.limits(box.id).cpu_weight == cgroups.DEFAULT_CPU_WEIGHT


def test_a_pooled_box_is_claimed_only_when_its_fingerprint_is_a_fresh_boxs(phost, make_repo, run_wtbox, monkeypatch):
    """Pool boxes made in another environment (here: another inherited variable) are not what a fresh
    box would be: `new` makes a fresh one and says which part differed; the same environment claims."""
    repo = make_repo({"server.py": SERVER},
                     toml=toml().replace('ports = ["web"]', 'ports = ["web"]\ninherit_env = ["REPRO_SHELL_VAR"]'))
    monkeypatch.setenv("REPRO_SHELL_VAR", "made-ahead")
    fill(phost, repo, 1)
    other = json.loads(run_wtbox("new", "other", "--json", cwd=repo, env={"REPRO_SHELL_VAR": "mine"}).stdout)
    assert other["from_pool"] is False and other["pool"]["mismatch"] == ["env"]
    assert "env" in other["pool"]["why"]
    same = json.loads(run_wtbox("new", "same", "--json", cwd=repo, env={"REPRO_SHELL_VAR": "made-ahead"}).stdout)
    assert same["from_pool"] is True and same["pool"]["claimed"] is True
    assert same["fingerprint"]["parts"]["env"]["REPRO_SHELL_VAR"] == "made-ahead"


def test_a_claim_that_dies_before_its_branch_is_renamed_leaves_no_branch(phost, make_repo, monkeypatch):
    """A claim renames the pooled box's dir (its old name kept as a symlink), then its branch. Ended
    in between (kill -9, or a failure rolled back), the box's removal skipped everything under the
    old name, the symlink's, so `wtbox/pool-<hex>` stayed: gc after pool_chaos's kills found it."""
    from worktreebox.errors import WtboxError
    from worktreebox.fleet import pool as P

    repo = make_repo({"server.py": SERVER}, toml=toml())
    fill(phost, repo, 1)
    (pool_box,) = P.pool_boxes(phost)

    def dies(*args, **kwargs):
        raise WtboxError("the claim died here")

    monkeypatch.setattr(P, "_rename_branch", dies)
    assert P.claim(phost, "dies", P.resolve_target(repo)) is None  # removed; the caller makes a fresh box
    assert phost.list() == []
    branches = git(repo, "for-each-ref", "--format=%(refname:short)", "refs/heads/wtbox/").split()
    assert branches == []
    assert not (phost.boxes_dir / pool_box.id).exists() and not (phost.boxes_dir / pool_box.id).is_symlink()
