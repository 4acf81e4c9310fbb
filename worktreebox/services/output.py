"""The services' output: written by each service into files in memory that outlive the supervisor,
turned into log records by the supervisor.

Why not pipes: a pipe needs a reader that outlives the supervisor (a service whose supervisor was
killed must neither block on a full pipe nor die of SIGPIPE), which took a forked keeper process
per box: 15.8 MB RSS / 9.7 MB PSS each, measured with 10 boxes (issue 27). Here a service's stdout
and stderr are files opened O_APPEND in the box's directory on tmpfs (system/appendfiles.py): a
write never blocks and never fails for want of a reader, and what a service writes while no
supervisor runs waits in memory; the next supervisor logs it first. Raw output may hold secrets:
the files are 0600 in a 0700 directory in memory, and consumed output is punched out at once.

One thread follows every file of the box: it sleeps in select() on the directory's watch (dnotify),
woken by writes only (0.3 s while a traceback waits for its end, as `pump` does for a pipe).
"""
from __future__ import annotations

import os
import select
import threading
from collections.abc import Callable
from pathlib import Path

from worktreebox.system import appendfiles
from worktreebox.telemetry.logs.writer import LogWriter

STREAMS = ("stdout", "stderr")
CHUNK = 1 << 16  # also the longest line: an endless one is cut rather than grown without bound
TRACEBACK_QUIET = 0.3  # a traceback with nothing after it is written once output was quiet this long


class Stream:
    """One followed file: where reading stopped, the unfinished last line, the writer it feeds."""

    def __init__(self, path: Path, stream: str, writer: LogWriter) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)  # RDWR: punching holes writes
        self.offset = appendfiles.start_of_data(self.fd)  # past what a dead predecessor consumed
        self.stream, self.writer = stream, writer
        self.partial = b""
        self.lock = threading.Lock()
        self.held = False  # a new process's output waits for its start event (Output.files_for)

    def read(self) -> None:
        """Feed every complete line appended since the last read, then free what was read (only
        then: punching a hole is itself a modification the watch reports, which would wake us again)."""
        with self.lock:
            if self.held:
                return
            start = self.offset
            while data := os.pread(self.fd, CHUNK, self.offset):
                self.offset += len(data)
                self._lines(data)
            if self.offset > start:
                appendfiles.release(self.fd, self.offset)

    def _lines(self, data: bytes) -> None:
        *lines, self.partial = (self.partial + data).split(b"\n")
        if len(self.partial) >= CHUNK:
            lines.append(self.partial)
            self.partial = b""
        for raw in lines:
            self.writer.line(self.stream, raw.decode("utf-8", "replace"))

    def finish(self) -> None:
        """The writing process ended: everything, the unfinished last line too, goes to the log."""
        self.held = False
        self.read()
        with self.lock:
            if self.partial:
                self.writer.line(self.stream, self.partial.decode("utf-8", "replace"))
                self.partial = b""
        self.writer.flush(self.stream)

    def close(self) -> None:
        self.finish()
        os.close(self.fd)


class Output:
    """The followed output files of one box's services (see the module's doc)."""

    def __init__(self, directory: Path, writer_for: Callable[[str], LogWriter]) -> None:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.dir, self.writer_for = directory, writer_for
        self.streams: dict[str, Stream] = {}  # file name (<service>.<stream>) → Stream
        self._lock = threading.Lock()
        self._watch = appendfiles.Watch(directory)
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC)
        self._closed = False
        for name in sorted(os.listdir(directory)):  # what was written while no supervisor ran
            service, _, stream = name.rpartition(".")
            if stream in STREAMS and service:
                self._stream(service, stream).read()
        self.thread = threading.Thread(target=self._follow, name="output", daemon=True)
        self.thread.start()

    def files_for(self, service: str) -> tuple[int, int]:
        """The stdout and stderr of a new process of `service`: write ends the caller closes once
        the process started (close-on-exec: only that process gets them, as its fds 1 and 2).
        What it writes is logged once the caller called `started` (its start event goes first)."""
        fds = []
        for stream in STREAMS:
            s = self._stream(service, stream)
            s.read()  # what an earlier process left, before the new one's start event
            with s.lock:
                s.writer = self.writer_for(service)  # the service's writer of now (its redactor)
                s.held = True
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
            fds.append(os.open(self.dir / f"{service}.{stream}", flags, 0o600))
        return fds[0], fds[1]

    def started(self, service: str) -> None:
        """The new process's start event is written: log its output from now on."""
        for stream in STREAMS:
            s = self.streams.get(f"{service}.{stream}")
            if s is not None:
                s.held = False
                s.read()

    def finish(self, service: str) -> None:
        """A process of `service` exited: log all it wrote (its exit event comes after)."""
        for stream in STREAMS:
            s = self.streams.get(f"{service}.{stream}")
            if s is not None:
                s.finish()

    def close(self) -> None:
        """Stop following; what is in the files now is logged."""
        self._closed = True
        os.write(self._wake_w, b"x")
        self.thread.join(5)
        with self._lock:
            for s in self.streams.values():
                s.close()
            self.streams.clear()
        self._watch.close()
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)

    def _stream(self, service: str, stream: str) -> Stream:
        name = f"{service}.{stream}"
        with self._lock:
            if name not in self.streams:
                self.streams[name] = Stream(self.dir / name, stream, self.writer_for(service))
            return self.streams[name]

    def _follow(self) -> None:
        while not self._closed:
            waiting = [s for s in list(self.streams.values()) if s.writer.pending(s.stream)]
            ready, _, _ = select.select([self._watch.fileno(), self._wake_r], [], [],
                                        TRACEBACK_QUIET if waiting else None)
            if not ready:
                for s in waiting:
                    s.writer.flush(s.stream)
                continue
            if self._watch.fileno() in ready:
                self._watch.drain()
                for changed in list(self.streams.values()):  # the wake-up names no file: a few preads
                    try:
                        changed.read()
                    except OSError:
                        pass


def directory(home: Path | str, box_id: str) -> Path:
    """Where a box's output files live: named like its cgroup (a claimed pool box keeps it)."""
    from worktreebox.system.cgroups import home_key, key_of

    return appendfiles.box_dir(home_key(home), key_of(box_id), Path(home) / "boxes" / box_id / "run" / "output")


def remove(directory: Path) -> None:
    """Delete a box's output files (rm, gc)."""
    import shutil

    shutil.rmtree(directory, ignore_errors=True)
