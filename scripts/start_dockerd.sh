#!/usr/bin/env bash
# Start dockerd unless a daemon already answers, and wait until `docker info` works.
# Used by .ci/run; safe to run any number of times. Exit 1 with one sentence on failure.
set -euo pipefail

LOG=${WTBOX_DOCKERD_LOG:-/tmp/dockerd.log}
TIMEOUT=${WTBOX_DOCKERD_TIMEOUT:-60}

if ! command -v dockerd >/dev/null || ! command -v docker >/dev/null; then
    echo "start_dockerd: docker is not installed (apt-get install docker.io)." >&2
    exit 1
fi
if timeout 10 docker info >/dev/null 2>&1; then
    exit 0
fi
# A daemon killed by a previous run leaves its pid file behind, and dockerd refuses to start.
if [ -f /var/run/docker.pid ] && ! kill -0 "$(cat /var/run/docker.pid)" 2>/dev/null; then
    rm -f /var/run/docker.pid
fi
if ! pgrep -x dockerd >/dev/null; then
    # setsid: the daemon must outlive this script and the shell that ran it.
    setsid dockerd >>"$LOG" 2>&1 < /dev/null &
fi
for _ in $(seq 1 "$((TIMEOUT * 4))"); do
    if timeout 5 docker info >/dev/null 2>&1; then
        echo "start_dockerd: dockerd is up." >&2
        exit 0
    fi
    sleep 0.25
done
echo "start_dockerd: dockerd did not answer within ${TIMEOUT}s; see $LOG." >&2
exit 1
