"""The output keeper of a box's detached programs (its backing services): their pipes into records.

    python -m worktreebox.telemetry.logs.keep LOGS_DIR NAME=OUT_FIFO,ERR_FIFO ...

The programs are started with stdout and stderr on FIFOs (providers/backing/native.py); this
process reads each and pumps it into logs/<NAME>.jsonl, the same records as the supervisor's
keeper writes, so `wtbox logs` shows them with the app's. It ignores SIGTERM: a staged stop
ends the programs, their FIFOs close, and it exits after writing the last lines. Its kernel
name is `wtbox-keeper`. Started once per box that has such programs: ~30 ms of CPU and ~12 MB
RSS (measured on the 2-core host).
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

from worktreebox.system import procfs
from worktreebox.telemetry.logs.writer import LogWriter, pump

NAME = "wtbox-keeper"


def keep(logs_dir: Path, pipes: dict[str, tuple[str, ...]]) -> None:
    """Pump every FIFO into its service's writer until all of them end."""
    threads = []
    writers = []
    for service, paths in pipes.items():
        writer = LogWriter(logs_dir, service)
        writers.append(writer)
        for path, stream in zip(paths, ("stdout", "stderr"), strict=False):
            t = threading.Thread(target=_read, args=(path, stream, writer), daemon=True)
            t.start()
            threads.append(t)
    for t in threads:
        t.join()
    for w in writers:
        w.close()


def _read(path: str, stream: str, writer: LogWriter) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)  # waits for the program's shell to open the other end
    except OSError:
        return
    pump(fd, stream, writer)


def parse_args(argv: list[str]) -> tuple[Path, dict[str, tuple[str, ...]]]:
    pipes = {}
    for arg in argv[1:]:
        name, _, paths = arg.partition("=")
        pipes[name] = tuple(p for p in paths.split(",") if p)
    return Path(argv[0]), pipes


def main(argv: list[str] | None = None) -> None:
    logs_dir, pipes = parse_args(sys.argv[1:] if argv is None else argv)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    procfs.name_self(NAME)
    keep(logs_dir, pipes)


if __name__ == "__main__":
    main()
