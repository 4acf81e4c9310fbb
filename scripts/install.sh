#!/usr/bin/env bash
# Install everything worktreebox needs on a Debian machine, idempotently:
# apt packages (git, PostgreSQL 15, VictoriaMetrics, Caddy for the router; with --test also docker.io and
# debootstrap for the docker provider's tests, xfsprogs for the reflink provider's), a venv in .venv, and `pip install -e .`.
# Runs as root (apt); a second run changes nothing and takes a few seconds.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

WITH_TEST=0
for arg in "$@"; do
    case "$arg" in
        --test) WITH_TEST=1 ;;
        *) echo "install.sh: unknown option $arg (known: --test)" >&2; exit 2 ;;
    esac
done

PKGS=(git ca-certificates python3 python3-venv python3-pip postgresql postgresql-contrib victoria-metrics procps chromium fuse-overlayfs nodejs caddy)
# the sandbox: bubblewrap (the holder), slirp4netns (outbound network, the database hop), nftables (a box's firewall),
# iproute2 (tc: netem where the kernel has it), acl; nsenter/setpriv/unshare come with util-linux
PKGS+=(bubblewrap slirp4netns nftables iproute2 acl)
# backing services run natively per box ([backing.*] in wtbox.toml)
PKGS+=(redis-server memcached rabbitmq-server)
# xfsprogs: the reflink mount provider's tests run on a loop-mounted XFS; curl and psmisc (fuser,
# killall): what the sandbox tests' agent runs inside a box
[ "$WITH_TEST" = 1 ] && PKGS+=(docker.io debootstrap xfsprogs curl psmisc)

missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "install.sh: missing packages ${missing[*]}; run as root or 'sudo apt-get install ${missing[*]}'." >&2
        exit 1
    fi
    echo "install.sh: apt-get install ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # Debian starts a system cluster on install; wtbox runs its own, so keep the packaged one off.
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    # The packages start system-wide daemons on their default ports; every box runs its own.
    for svc in redis-server memcached rabbitmq-server; do
        case " ${missing[*]} " in *" $svc "*) service "$svc" stop >/dev/null 2>&1 || true ;; esac
    done
fi
# The Debian postgresql package starts its own "main" cluster; we do not use it.
if command -v pg_lsclusters >/dev/null && pg_lsclusters 2>/dev/null | grep -q online; then
    pg_ctlcluster 15 main stop 2>/dev/null || true
fi

# The Debian caddy package serves :80 as a system service where systemd runs; wtbox runs its own
# Caddy per home (the router), so keep the packaged one off.
if command -v systemctl >/dev/null && systemctl is-active --quiet caddy 2>/dev/null; then
    systemctl disable --now caddy >/dev/null 2>&1 || true
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
stamp=.venv/.wtbox-installed
want=$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    .venv/bin/pip install -q --upgrade pip >/dev/null 2>&1 || true
    .venv/bin/pip install -q -e ".[test]"
    echo "$want" > "$stamp"
fi
# Byte-compile up front: every wtbox command is a fresh process, and compiling the package
# costs ~85 ms per command where bytecode can't be written (PYTHONDONTWRITEBYTECODE).
.venv/bin/python -m compileall -q worktreebox >/dev/null || true
echo "install.sh: ready (.venv/bin/wtbox)" >&2
