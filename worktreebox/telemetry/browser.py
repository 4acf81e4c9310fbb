"""A headless Chromium per box: start, find, stop; load a page through it; compare screenshots.

Chromium is the Debian package's binary, started by wtbox itself as a box process (WTBOX_ID and
WTBOX_BOX_DIR in its environment, its own session, its profile under boxes/<id>/browser/), so
teardown and `gc` find it like any other process of the box. Pages are driven with Playwright's
Python package attached over the DevTools protocol (`connect_over_cdp`): a kept library for
navigation, console and network events and screenshots, and no browser download, because it
attaches to the Chromium we started instead of launching its own.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from worktreebox import settings
from worktreebox.errors import UsageError, WtboxError
from worktreebox.system import cgroups, procs, readiness, unixsock
from worktreebox.system.fsutil import atomic_write, file_lock
from worktreebox.telemetry.exposition import exposition
from worktreebox.telemetry.logs.writer import LogWriter
from worktreebox.telemetry.vmclient import Client

BINARY = "chromium"
PACKAGE = "chromium"  # the Debian package that ships the binary
ENV_BINARY = settings.CHROMIUM.name  # overrides the binary (a test points it at a missing one)
DIR = "browser"  # boxes/<id>/browser: profile/, and the HOME, caches and temp files Chromium writes
PID_FILE = "browser.pid"  # in run/, next to the other pid files
LOG_FILE = "browser.log"
COUNTERS_FILE = "counters.json"
SERVICE = "browser"  # the service name of browse records in the box's logs
DEFAULT_VIEWPORT = (1280, 800)
START_TIMEOUT = 30.0

# --headless without a display, --no-sandbox because wtbox runs as root (Chromium refuses the
# sandbox for root), and everything that phones home switched off: this host has no network
# beyond loopback, and a Chromium retrying its update and sync servers costs CPU in every box.
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--disable-breakpad",
    "--disable-dev-shm-usage",  # /dev/shm in containers is small; shared memory goes to TMPDIR
    "--mute-audio",
    # No initial about:blank tab: its renderer is ~90 MB of PSS that no browse uses (each browse
    # opens its own context and page); the browser keeps running without a window when headless.
    "--no-startup-window",
    "--remote-debugging-address=127.0.0.1",
]


# ---------------------------------------------------------------- where things are


def browser_dir(box_dir: Path) -> Path:
    return Path(box_dir) / DIR


def profile_dir(box_dir: Path) -> Path:
    return browser_dir(box_dir) / "profile"


def cdp_url(port: int) -> str:
    """The DevTools endpoint an agent's tooling attaches to (Playwright connect_over_cdp, DevTools MCP)."""
    return f"http://127.0.0.1:{port}"


def find_chromium() -> str:
    """Path of the Chromium binary ($WTBOX_CHROMIUM, else `chromium` on PATH), or an error naming the package."""
    override = settings.CHROMIUM.value()
    if override:
        path = shutil.which(override)
        if not path:
            raise WtboxError(f"{ENV_BINARY}={override} is not an executable; install the Debian package "
                             f"`{PACKAGE}` (apt-get install {PACKAGE}) or point {ENV_BINARY} at a Chromium binary.")
        return path
    path = shutil.which(BINARY)
    if not path:
        raise WtboxError(f"Chromium is not installed; install the Debian package `{PACKAGE}` "
                         f"(apt-get install {PACKAGE}) or point {ENV_BINARY} at a Chromium binary.")
    return path


def check() -> dict[str, Any]:
    """`wtbox doctor`'s line: optional, since only `wtbox browse` and `[browser] enabled` need it."""
    try:
        detail = find_chromium()
    except WtboxError:
        detail = f"not installed; `wtbox browse` needs it: apt-get install {PACKAGE}"
    return {"check": "chromium (optional)", "ok": True, "detail": detail}


def chromium_command(binary: str, port: int, box_dir: Path) -> list[str]:
    return [binary, *FLAGS, f"--remote-debugging-port={port}", f"--user-data-dir={profile_dir(box_dir)}"]


# ---------------------------------------------------------------- the process


def spawn(box_id: str, box_dir: Path, port: int, *, launcher: procs.Launcher | None = None,
          owner: tuple[int, int] | None = None) -> int:
    """Start the box's Chromium detached, as a process of the box (through its `launcher`: in a
    sandboxed box, as its user, its DevTools on the box's own `port`); its pid, without waiting.

    The one place a Chromium is started, so that placing it in the box's cgroup is one change.
    Its HOME and XDG dirs (and TMPDIR when the path allows) point into boxes/<id>/browser, so
    nothing it writes (crash database, caches, shared-memory files) outlives the box.
    """
    binary = find_chromium()
    base = browser_dir(box_dir)
    for sub in ("profile", "home", "cache", "config", "tmp"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    if owner is not None:  # the box's user writes its profile
        from worktreebox.system.users import give_tree

        give_tree(base, *owner)
    run_dir = Path(box_dir) / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WTBOX_")}
    env.update({"WTBOX_ID": box_id, "WTBOX_BOX_DIR": str(box_dir), "HOME": str(base / "home"),
                "XDG_CACHE_HOME": str(base / "cache"), "XDG_CONFIG_HOME": str(base / "config")})
    # Chromium's singleton socket lives in $TMPDIR/org.chromium.Chromium.XXXXXX/SingletonSocket, and
    # a unix socket path has at most 107 bytes: a deep box dir keeps the caller's TMPDIR (Chromium
    # removes that folder when it exits on SIGTERM, which is how it is always stopped first).
    if len(str(base / "tmp")) + len("/org.chromium.Chromium.XXXXXX/SingletonSocket") <= unixsock.SUN_PATH_MAX:
        env["TMPDIR"] = str(base / "tmp")
    log_path = run_dir / LOG_FILE
    log_path.write_bytes(b"")  # this start's output only: the error message quotes its last line
    home = Path(box_dir).parent.parent  # boxes/<id> lies under the home
    argv = (launcher or procs.Launcher()).command(chromium_command(binary, port, box_dir), base)
    pid = procs.spawn_detached(argv, env=env, log_path=log_path, cwd=base,
                               cgroup=cgroups.Leaf(home, box_id, cgroups.BROWSER))
    (run_dir / PID_FILE).write_text(f"{pid}\n")
    return pid


def wait_ready(box_id: str, box_dir: Path, pid: int, port: int, timeout: float = START_TIMEOUT,
               inside: int | None = None) -> None:
    """Wait until the Chromium `pid` itself listens on its DevTools port (not some other process).
    In a sandboxed box (`inside`: its port in the box's own network, reached on `port` through the
    box's forward) only the box's processes can hold it, and their sockets are not seen from here."""
    log_path = Path(box_dir) / "run" / LOG_FILE
    # The cheap HTTP check first; then make sure it is our Chromium that answered.
    ready: readiness.Strategy = readiness.HttpUrl(f"{cdp_url(port)}/json/version", status=200)
    if inside is None:
        ready = ready & readiness.HoldsPort(port, lambda: [pid])
    why = readiness.wait(ready, timeout, alive=readiness.process_alive(pid), poll=0.02)
    if why == readiness.EXITED:
        raise WtboxError(f"Chromium for box {box_id} exited at start ({_last_line(log_path)}).")
    if why == readiness.TIMEOUT:
        stop(box_id, box_dir)
        raise WtboxError(f"Chromium for box {box_id} did not open its DevTools port {port} within "
                         f"{timeout:.0f} s ({_last_line(log_path)}).")


def start(box_id: str, box_dir: Path, port: int, timeout: float = START_TIMEOUT, *, inside: int | None = None,
          launcher: procs.Launcher | None = None, owner: tuple[int, int] | None = None) -> int:
    """Start the box's Chromium and wait until its DevTools endpoint answers on `port`; returns its pid."""
    pid = spawn(box_id, box_dir, inside or port, launcher=launcher, owner=owner)
    wait_ready(box_id, box_dir, pid, port, timeout, inside=inside)
    return pid


def running(box_id: str, box_dir: Path, port: int, *, sandboxed: bool = False) -> bool:
    """The Chromium named by the box's pid file is alive, ours, and listening on `port` (in a
    sandboxed box: answering on `port`, its forward)."""
    p = procs.from_pid_file(Path(box_dir) / "run" / PID_FILE, box_id, None)
    if p is None or sandboxed:
        return p is not None and readiness.HttpUrl(f"{cdp_url(port)}/json/version", status=200).ready(1.0)
    return procs.tree_listens_on(p.pid, port)


def find_processes(box_id: str, box_dir: Path) -> list[Any]:
    """Every live process of the box's Chromium: the browser, its zygotes, renderers and helpers.

    Chromium's zygote clears the environment of what it forks, so WTBOX_ID alone misses the
    renderers; they all carry the profile dir on their command line, which names the box as well.
    """
    found = procs.find_mentioning(str(browser_dir(box_dir)) + os.sep)
    own = procs.from_pid_file(Path(box_dir) / "run" / PID_FILE, box_id, None)
    if own is not None and own.pid not in {p.pid for p in found}:
        found.append(own)
    return found


def stop(box_id: str, box_dir: Path, wait: float | None = None) -> list[int]:
    """Staged stop (SIGTERM, wait, SIGKILL) of the box's Chromium; returns the pids that were running."""
    found = find_processes(box_id, box_dir)
    # The browser process first: on SIGTERM it ends its children itself, which is cleaner than
    # signalling renderers while it tears them down; whatever is left then gets its own staged stop.
    main = [p for p in found if not any(a.startswith("--type=") for a in procs.cmdline(p.pid))]
    if main:
        procs.stop_processes(main, wait)
    rest = find_processes(box_id, box_dir)
    if rest:
        procs.stop_processes(rest, wait)
    (Path(box_dir) / "run" / PID_FILE).unlink(missing_ok=True)
    return sorted(p.pid for p in found)


def live_box_ids(boxes_dir: Path) -> set[str]:
    """Box ids of live Chromium processes whose profile (boxes/<id>/browser/profile) lies under
    this home's boxes dir: what a crash can leave behind."""
    roots = {f"{os.path.realpath(boxes_dir)}{os.sep}", f"{boxes_dir}{os.sep}"}
    ids = set()
    for p in procs.find_mentioning(f"{os.sep}{DIR}{os.sep}profile"):
        for a in procs.cmdline(p.pid):
            profile = a.partition("--user-data-dir=")[2]
            for root in roots:
                parts = profile[len(root):].split(os.sep) if profile.startswith(root) else []
                if len(parts) == 3 and parts[0] and parts[1:] == [DIR, "profile"]:
                    ids.add(parts[0])
    return ids


def memory(box_id: str, box_dir: Path) -> dict[str, int]:
    """RSS, PSS and USS in bytes summed over the box's Chromium processes."""
    return procs.memory_of(find_processes(box_id, box_dir))


def _last_line(path: Path) -> str:
    """The last line of Chromium's output that says something (its D-Bus complaints never do)."""
    return procs.last_line(path, noise=lambda line: "dbus" in line.lower())


# ---------------------------------------------------------------- loading a page


@dataclasses.dataclass
class PageOptions:
    viewport: tuple[int, int] = DEFAULT_VIEWPORT
    full_page: bool = False
    wait_for: str | None = None  # a CSS selector, or "networkidle"
    timeout: float = 30.0
    screenshot: bool = True  # False: skip the PNG (~0.2 s) when nobody asked for one


class PageTimeout(WtboxError):
    """The page did not finish loading in time; `result` holds what was seen until then."""

    def __init__(self, message: str, result: dict[str, Any]) -> None:
        super().__init__(message)
        self.result = result


class PageFailed(WtboxError):
    """The page could not be loaded at all (connection refused, DNS); `result` holds what was seen."""

    def __init__(self, message: str, result: dict[str, Any]) -> None:
        super().__init__(message)
        self.result = result


def parse_viewport(text: str) -> tuple[int, int]:
    """'1280x800' → (1280, 800)."""
    w, sep, h = text.lower().partition("x")
    if not sep or not w.isdigit() or not h.isdigit() or not (100 <= int(w) <= 8000 and 100 <= int(h) <= 8000):
        raise UsageError(f"--viewport {text!r}: expected WIDTHxHEIGHT such as 1280x800 (100 to 8000 each).")
    return int(w), int(h)


class Driver:
    """Playwright's driver (a node process), started on first use and reused for every page of one
    command. Started lazily so that a cold Chromium and the driver start at the same time."""

    def __init__(self) -> None:
        self._cm: Any = None
        self.pw: Any = None

    def start(self) -> None:
        if self.pw is None:
            from playwright.sync_api import sync_playwright

            self._cm = sync_playwright()
            self.pw = self._cm.start()

    def attach(self, cdp: str, timeout: float = 10.0) -> Any:
        from playwright.sync_api import Error

        self.start()
        try:
            return self.pw.chromium.connect_over_cdp(cdp, timeout=timeout * 1000)
        except Error as e:
            raise WtboxError(f"Could not attach to the Chromium at {cdp} ({_first_line(e)}).") from None

    def close(self) -> None:
        if self._cm is None:
            return
        try:
            self._cm.__exit__(None, None, None)
        except Exception:  # the driver is gone already: nothing left to stop
            pass
        self._cm = self.pw = None

    def __enter__(self) -> Driver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_page(browser: Any, url: str, opts: PageOptions) -> tuple[dict[str, Any], bytes | None]:
    """Load `url` in a fresh context of `browser`; (result, PNG bytes). Raises PageTimeout/PageFailed
    with the partial result when the page does not load."""
    from playwright.sync_api import Error
    from playwright.sync_api import TimeoutError as PwTimeout

    console: list[dict[str, str]] = []
    failed: list[dict[str, Any]] = []
    result: dict[str, Any] = {"url": url, "requested_url": url, "status": None, "title": None,
                              "load_seconds": None, "console": console, "failed_requests": failed,
                              "viewport": {"width": opts.viewport[0], "height": opts.viewport[1]}}
    context = browser.new_context(viewport={"width": opts.viewport[0], "height": opts.viewport[1]})
    try:
        page = context.new_page()

        def on_console(msg: Any) -> None:
            level = {"warning": "warning", "error": "error"}.get(msg.type)
            if not level:
                return
            source = (msg.location or {}).get("url") or ""
            if source.endswith("/favicon.ico"):
                return  # the browser's own request, not the page's: every app without an icon would "fail"
            console.append({"level": level, "text": msg.text, **({"source": source} if source else {})})

        def on_page_error(err: Any) -> None:  # an uncaught exception is what an agent most needs to see
            console.append({"level": "error", "text": f"Uncaught {_first_line(err)}"})

        def on_response(resp: Any) -> None:
            if resp.status >= 400:
                failed.append({"url": resp.url, "status": resp.status})

        def on_failed(req: Any) -> None:
            failed.append({"url": req.url, "status": None, "error": req.failure or "failed"})

        page.on("console", on_console)
        page.on("pageerror", on_page_error)
        page.on("response", on_response)
        page.on("requestfailed", on_failed)
        networkidle = opts.wait_for == "networkidle"
        t0 = time.perf_counter()
        deadline = t0 + opts.timeout
        try:
            resp = page.goto(url, wait_until="networkidle" if networkidle else "load", timeout=opts.timeout * 1000)
            if opts.wait_for and not networkidle:
                left = max(0.001, deadline - time.perf_counter())
                page.wait_for_selector(opts.wait_for, state="visible", timeout=left * 1000)
        except PwTimeout:
            result["load_seconds"] = round(time.perf_counter() - t0, 3)
            result["url"] = page.url if page.url != "about:blank" else url
            what = f"{opts.wait_for!r} to appear" if opts.wait_for and not networkidle else "it to load"
            raise PageTimeout(f"{url} did not load within {opts.timeout:g} s (waited for {what}).", result) from None
        except Error as e:
            result["load_seconds"] = round(time.perf_counter() - t0, 3)
            raise PageFailed(f"Could not load {url} ({_first_line(e)}); is the box's service running?",
                             result) from None
        result["load_seconds"] = round(time.perf_counter() - t0, 3)
        result["url"] = page.url
        result["status"] = resp.status if resp is not None else None
        result["title"] = page.title()
        png = page.screenshot(full_page=opts.full_page, type="png") if opts.screenshot else None
        return result, png
    finally:
        try:
            context.close()
        except Exception:  # the browser went away mid-load: nothing left to close
            pass


def _first_line(e: object) -> str:
    text = str(e).strip()
    # Playwright errors carry a call log after the first line; the first line says what happened.
    first = text.splitlines()[0] if text else type(e).__name__
    return first.removeprefix("Error: ").strip().rstrip(".")[:300]


# ---------------------------------------------------------------- writing results


def check_writable(path: str | Path, what: str = "--screenshot") -> Path:
    """A path we can write a PNG to (its directory exists and is writable), else a UsageError."""
    p = Path(path).expanduser()
    parent = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise UsageError(f"{what} {path}: is a directory; give a file name such as shot.png.")
    if not parent.is_dir():
        raise UsageError(f"{what} {path}: the directory {parent} does not exist.")
    if not os.access(parent, os.W_OK | os.X_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise UsageError(f"{what} {path}: cannot be written (permission denied).")
    return p.absolute()


def write_png(path: Path, data: bytes) -> None:
    """Write atomically (a reader never sees half a PNG); a failure is one sentence."""
    try:
        atomic_write(path, data)
    except OSError as e:
        raise WtboxError(f"Could not write {path} ({e.strerror or e}).") from None


def diff_images(png_a: bytes, png_b: bytes) -> tuple[float, bytes]:
    """(changed-pixel ratio 0..1, PNG of the difference): changed pixels red over a faded copy of A.

    Images of different sizes are compared on the larger canvas; pixels outside one of them count as
    changed. Any difference in any channel counts: both shots come from the same Chromium build
    with software rendering, so an unchanged page renders to identical pixels.
    """
    from PIL import Image, ImageChops

    a = Image.open(io.BytesIO(png_a)).convert("RGB")
    b = Image.open(io.BytesIO(png_b)).convert("RGB")
    size = (max(a.width, b.width), max(a.height, b.height))
    if a.size != size or b.size != size:
        a, b = _pad(a, size), _pad(b, size)
    diff = ImageChops.difference(a, b)
    r, g, bl = diff.split()
    mask = ImageChops.lighter(ImageChops.lighter(r, g), bl).point(lambda v: 255 if v else 0)
    changed = mask.histogram()[255]
    ratio = changed / (size[0] * size[1])
    faded = Image.blend(a.convert("L").convert("RGB"), Image.new("RGB", size, "white"), 0.7)
    red = Image.new("RGB", size, (255, 0, 0))
    out = Image.composite(red, faded, mask)
    buf = io.BytesIO()
    out.save(buf, format="PNG")
    return round(ratio, 6), buf.getvalue()


def _pad(img: Any, size: tuple[int, int]) -> Any:
    from PIL import Image

    canvas = Image.new("RGB", size, (255, 0, 255))  # a colour no page region matches by accident
    canvas.paste(img, (0, 0))
    return canvas


def record(box_id: str, box_dir: Path, result: dict[str, Any], path: str, metrics_url: str | None,
           error: str | None = None) -> bool:
    """Write console errors/warnings and failed requests to logs/browser.jsonl and push the counts
    and the load time to the box's VictoriaMetrics. Returns whether the metrics were pushed."""
    writer = LogWriter(Path(box_dir) / "logs", SERVICE)
    try:
        url = result.get("url") or result.get("requested_url")
        for m in result.get("console", []):
            writer.write("console", m["level"], m["text"], url=m.get("source") or url)
        for r in result.get("failed_requests", []):
            why = f"HTTP {r['status']}" if r.get("status") else (r.get("error") or "failed")
            writer.write("network", "error", f"{why} {r['url']}", url=r["url"], status=r.get("status"))
        if error:
            writer.write("page", "error", error, url=url)
        else:
            writer.write("page", "info", f"loaded {url}: status {result.get('status')} in "
                                          f"{result.get('load_seconds')} s", url=url)
    finally:
        writer.close()
    if not metrics_url:
        return False
    errors = sum(1 for m in result.get("console", []) if m["level"] == "error")
    totals = _add_counts(box_dir, path, errors, len(result.get("failed_requests", [])))
    labels = {"box": box_id, "path": path}
    samples = [("wtbox_browser_console_errors_total", labels, totals["console_errors"]),
               ("wtbox_browser_failed_requests_total", labels, totals["failed_requests"])]
    if result.get("load_seconds") is not None and not error:
        samples.append(("wtbox_browser_page_load_seconds", labels, result["load_seconds"]))
    try:
        client = Client(metrics_url, box_id=box_id, timeout=5.0)
        client.push_prometheus(exposition(samples, timestamp_ms=int(time.time() * 1000)))
        client.flush()
    except WtboxError:
        return False
    return True


def _add_counts(box_dir: Path, path: str, console_errors: int, failed_requests: int) -> dict[str, int]:
    """Cumulative counts per path, kept in boxes/<id>/browser/counters.json (counters never go down)."""
    f = browser_dir(box_dir) / COUNTERS_FILE
    with file_lock(f.with_name(".counters.lock"), what="the browser counters"):
        try:
            data = json.loads(f.read_text())
        except (OSError, ValueError):
            data = {}
        cur = data.setdefault(path, {"console_errors": 0, "failed_requests": 0})
        cur["console_errors"] += console_errors
        cur["failed_requests"] += failed_requests
        atomic_write(f, json.dumps(data))
        return dict(cur)
