"""A box's network: its own loopback, outbound traffic through pasta, and a firewall inside.

The holder starts with a network namespace of its own (only `lo`). `attach` gives it a way out:
pasta (Debian `passt`: rootless Podman's) joins the namespace, copies the host's addresses and
routes onto a tap device, and carries the box's connections through ordinary sockets of the
host. With `--no-map-gw` nothing maps to the host's loopback; `-T inside:host` makes a port of
the box's loopback reach one of the host's (the box's PostgreSQL). Measured here: ~22 ms to
attach, `curl https://pypi.org` works from inside.

pasta's sockets live on the host, so a box could still reach a service of the host through
the host's *other* addresses (docker0's 172.17.0.1 answered one bound to 0.0.0.0). An nftables
table inside the box's namespace rejects every address of the host, the subnets of its bridges
(containers: other boxes' backing services) and link-local addresses (cloud metadata), taken
when the box is made. Box processes have no CAP_NET_ADMIN there, so they cannot change it; the
table goes with the namespace.

`[box] network = "none"`: pasta without `--config-net` (its tap stays down: only the `-T`
forwards work) and a table that drops everything but loopback. Outbound faults (`down`, `loss`)
are rules of the same table; outbound delay needs netem, which `netem_works` detects (this
kernel has none: `tc qdisc add dev lo root netem` says "Specified qdisc kind is unknown").
"""
from __future__ import annotations

import dataclasses
import ipaddress
import subprocess
from collections.abc import Iterable
from pathlib import Path

from worktreebox.providers.sandbox.base import NONE, Holder, SandboxError, Spec
from worktreebox.providers.sandbox.layout import DNS_FORWARD
from worktreebox.system import cgroups, procfs, procs

PASTA_NAMES = ("pasta", "passt", "pasta.avx2", "passt.avx2")  # the kernel's name of the running binary
PID_FILE = "pasta.pid"  # under boxes/<id>/run/
TABLE = "wtbox"
LINK_LOCAL = ("169.254.0.0/16", "fe80::/10")  # cloud metadata (169.254.169.254) and neighbours
ATTACH_TIMEOUT = 10.0


@dataclasses.dataclass(frozen=True)
class Outbound:
    """Faults on a box's traffic to the outside (not its forwards): all of it refused, or a share dropped."""

    down: bool = False
    loss: float = 0.0  # 0..1, each packet in either direction

    def to_json(self) -> dict[str, object]:
        return {"down": self.down, "loss": self.loss}


# ---------------------------------------------------------------- pasta

def pasta_argv(holder: Holder, spec: Spec, *, dns_forward: bool = False) -> list[str]:
    """pasta's command line for a holder: join its network namespace and, unless the box is
    offline, configure its tap from the host's; forward the loopback ports of `spec.host_ports`."""
    args = ["pasta", "-q", "--no-map-gw", "-t", "none", "-u", "none", "-U", "none",
            "-T", _host_ports(spec.host_ports), "-P", str(spec.run_dir / PID_FILE)]
    if spec.network != NONE:
        args.append("--config-net")
        if dns_forward:
            args += ["--dns-forward", DNS_FORWARD]
    if holder.mode == "root":
        # As root, pasta would drop to nobody before it opens the namespace, and fail: stay root
        # (it still shuts itself in its own namespaces and seccomp filter).
        return [*args[:1], "--runas", "0", *args[1:], "--netns", _netns(holder, "net"), "--netns-only"]
    return [*args, str(holder.pid)]  # joins the holder's user namespace, which owns its network


def _host_ports(ports: dict[int, int]) -> str:
    return ",".join(f"{inside}:{host}" for inside, host in sorted(ports.items())) or "none"


def _netns(holder: Holder, kind: str) -> str:
    return procfs.namespace_file(holder.pid, kind)


def attach(holder: Holder, spec: Spec, *, log: Path, dns_forward: bool = False,
           cgroup: cgroups.Leaf | None = None) -> int:
    """Start pasta for the holder (it forks to the background once the namespace is configured);
    returns pasta's pid."""
    with open(log, "ab") as out:
        proc = procs.spawn(pasta_argv(holder, spec, dns_forward=dns_forward), env=spec.env(), stdout=out,
                           stderr=out, cgroup=cgroup)
        try:
            rc = proc.wait(ATTACH_TIMEOUT)
        except subprocess.TimeoutExpired:
            procs.stop_group(proc)
            raise SandboxError(f"pasta did not attach to box {spec.box_id}'s network within {ATTACH_TIMEOUT:.0f} s.") \
                from None
    if rc != 0:
        raise SandboxError(f"pasta could not attach to box {spec.box_id}'s network: {_last_line(log)}.")
    return int((spec.run_dir / PID_FILE).read_text().strip())


def _last_line(log: Path) -> str:
    try:
        lines = [line for line in log.read_text(errors="replace").splitlines()
                 if line.strip() and "syslog" not in line]
    except OSError:
        return "no message"
    return lines[-1].rstrip(".") if lines else "no message"


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
            net = _network(a.address, a.netmask if bridge else None)
            if net is not None and not net.is_loopback and not net.is_link_local:
                out.append(str(net))
    return sorted(set(out), key=lambda n: (":" in n, n))


def _network(address: str, netmask: str | None) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    try:
        host = address.split("%", 1)[0]
        return ipaddress.ip_network(f"{host}/{netmask}" if netmask else host, strict=False)
    except ValueError:
        return None  # a MAC address (AF_PACKET) or something we cannot parse


def ruleset(network: str, blocked: Iterable[str], outbound: Outbound) -> str:
    """The box's nftables table, whole: loaded in one transaction (the old table goes with it)."""
    v4 = sorted(b for b in blocked if ":" not in b)
    v6 = sorted(b for b in blocked if ":" in b)
    drop = ["drop"] if network == NONE else _outbound_rules(outbound)
    out_rules = ['oifname "lo" accept', f"ip daddr {DNS_FORWARD} udp dport 53 accept"]
    out_rules += [f"ip daddr {{ {', '.join(v4)} }} reject"] if v4 else []
    out_rules += [f"ip6 daddr {{ {', '.join(v6)} }} reject"] if v6 else []
    in_rules = ['iifname "lo" accept']
    in_rules += [r for r in drop if "numgen" in r or r == "drop"]
    return "\n".join([
        f"table inet {TABLE}", f"delete table inet {TABLE}", f"table inet {TABLE} {{",
        "  chain output {", "    type filter hook output priority 0; policy accept;",
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


def tool(name: str) -> str:
    """An administration tool's path: in /usr/sbin, which an ordinary user's PATH often lacks."""
    import os
    import shutil

    return shutil.which(name, path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin") or name


def dns_forward_wanted(resolv_text: str | None = None) -> bool:
    """True when the host's resolvers are all on its loopback (see layout.resolver)."""
    from worktreebox.providers.sandbox.layout import resolver

    if resolv_text is None:
        try:
            resolv_text = Path("/etc/resolv.conf").read_text()
        except OSError:
            return False
    return resolver(resolv_text) is not None


def pasta_pid(spec_run_dir: Path) -> int | None:
    try:
        pid = int((spec_run_dir / PID_FILE).read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if procs.comm(pid) in PASTA_NAMES else None

