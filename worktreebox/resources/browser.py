"""The browser resource: with `[browser] enabled = true`, one headless Chromium for the box's lifetime.

create(): the `browser` (DevTools) port was leased with the box's other ports; start Chromium on it
(in parallel with the checkout) and export WTBOX_CDP_URL, so an agent's own tooling attaches to
this box's browser and no other. destroy(): staged stop of every Chromium process of the box.
discover(): live Chromiums whose profile lies under this home, which a crash may have left.

`session()` hands `wtbox browse` a DevTools endpoint: the box's running Chromium (warm), or one
started for that command on a port leased for it, stopped and given back afterwards (cold).
"""
from __future__ import annotations

import contextlib
import dataclasses
import shutil
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from worktreebox.errors import WtboxError
from worktreebox.resources import metrics, ports
from worktreebox.resources.base import Creation, Resource
from worktreebox.system.fsutil import file_lock
from worktreebox.telemetry import browser as chromium

if TYPE_CHECKING:
    from worktreebox.box import Box
    from worktreebox.context import HostContext

LOCK_FILE = "browser.lock"  # in run/: one Chromium start at a time per box


class Browser(Resource):
    name = "browser"
    parallel = True  # needs only its leased port and the box dir: starts while the worktree is made

    def create(self, c: Creation) -> None:
        if not c.config.browser.enabled:
            return
        box = c.box
        port, inside = box.ports["browser"], box.inside_ports["browser"]
        url = chromium.cdp_url(port)
        # Recorded before the start, so a failed `new` still finds and stops what was started.
        box.data[self.name] = {"enabled": True, "port": port, "cdp_url": url}
        c.note(f"starting Chromium (DevTools on port {port})")
        c.wait_for("sandbox")  # a process of the box: in its sandbox
        _start(box, port, inside)
        c.env["WTBOX_CDP_URL"] = chromium.cdp_url(inside)
        c.facts["browser"] = {"cdp_url": chromium.cdp_url(inside), "port": inside}

    def destroy(self, host: HostContext, box: Box) -> None:
        # Chromium is only ever started after its profile's folder is made: none, nothing to look for
        # (browser/ alone is no sign: a sandboxed box has it from its start, bound into its sandbox).
        if chromium.profile_dir(box.dir).exists() or (box.run_dir / chromium.PID_FILE).exists():
            chromium.stop(box.id, box.dir)
        shutil.rmtree(chromium.browser_dir(box.dir), ignore_errors=True)
        for name in (chromium.LOG_FILE, LOCK_FILE):
            (box.run_dir / name).unlink(missing_ok=True)

    def discover(self, host: HostContext) -> set[str]:
        return chromium.live_box_ids(Path(host.boxes_dir))

    def checks(self, host: HostContext) -> list[dict[str, Any]]:
        return [chromium.check()]

    def status(self, host: HostContext, box: Box) -> dict[str, Any] | None:
        data = box.data.get(self.name)
        if not data:
            return None
        running = chromium.running(box.id, box.dir, data["port"], sandboxed=_owner(box) is not None)
        return {"browser": {"cdp_url": data["cdp_url"], "running": running}}


# ---------------------------------------------------------------- a DevTools endpoint for one command


@dataclasses.dataclass
class Session:
    """A Chromium a command may drive: `ready()` waits for a cold start (nothing to wait for when warm)."""

    box_id: str
    cdp_url: str
    warm: bool
    _wait: Callable[[], None] = lambda: None

    def ready(self) -> None:
        self._wait()


@contextlib.contextmanager
def session(host: HostContext, box: Box, progress: Callable[[str], None] = lambda m: None) -> Iterator[Session]:
    """The box's running Chromium, or one started now and stopped when the block ends.

    The cold start is not waited for here: the caller starts Playwright's driver meanwhile and then
    calls `ready()`, so the two starts overlap.
    """
    data = box.data.get("browser") or {}
    lock = box.run_dir / LOCK_FILE
    if data.get("enabled"):
        port = data["port"]
        inside = box.inside_ports.get("browser", port)
        with file_lock(lock, what=f"the browser of {box.id}"):
            names = _names(host, box)
            if not any(chromium.running(i, d, port, sandboxed=_owner(box) is not None) for i, d in names):
                progress(f"the Chromium of {box.id} is not running; starting it again")
                for i, d in names:
                    chromium.stop(i, d)
                _start(box, port, inside)
        yield Session(box.id, chromium.cdp_url(port), warm=True)
        return
    # Cold: one at a time per box (they share the profile dir); a leftover of a killed browse
    # (its Chromium, its lease) is reused or ended here, and `rm` ends it in any case.
    from worktreebox.config.values import INSIDE_PORTS
    from worktreebox.providers import sandbox
    from worktreebox.resources.sandbox import forwarded

    with file_lock(lock, what=f"the browser of {box.id}"):
        port = host.registry.ports_of(box.id).get("browser") or ports.lease(host, box.id, ["browser"])["browser"]
        inside = INSIDE_PORTS["browser"] if sandbox.sandboxed(box) else port
        try:
            if chromium.browser_dir(box.dir).exists():
                chromium.stop(box.id, box.dir)
            with forwarded(box, "browser", port, inside):
                pid = chromium.spawn(box.id, box.dir, inside, launcher=host.launcher(box), owner=_owner(box))
                seen = inside if sandbox.sandboxed(box) else None
                yield Session(box.id, chromium.cdp_url(port), warm=False,
                              _wait=lambda: chromium.wait_ready(box.id, box.dir, pid, port, inside=seen))
        finally:
            chromium.stop(box.id, box.dir)
            host.registry.delete_lease(box.id, "browser")


def _start(box: Box, port: int, inside: int) -> None:
    from worktreebox.providers import sandbox

    owner = _owner(box)
    chromium.start(box.id, box.dir, port, inside=inside if owner is not None else None,
                   launcher=sandbox.launcher_for(box), owner=owner)


def _owner(box: Box) -> tuple[int, int] | None:
    from worktreebox.providers import sandbox

    return sandbox.provider_of(box).box_user() if sandbox.sandboxed(box) else None


def _names(host: HostContext, box: Box) -> list[tuple[str, Path]]:
    """(id, dir) the box's Chromium may run under: its own, and, for a box claimed from the warm
    pool, the pool name it was started under (WTBOX_ID and profile path keep that name)."""
    alias = box.under_alias()
    return [(box.id, box.dir)] + ([(alias.id, alias.dir)] if alias is not None else [])


def browse(host: HostContext, box: Box, url: str, opts: chromium.PageOptions, driver: chromium.Driver,
           progress: Callable[[str], None] = lambda m: None) -> tuple[dict[str, Any], bytes | None]:
    """Load `url` in the box's Chromium; record console errors and failed requests in the box's logs
    and metrics (also when the page never loads); (result, PNG bytes)."""
    path = urllib.parse.urlsplit(url).path or "/"
    url = ports.seen_inside(box, url)  # the box's Chromium loads what its processes see
    metrics_url = (box.data.get("metrics") or {}).get("url")
    if metrics_url:
        with contextlib.suppress(WtboxError):  # the load is recorded there; if it cannot be, the record says so
            metrics.wake(box)
    with session(host, box, progress) as s:
        driver.start()  # while a cold Chromium starts
        s.ready()
        browser = driver.attach(s.cdp_url)
        try:
            result, png = chromium.load_page(browser, url, opts)
        except (chromium.PageTimeout, chromium.PageFailed) as e:
            e.result.update(box=box.id, warm=s.warm)
            e.result["recorded"] = chromium.record(box.id, box.dir, e.result, path, metrics_url, error=str(e))
            raise
        finally:
            _detach(browser)
    result.update(box=box.id, warm=s.warm)
    result["recorded"] = chromium.record(box.id, box.dir, result, path, metrics_url)
    return result, png


def _detach(browser: Any) -> None:
    """Drop Playwright's connection; for a browser attached over CDP this leaves Chromium running."""
    try:
        browser.close()
    except Exception:  # Chromium is gone already (stopped, crashed): nothing to detach from
        pass


def snapshot(host: HostContext, box: Box, url: str, png_path: Path,
             opts: chromium.PageOptions | None = None) -> dict[str, Any]:
    """One browse for a comparison row (`fanout --browse`): the screenshot goes to `png_path`; a page
    that fails to load is a field of the row, not an exception."""
    opts = opts or chromium.PageOptions()
    row: dict[str, Any] = {"url": url, "screenshot": None, "console_errors": None, "failed_requests": None}
    try:
        with chromium.Driver() as driver:  # one per call: Playwright's sync API is per thread
            result, png = browse(host, box, url, opts, driver)
        assert png is not None  # opts.screenshot
        png_path.parent.mkdir(parents=True, exist_ok=True)
        chromium.write_png(png_path, png)
        row["screenshot"] = str(png_path)
    except (chromium.PageTimeout, chromium.PageFailed) as e:
        result = e.result
        row["error"] = str(e)
    except WtboxError as e:
        row["error"] = str(e)
        return row
    row.update(status=result.get("status"), load_seconds=result.get("load_seconds"),
               console_errors=sum(1 for m in result["console"] if m["level"] == "error"),
               failed_requests=len(result["failed_requests"]))
    return row
