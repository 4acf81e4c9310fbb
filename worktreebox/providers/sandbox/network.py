"""A box's network: its own loopback, outbound traffic through slirp4netns, and a firewall inside.

The holder starts with a network namespace of its own (only `lo`). `attach` gives it a way out:
slirp4netns (Debian `slirp4netns`: rootless Podman's older default) joins the namespace, makes a
tap device with 10.0.2.100/24, and carries the box's connections through ordinary sockets of the
host. Chosen over pasta for its memory (measured: 3.2 MB RSS / 1.5 MB PSS attached, against
pasta's ~29 MB of dirtied memory per box). Its 10.0.2.2 is the host's loopback: the one way the
box's database is reached (the supervisor's database forward), nothing else of it.

slirp4netns's sockets live on the host, so a box could still reach a service of the host through
the host's loopback (10.0.2.2) or its *other* addresses (docker0's 172.17.0.1 answered one bound to
0.0.0.0). An nftables table inside the box's namespace rejects 10.0.2.2, every address of the host,
the subnets of its bridges (containers: other boxes' backing services) and link-local addresses
(cloud metadata), taken when the box is made. Box processes have no CAP_NET_ADMIN there, so they
cannot change it, nor mark their packets: the table accepts only packets carrying DB_MARK (set on
its sockets by the supervisor's database forward, which has that capability) past it.

`[box] network = "none"`: the same, with everything but loopback and marked packets dropped; a box
that needs neither the outside nor a database gets no slirp4netns at all. Outbound faults (`down`,
`loss`) are rules of the same table; outbound delay needs netem, which `netem_works` detects (this
kernel has none: `tc qdisc add dev lo root netem` says "Specified qdisc kind is unknown").
"""
from __future__ import annotations

import dataclasses
import ipaddress
import os
import select
import socket
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

from worktreebox.providers.sandbox.base import NONE, Holder, SandboxError, Spec
from worktreebox.providers.sandbox.layout import DNS_FORWARD
from worktreebox.services.spec import DB_MARK
from worktreebox.system import cgroups, procfs, procs

HELPER = "slirp4netns"
HELPER_NAMES = (HELPER,)  # the kernel's name of the running binary
PID_FILE = "slirp4netns.pid"  # under boxes/<id>/run/
TABLE = "wtbox"
GATEWAY = "10.0.2.2"  # slirp4netns's address of the host's loopback
LINK_LOCAL = ("169.254.0.0/16", "fe80::/10")  # cloud metadata (169.254.169.254) and neighbours
MTU = 65520  # slirp4netns's largest: fewer, larger segments through its user-space stack
ATTACH_TIMEOUT = 10.0


@dataclasses.dataclass(frozen=True)
class Outbound:
    """Faults on a box's traffic to the outside (not its forwards): all of it refused, or a share dropped."""

    down: bool = False
    loss: float = 0.0  # 0..1, each packet in either direction

    def to_json(self) -> dict[str, object]:
        return {"down": self.down, "loss": self.loss}


def wanted(spec: Spec) -> bool:
    """Whether the box needs slirp4netns: it goes online, or it reaches a database through the host."""
    return spec.network != NONE or spec.gateway


# ---------------------------------------------------------------- slirp4netns

def helper_argv(holder: Holder, *, ready_fd: int, exit_fd: int) -> list[str]:
    """slirp4netns's command line for a holder: configure the tap, tell `ready_fd` when done, end
    when `exit_fd` closes (the holder's sleep holds its other end: it ends with the box).

    `--enable-sandbox` shuts slirp4netns in a mount namespace of its own and detaches the old root
    there; started in ours, that detach reached boxes/ (a shared mount) and took every box's
    worktree view off the host (found by the first box made with it). So it starts in a mount
    namespace whose mounts are all private (`unshare --mount`), where nothing it unmounts goes
    further."""
    args = ["unshare", "--mount", "--propagation", "private", "--", HELPER, "--configure", f"--mtu={MTU}",
            f"--ready-fd={ready_fd}", f"--exit-fd={exit_fd}", "--enable-sandbox", "--enable-seccomp"]
    if holder.mode == "user":  # the namespace belongs to the holder's user namespace: join it first
        args.append(f"--userns-path={_netns(holder, 'user')}")
    return [*args, "--netns-type=path", _netns(holder, "net"), "tap0"]


def _netns(holder: Holder, kind: str) -> str:
    return procfs.namespace_file(holder.pid, kind)


def attach(holder: Holder, spec: Spec, *, log: Path, exit_fd: int, cgroup: cgroups.Leaf | None = None) -> int:
    """Start slirp4netns for the holder and wait until the box's tap is up; returns its pid.
    `exit_fd` is the read end of a pipe whose write end the holder keeps."""
    ready_r, ready_w = os.pipe()
    try:
        with open(log, "ab") as out:
            proc = procs.spawn(helper_argv(holder, ready_fd=ready_w, exit_fd=exit_fd), env=spec.env(), stdout=out,
                               stderr=out, pass_fds=(ready_w, exit_fd), cgroup=cgroup)
        os.close(ready_w)
        ready_w = -1
        said = _read_some(ready_r, ATTACH_TIMEOUT)
    finally:
        for fd in (ready_r, ready_w):
            if fd >= 0:
                os.close(fd)
    if said != b"1":
        procs.stop_group(proc)
        why = _last_line(log) if said is not None else f"no answer within {ATTACH_TIMEOUT:.0f} s"
        raise SandboxError(f"slirp4netns could not attach to box {spec.box_id}'s network: {why}.")
    (spec.run_dir / PID_FILE).write_text(f"{proc.pid}\n")
    return proc.pid


def _read_some(fd: int, timeout: float) -> bytes | None:
    """What a pipe says first (b"" at its end), or None after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        if select.select([fd], [], [], left)[0]:
            return os.read(fd, 16)


def _last_line(log: Path) -> str:
    try:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no message"
    return lines[-1].rstrip(".") if lines else "no message"


def helper_pid(run_dir: Path) -> int | None:
    """The box's live slirp4netns as recorded, or None."""
    try:
        pid = int((run_dir / PID_FILE).read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if procs.comm(pid) in HELPER_NAMES else None


# ---------------------------------------------------------------- the firewall

def host_addresses() -> list[str]:
    """What a box must not reach on the host: every address of every interface but loopback (the
    box's own loopback is not the host's), the whole subnet of bridges (docker0, br-*: containers),
    and link-local ranges."""
    import psutil

    out: list[str] = list(LINK_LOCAL)
    for name, addrs in psutil.net_if_addrs().items():
        bridge = Path("/sys/class/net", name, "bridge").exists()
        for a in addrs:
            if a.family not in (socket.AF_INET, socket.AF_INET6):
                continue  # a MAC address (AF_PACKET)
            net = _network(a.address, a.netmask if bridge else None)
            if net is not None and not net.is_loopback and not net.is_link_local:
                out.append(str(net))
    return sorted(set(out), key=lambda n: (":" in n, n))


def _network(address: str, netmask: str | None) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    try:
        host = address.split("%", 1)[0]
        return ipaddress.ip_network(f"{host}/{netmask}" if netmask else host, strict=False)
    except ValueError:
        return None  # something we cannot parse


def ruleset(network: str, blocked: Iterable[str], outbound: Outbound) -> str:
    """The box's nftables table, whole: loaded in one transaction (the old table goes with it)."""
    v4 = sorted(b for b in blocked if ":" not in b)
    v6 = sorted(b for b in blocked if ":" in b)
    drop = ["drop"] if network == NONE else _outbound_rules(outbound)
    out_rules = ['oifname "lo" accept', f"meta mark {DB_MARK:#x} accept"]
    if network != NONE:
        out_rules.append(f"ip daddr {DNS_FORWARD} meta l4proto {{ tcp, udp }} th dport 53 accept")
    out_rules.append(f"ip daddr {GATEWAY} reject")
    out_rules += [f"ip daddr {{ {', '.join(v4)} }} reject"] if v4 else []
    out_rules += [f"ip6 daddr {{ {', '.join(v6)} }} reject"] if v6 else []
    in_rules = ['iifname "lo" accept', "ct state established,related ct mark " + f"{DB_MARK:#x} accept"]
    in_rules += [r for r in drop if "numgen" in r or r == "drop"]
    return "\n".join([
        f"table inet {TABLE}", f"delete table inet {TABLE}", f"table inet {TABLE} {{",
        "  chain output {", "    type filter hook output priority 0; policy accept;",
        f"    meta mark {DB_MARK:#x} ct mark set meta mark",
        *(f"    {r}" for r in out_rules + drop), "  }",
        "  chain input {", "    type filter hook input priority 0; policy accept;",
        *(f"    {r}" for r in in_rules), "  }", "}", ""])


def _outbound_rules(outbound: Outbound) -> list[str]:
    if outbound.down:
        return ["reject"]
    if outbound.loss > 0:
        # nftables draws per packet: `numgen random mod 10000 < N` drops N in 10,000 of them
        return [f"numgen random mod 10000 < {round(min(outbound.loss, 1.0) * 10000)} drop"]
    return []


def apply_rules(holder: Holder, rules: str) -> None:
    """Load a table into the box's network namespace (as root there: box processes cannot)."""
    proc = subprocess.run(enter(holder, [tool("nft"), "-f", "-"]), input=rules, capture_output=True, text=True)
    if proc.returncode != 0:
        why = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[0]
        raise SandboxError(f"nft could not load box {holder.box_id}'s firewall: {why}.")


def set_outbound(holder: Holder, blocked: Iterable[str], outbound: Outbound) -> None:
    """Change the outbound faults of a live box (the same table, reloaded whole)."""
    apply_rules(holder, ruleset(holder.network, blocked, outbound))


def enter(holder: Holder, argv: list[str]) -> list[str]:
    """argv run in the box's network namespace with the caller's privileges there (root's, or a
    user namespace owner's: CAP_NET_ADMIN over the box's network, none elsewhere)."""
    user = ["-U", "--preserve-credentials"] if holder.mode == "user" else []
    return ["nsenter", "-t", str(holder.pid), *user, "-n", "--", *argv]


# ---------------------------------------------------------------- delay

def netem_works(holder: Holder) -> bool:
    """Whether the kernel has netem (delay on a device) inside this box's namespace: tried on its
    loopback and taken away again."""
    add = subprocess.run(enter(holder, [tool("tc"), "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"]),
                         capture_output=True, text=True)
    if add.returncode != 0:
        return False
    subprocess.run(enter(holder, [tool("tc"), "qdisc", "del", "dev", "lo", "root"]), capture_output=True)
    return True


def netem_in_kernel() -> bool:
    """Whether this kernel has netem at all (doctor's question, without a box): tried in a network
    namespace of its own, as root."""
    if os.geteuid() != 0:
        return False
    proc = subprocess.run(["unshare", "--net", tool("tc"), "qdisc", "add", "dev", "lo", "root", "netem", "delay",
                           "1ms"], capture_output=True)
    return proc.returncode == 0


def tool(name: str) -> str:
    """An administration tool's path: in /usr/sbin, which an ordinary user's PATH often lacks."""
    import shutil

    return shutil.which(name, path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin") or name
