"""The sandbox's pure parts: what a holder mounts, its slirp4netns and bwrap command lines, the launcher,
the firewall text (checked by the real nft), the resolver decision, records and the provider choice."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import psutil
import pytest

from worktreebox.errors import ConfigError
from worktreebox.providers import sandbox
from worktreebox.providers.sandbox import layout, network
from worktreebox.providers.sandbox.base import Bind, Holder, Spec, box_binds, load, save
from worktreebox.providers.sandbox.namespaces import Namespaces, holder_argv

BOX_UID, BOX_GIDS = 4321, {4321}


def spec_at(home: Path, **kw) -> Spec:
    box_dir = home / "boxes" / "web-12345678"
    return Spec("web-12345678", home, box_dir, box_binds(box_dir, repo_git=Path("/srv/app/.git")), **kw)


def pairs(args: list[str], flag: str) -> list[tuple[str, str]]:
    return [(args[i + 1], args[i + 2]) for i, a in enumerate(args) if a == flag]


def test_the_box_sees_the_host_read_only_its_own_tmp_and_its_binds_at_the_same_paths():
    spec = spec_at(Path("/var/lib/wtbox"))
    args = layout.filesystem_args(spec, uid=BOX_UID, gids=BOX_GIDS)
    assert args[:3] == ["--ro-bind", "/", "/"]
    tmpfs = [args[i + 1] for i, a in enumerate(args) if a == "--tmpfs"]
    assert tmpfs == ["/dev/shm", "/tmp", "/run", "/var/lib/wtbox"]
    writable = [Path(src) for src, dst in pairs(args, "--bind") if src == dst]
    assert writable == [spec.box_dir / n for n in ("worktree", "cache", "tmp", "home", "git")]
    assert pairs(args, "--ro-bind")[1:] == [("/srv/app/.git", "/srv/app/.git")]
    # every mount point's parent is made 0755 first (bwrap would make it 0700: the box user shut out)
    at = args.index(str(spec.box_dir / "worktree"))
    assert args[at - 5:at] == ["--perms", "0755", "--dir", str(spec.box_dir), "--bind"]
    assert args.index("/var/lib/wtbox") < args.index(str(spec.box_dir / "worktree"))  # masked, then bound back


def test_a_directory_the_box_user_cannot_enter_is_replaced_by_an_empty_one():
    outer = Path(tempfile.mkdtemp(dir="/var/tmp"))  # /tmp itself is the box's own: nothing below it is masked
    outer.chmod(0o755)
    try:
        private = outer / "root"
        (private / "state").mkdir(parents=True)
        private.chmod(0o700)
        spec = spec_at(private / "state" / "wtbox")
        assert layout.closed_ancestor(spec.home, uid=BOX_UID, gids=BOX_GIDS) == private
        assert layout.closed_ancestor(spec.home, uid=os.geteuid(), gids=set()) is None  # its owner may
        masks = layout.masked(spec, uid=BOX_UID, gids=BOX_GIDS)
        assert masks == [Path("/run"), private]  # the home lies inside the mask: no second one
    finally:
        shutil.rmtree(outer)


def test_nothing_below_the_boxs_own_tmp_is_masked(tmp_path):
    spec = spec_at(tmp_path / "home")  # tmp_path's parents are 0700, but /tmp is a fresh tmpfs inside
    assert layout.masked(spec, uid=BOX_UID, gids=BOX_GIDS) == [Path("/run")]


def test_a_toolchain_under_the_hosts_tmp_is_bound_into_the_boxs_own(tmp_path):
    """A checkout (and its venv) under /tmp ran nothing in a box: the box's /tmp is its own tmpfs,
    so `/tmp/ci-clone/.venv/bin/python` was "not found" there (a clean clone in /tmp, 78 tests)."""
    venv = tmp_path / "clone" / ".venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "lib").mkdir()
    (venv / "bin" / "python").write_text("")
    bound = layout.toolchain([str(venv / "bin")], [str(tmp_path / "clone")], uid=os.geteuid(), gids=set())
    assert bound == [tmp_path / "clone"]  # the checkout, which holds the venv
    assert layout.toolchain(["/usr/bin", "/bin"], [], uid=BOX_UID, gids=BOX_GIDS) == []


@pytest.mark.parametrize(("text", "expected"), [
    ("nameserver 10.255.255.53\n", None),
    ("nameserver 127.0.0.53\noptions edns0 trust-ad\nsearch lan\n",
     f"nameserver {layout.DNS_FORWARD}\noptions edns0 trust-ad\nsearch lan\n"),
    ("nameserver ::1\nnameserver 127.0.0.1\n", f"nameserver {layout.DNS_FORWARD}\n"),
    ("nameserver 127.0.0.53\nnameserver 1.1.1.1\n", None),  # one reachable resolver is enough
    ("# nothing\n", None),
])
def test_a_box_gets_its_own_resolv_conf_only_when_every_host_resolver_is_on_loopback(text, expected):
    assert layout.resolver(text) == expected


def holder(mode: str = "root") -> Holder:
    return Holder("web-12345678", 4242, 99, mode, 995, 994)


def test_slirp4netns_command_lines():
    root = network.helper_argv(holder(), ready_fd=5, exit_fd=6)
    assert root[:5] == ["unshare", "--mount", "--propagation", "private", "--"]  # its sandbox's unmounts stay there
    assert root[5] == "slirp4netns" and "--configure" in root and "--ready-fd=5" in root and "--exit-fd=6" in root
    assert "--disable-host-loopback" not in root  # 10.0.2.2 is how the database forward reaches the host
    assert root[-3:] == ["--netns-type=path", "/proc/4242/ns/net", "tap0"]
    user = network.helper_argv(holder("user"), ready_fd=5, exit_fd=6)
    assert "--userns-path=/proc/4242/ns/user" in user  # the holder's user namespace owns its network


def test_the_helper_starts_only_for_a_box_that_goes_out_or_reaches_its_database():
    assert network.wanted(spec_at(Path("/h")))
    assert network.wanted(spec_at(Path("/h"), network="none", gateway=True))
    assert not network.wanted(spec_at(Path("/h"), network="none"))


def test_the_launcher_drops_to_the_box_user_and_enters_the_directory_inside():
    ns = Namespaces()
    prefix = ns.prefix(holder(), cwd="/h/boxes/web-12345678/worktree")
    assert prefix[:2] == ["env", "--ignore-signal=HUP,INT,QUIT,TERM,USR1,USR2,ALRM"]  # nsenter outlives no stop
    assert prefix[2:10] == ["nsenter", "-t", "4242", "-p", "-m", "-i", "-u", "-n"]
    assert not [a for a in prefix if a.startswith("--wd")]  # it would start the process in the host's directory
    assert prefix[prefix.index("setpriv") + 1:len(prefix) - 1 - prefix[::-1].index("env")] == [
        "--reuid=995", "--regid=994", "--clear-groups", "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs",
        "--"]
    assert prefix[-4:] == ["env", "--default-signal=HUP,INT,QUIT,TERM,USR1,USR2,ALRM",
                           "--chdir=/h/boxes/web-12345678/worktree", "--"]
    user = ns.prefix(holder("user"), cwd="/w")
    assert user[5:7] == ["-U", "--preserve-credentials"] and "--reuid=995" not in user


def test_holder_command_lines():
    spec = spec_at(Path("/h"))
    root = holder_argv(spec, uid=995, gids={994}, user_ns=False, resolv=None, info_fd=7)
    assert root[0] == "bwrap" and root[root.index("--hostname") + 1] == "web-12345678"
    assert root[root.index("--info-fd") + 1] == "7" and root[-3:-1] == ["/bin/sh", "-c"]
    user = holder_argv(spec, uid=995, gids={994}, user_ns=True, resolv=None, info_fd=7)
    assert user[:4] == ["unshare", "--user", "--map-root-user", "--"] and "--unshare-user" not in user


@pytest.mark.parametrize(("net", "outbound", "present", "absent"), [
    ("open", network.Outbound(), ["reject", 'oifname "lo" accept'], ["drop", "numgen"]),
    ("none", network.Outbound(), ["drop"], ["numgen"]),
    ("open", network.Outbound(down=True), ["    reject\n"], ["numgen"]),
    ("open", network.Outbound(loss=0.05), ["numgen random mod 10000 < 500 drop"], []),
])
def test_the_firewall_text_parses_in_the_real_nft(net, outbound, present, absent):
    rules = network.ruleset(net, ["172.17.0.0/16", "192.0.2.2", "fd00::2", "169.254.0.0/16"], outbound)
    for text in present:
        assert text in rules
    for text in absent:
        assert text not in rules
    if shutil.which("nft") is None or os.geteuid() != 0:
        pytest.skip("nft --check needs nft and root")
    unshared = subprocess.run(["unshare", "--net", "nft", "-c", "-f", "-"], input=rules, capture_output=True, text=True)
    assert unshared.returncode == 0, unshared.stderr


def test_host_addresses_cover_every_address_but_loopback():
    blocked = network.host_addresses()
    assert "169.254.0.0/16" in blocked and not [b for b in blocked if b.startswith("127.")]
    mine = {a.address for addrs in psutil.net_if_addrs().values() for a in addrs
            if a.family == socket.AF_INET and not a.address.startswith("127.")}
    import ipaddress

    nets = [ipaddress.ip_network(b) for b in blocked if ":" not in b]
    assert all(any(ipaddress.ip_address(ip) in n for n in nets) for ip in mine)


def test_records_round_trip_and_a_bad_one_reads_as_none(tmp_path):
    h = holder()
    h.helper_pid, h.netns_file = 77, "/proc/4242/ns/net"
    save(tmp_path, h)
    back = load(tmp_path)
    assert back is not None and back.to_json() == h.to_json() and back.netns_file is None
    (tmp_path / "sandbox.json").write_text("{not json")
    assert load(tmp_path) is None
    assert load(tmp_path / "nowhere") is None


def test_choosing_a_provider():
    provider, why = sandbox.choose("off")
    assert provider.mode == "off" and why == "forced by [host] sandbox"
    assert provider.command(None, ["true"], cwd="/") == ["true"]
    with pytest.raises(ConfigError, match="Unknown sandbox provider 'jail'; choose one of namespaces, off"):
        sandbox.choose("jail")
    assert Bind(Path("/a")).dst == Path("/a")
