"""Backing services per box ([backing.<name>]): real redis-server, memcached, rabbitmq-server, aiosmtpd
and moto processes, one set per box; their logs, status and doctor lines; `rm` leaves nothing; a
service that cannot start fails `new` in one sentence naming it, and leaves nothing."""
from __future__ import annotations

import json
import smtplib
import socket
from email.message import EmailMessage
from pathlib import Path

import pytest
from helpers import box_pids, port_bindable, redis_cmd, wait_for

from worktreebox.errors import WtboxError
from worktreebox.providers.backing import runtime_class
from worktreebox.providers.backing.base import probe

BARE = '[database]\nmode = "none"\n[observability]\nenabled = false\n'


def native(kind: str) -> bool:
    return runtime_class(kind, "native").unavailable() is None


def needs(*kinds: str):
    missing = [k for k in kinds if not native(k)]
    return pytest.mark.skipif(bool(missing), reason=f"no native {', '.join(missing)} on this host")




def memcached(port: int, text: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(text.encode())
        return s.recv(4096)


def assert_gone(box, ports: list[int]) -> None:
    assert box_pids(box.id) == set()
    for port in ports:
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still answers"
    assert not box.dir.exists()


@needs("redis", "memcached", "smtp", "s3")
def test_each_kind_runs_in_the_box_and_rm_leaves_nothing(host, make_repo):
    toml = BARE + """
[backing.redis]
image = "redis:7"
[backing.cache]
image = "memcached:1.6-alpine"
[backing.mail]
image = "axllent/mailpit"
[backing.files]
image = "minio/minio"
[box.env]
REDIS_URL = "{{ backing.redis.url }}/2"
AWS_ENDPOINT_URL = "{{ backing.files.endpoint }}"
"""
    repo = make_repo(toml=toml)
    box = host.new("kinds", repo)
    facts = box.facts()["backing"]
    assert {n: f["kind"] for n, f in facts.items()} == {"redis": "redis", "cache": "memcached", "mail": "smtp",
                                                       "files": "s3"}
    # the box's processes reach them at the ports they see (a sandboxed box's: the kinds' own)
    inside = box.inside_ports
    assert box.env["REDIS_URL"] == f"redis://127.0.0.1:{inside['redis']}/2"
    assert box.env["WTBOX_BACKING_MAIL_URL"] == f"smtp://127.0.0.1:{inside['mail']}"
    if box.data["sandbox"]["provider"] != "off":
        assert (inside["redis"], inside["cache"]) == (6379, 11211)
        from worktreebox.operations import boxes as box_ops

        seen = box_ops.run(host, box.id, "redis-cli -p 6379 PING", timeout=30, tail=100)["stdout"]
        assert seen.strip() == "PONG"
    # each answers its own protocol on the box's port (the host's)
    assert redis_cmd(box.ports["redis"], "SET", "k", "v") == b"+OK\r\n"
    assert memcached(box.ports["cache"], "set k 0 0 1\r\nv\r\n") == b"STORED\r\n"
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "app@example.com", "user@example.com", "hello"
    msg.set_content("sent to the box's sink")
    with smtplib.SMTP("127.0.0.1", box.ports["mail"], timeout=10) as smtp:
        smtp.send_message(msg)
    assert list(Path(facts["mail"]["maildir"], "new").iterdir())  # kept, never delivered
    import boto3

    endpoint = f"http://127.0.0.1:{box.ports['files']}"
    assert facts["files"]["endpoint"] == f"http://127.0.0.1:{inside['files']}"
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name=facts["files"]["region"],
                      aws_access_key_id=facts["files"]["access_key"],
                      aws_secret_access_key=facts["files"]["secret_key"])
    s3.create_bucket(Bucket="uploads")
    s3.put_object(Bucket="uploads", Key="a.txt", Body=b"x")
    assert [o["Key"] for o in s3.list_objects_v2(Bucket="uploads")["Contents"]] == ["a.txt"]
    # data under the box dir, output in the box's logs, status and health
    assert (box.dir / "backing" / "redis").is_dir()
    records = [json.loads(line) for line in (box.logs_dir / "redis.jsonl").read_text().splitlines()]
    assert any("Ready to accept connections" in r["msg"] for r in records)
    status = {row["name"]: row for row in host.describe(box)["backing"]}
    assert all(row["up"] for row in status.values()) and status["cache"]["runtime"] == "native"
    ports = [box.ports[n] for n in ("redis", "cache", "mail", "files")]
    assert box_pids(box.id)
    host.rm(box.id, force=True)
    assert_gone(box, ports)


@needs("redis")
def test_two_boxes_each_have_their_own_redis(host, make_repo):
    repo = make_repo(toml=BARE + '[backing.redis]\nimage = "redis:7"\n')
    a, b = host.new("a", repo), host.new("b", repo)
    assert a.ports["redis"] != b.ports["redis"]
    redis_cmd(a.ports["redis"], "SET", "only-in-a", "1")
    assert redis_cmd(a.ports["redis"], "EXISTS", "only-in-a") == b":1\r\n"
    assert redis_cmd(b.ports["redis"], "EXISTS", "only-in-a") == b":0\r\n"
    host.rm(a.id, force=True)
    assert redis_cmd(b.ports["redis"], "PING") == b"+PONG\r\n"  # b's is untouched by a's removal


def _fails_and_leaves_nothing(host, repo) -> str:
    with pytest.raises(WtboxError) as e:
        host.new("broken", repo)
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg
    assert host.list() == []
    boxes = host.boxes_dir
    assert not boxes.exists() or list(boxes.iterdir()) == []
    return msg


@needs("redis")
def test_a_missing_program_fails_new_naming_the_service(host, make_repo, monkeypatch):
    from worktreebox.providers.backing.redis import NativeRedis

    monkeypatch.setattr(NativeRedis, "program", "no-such-redis-server")
    repo = make_repo(toml=BARE + '[backing.sessions]\nimage = "redis:7"\nruntime = "native"\n')
    msg = _fails_and_leaves_nothing(host, repo)
    assert "'sessions'" in msg and "no-such-redis-server" in msg and "apt-get install redis-server" in msg


@needs("redis")
def test_a_crash_at_start_fails_new_with_the_programs_last_words(host, make_repo, monkeypatch):
    from worktreebox.providers.backing.redis import NativeRedis

    argv = NativeRedis.argv
    monkeypatch.setattr(NativeRedis, "argv", lambda self, *a: [*argv(self, *a), "--no-such-directive", "yes"])
    repo = make_repo(toml=BARE + '[backing.queue]\nimage = "redis:7"\n')
    msg = _fails_and_leaves_nothing(host, repo)
    assert "'queue'" in msg and "exited at start" in msg and "Bad directive" in msg  # redis's own last line


@needs("redis")
def _squat_after_a_free_port() -> socket.socket:
    """A listening socket on a port no one else holds, right after one that is free: web's lease (on a
    busy host the port before an ephemeral one was once in use, and `new` failed on web's instead)."""
    for _ in range(100):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        if port_bindable(s.getsockname()[1] - 1):
            s.listen()
            return s
        s.close()
    raise AssertionError("no port with a free one before it")


def test_a_port_taken_after_the_lease_fails_new_naming_the_service(host, make_repo, monkeypatch):
    from worktreebox.resources import ports

    repo = make_repo(toml=BARE + '[box]\nports = ["web"]\n[backing.cache]\nimage = "redis:7"\n')
    with _squat_after_a_free_port() as squatter:  # the box's lease range ends on it
        taken = squatter.getsockname()[1]
        monkeypatch.setattr(host.config, "port_range", (taken - 1, taken))  # web, then cache on `taken`
        monkeypatch.setattr(ports, "is_port_free", lambda port: True)  # the stranger came after the lease
        msg = _fails_and_leaves_nothing(host, repo)
    assert "cache" in msg and str(taken) in msg and "in use" in msg


@needs("redis")
def test_config_errors_name_the_file_and_key(run_wtbox, make_repo):
    for toml, words in (('[backing.db]\nimage = "postgres:16"\n', "the box's own database"),
                        ('[backing.search]\nimage = "elasticsearch:8"\n', "set kind = one of redis"),
                        ('[backing.cache]\nimage = "redis:7"\nruntime = "podman"\n', "runtime"),
                        ('[box]\nports = ["cache"]\n[backing.cache]\nimage = "redis"\n', "[box] ports also")):
        repo = make_repo(toml=toml)
        proc = run_wtbox("new", "bad", "--repo", str(repo), check=False)
        assert proc.returncode == 2, proc.stderr
        assert "wtbox.toml" in proc.stderr and words in proc.stderr and proc.stderr.count("\n") == 1


@pytest.mark.slow
@needs("rabbitmq")
def test_rabbitmq_node_per_box(host, make_repo):
    repo = make_repo(toml=BARE + '[backing.broker]\nimage = "rabbitmq:3-management"\n')
    box = host.new("mq", repo)
    facts = box.facts()["backing"]["broker"]
    assert facts["url"] == f"amqp://guest:guest@127.0.0.1:{box.inside_ports['broker']}"
    assert probe("rabbitmq", box.ports["broker"])
    ports = [box.ports[n] for n in ("broker", "broker_dist", "broker_epmd")]
    host.rm(box.id, force=True)
    assert_gone(box, ports)


def test_doctor_says_which_runtime_each_kind_gets(run_wtbox):
    doc = json.loads(run_wtbox("doctor", "--json", check=False).stdout)
    lines = {c["check"]: c["detail"] for c in doc["checks"] if c["check"].startswith("backing ")}
    assert set(lines) == {f"backing {k} (optional)" for k in ("redis", "memcached", "rabbitmq", "smtp", "s3")}
    if native("redis"):
        assert lines["backing redis (optional)"].startswith("native: ")


@needs("redis")
def test_a_pooled_box_keeps_its_redis_when_claimed(host, make_repo, run_wtbox):
    from helpers import remove_all_boxes

    from worktreebox.fleet import pool as P

    repo = make_repo(toml=BARE + '[backing.redis]\nimage = "redis:7"\n'
                     '[box.env]\nREDIS_URL = "{{ backing.redis.url }}"\n')
    try:
        P.top_up(host, P.resolve_target(repo), 1)
        (pooled,) = P.pool_boxes(host)
        redis_cmd(pooled.ports["redis"], "SET", "made-ahead", "1")
        out = json.loads(run_wtbox("new", "claim", "--repo", str(repo), "--json").stdout)
        assert out["from_pool"] is True and out["ports"]["redis"] == pooled.ports["redis"]
        assert out["env"]["REDIS_URL"] == f"redis://127.0.0.1:{pooled.inside_ports['redis']}"
        assert redis_cmd(out["ports"]["redis"], "EXISTS", "made-ahead") == b":1\r\n"  # the same instance, running
        assert {row["name"]: row["up"] for row in out["backing"]} == {"redis": True}
        run_wtbox("rm", "--force", out["id"])
        assert box_pids(out["id"]) == set() and box_pids(pooled.id) == set()
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", out["ports"]["redis"])) != 0
    finally:
        P.stop_filler(host, str(repo))
        remove_all_boxes(host)


@needs("redis")
def test_gc_removes_the_backing_service_of_a_box_it_does_not_know(host, make_repo, run_wtbox):
    repo = make_repo(toml=BARE + '[backing.redis]\nimage = "redis:7"\n')
    box = host.new("orphan", repo)
    port = box.ports["redis"]
    host.registry.delete_box(box.id)  # what a crash leaves when the row is gone and the pieces are not
    assert box.id in run_wtbox("gc", "--grace", "0", "--json").stdout
    assert_gone(box, [port])


@needs("redis")
def test_the_backing_figures_are_the_programs_own(host, make_repo):
    """`bench.py --only backing` counted every process of the box as Redis's (a sandboxed box's holder,
    slirp4netns and its supervisor: 30.7 MB "idle RSS") and timed its start from before the wait for
    the box's network (180 ms): the programs' own figures are the backing leaf's and `backing_start`."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
    from bench_backing import _memory_by_name

    box = host.new("figures", make_repo(toml=BARE + '[backing.redis]\nimage = "redis:7"\n'))
    timings = box.data["timings"]
    assert 0 < timings["backing_start"] <= timings["backing"]
    names = {"redis-server", "wtbox-keeper"}  # (the keeper takes its name once it runs)
    assert wait_for(lambda: set(_memory_by_name(host.home, box.id)) == names, timeout=10), \
        set(_memory_by_name(host.home, box.id))
    host.rm(box.id, force=True)
