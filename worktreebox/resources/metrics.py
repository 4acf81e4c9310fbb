"""The metrics resource: a VictoriaMetrics per box (plus Vector when asked for and installed).

Runs in parallel with the worktree and the database, so it needs nothing but the box dir,
its leased `metrics` port and the facts the ports resource already set.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from worktreebox.config.assets import asset_path
from worktreebox.config.templating import render, render_file
from worktreebox.errors import ConfigError
from worktreebox.providers.metrics import every_store, store
from worktreebox.providers.metrics.native import LOG_FILE as STORE_LOG
from worktreebox.resources.base import Creation, Resource
from worktreebox.system import cgroups, procs
from worktreebox.telemetry import store_sleep
from worktreebox.telemetry.vmclient import healthy

if TYPE_CHECKING:
    from worktreebox.box import Box
    from worktreebox.context import HostContext
    from worktreebox.providers.metrics.base import MetricsStore

SCRAPE_FILE = "scrape.yml"
VECTOR_FILE = "vector.toml"
VECTOR_PID = "vector.pid"
VECTOR = "vector"
# Local targets are cheap to scrape; a short interval lets `wtbox metrics` show a change quickly.
SCRAPE_INTERVAL = "5s"


class Metrics(Resource):
    name = "metrics"
    phase = "metrics"
    parallel = True

    def create(self, c: Creation) -> None:
        obs = c.config.observability
        if not obs.enabled:
            return
        provider = obs.provider or getattr(c.host.config, "observability_provider", "native")
        box = c.box
        port, inside = box.ports["metrics"], box.inside_ports["metrics"]
        url, inside_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{inside}"
        box.run_dir.mkdir(parents=True, exist_ok=True)
        scrape = None
        targets = scrape_targets(c.config.services, facts=c.facts, source=c.config.source)
        if targets:
            scrape = box.run_dir / SCRAPE_FILE
            scrape.write_text(render_scrape_config(box.id, targets))
        # Recorded before the start, so a failed `new` still finds and destroys what was started.
        box.data[self.name] = {"url": url, "port": port, "provider": provider, "collector": "builtin",
                               "targets": [t["service"] for t in targets]}
        c.note(f"starting VictoriaMetrics ({provider}) on port {port}")
        launcher = in_box_network(c)
        store(c.host, provider).start(box, port, scrape_config=scrape, retention=obs.retention, inside=inside,
                                      launcher=launcher)
        if obs.collector == "vector":
            if shutil.which(VECTOR):
                start_vector(box, url, obs.victorialogs_url, vector_otlp(c),
                             cgroups.Leaf(c.host.home, box.id, cgroups.METRICS))
                box.data[self.name]["collector"] = "vector"
            else:
                c.note("`vector` is not on PATH; wtbox's built-in collector ships the box's logs and process metrics")
        c.env["WTBOX_METRICS_URL"] = inside_url  # what the box's processes reach (its own network's port)
        c.env["WTBOX_PROMETHEUS_REMOTE_WRITE_URL"] = inside_url + "/api/v1/write"
        c.facts["metrics"] = {"url": inside_url, "port": inside, "remote_write_url": inside_url + "/api/v1/write"}

    def destroy(self, host: HostContext, box: Box) -> None:
        data = box.data.get(self.name)
        stores = _stores_of(host, box)
        # Skip the process scan when nothing of ours was ever started (observability off):
        # VictoriaMetrics creates its storage dir first thing, and the pid files come with it.
        names = [*(n for s in stores for n in s.processes), VECTOR]
        pid_files = [*(f for s in stores for f in s.pid_files), VECTOR_PID]
        if data or box.metrics_dir.exists() or any((box.run_dir / f).exists() for f in pid_files):
            # The store's and Vector's detached processes in one staged stop (one wait, not two); a
            # sleeping store has none (and a supervisor that was waking it was stopped before this).
            procs.stop_named(box.id, run_dir=box.run_dir, names=names, pid_files=pid_files)
        for s in stores:
            s.remove(box)
        shutil.rmtree(box.metrics_dir, ignore_errors=True)
        for name in (SCRAPE_FILE, VECTOR_FILE, STORE_LOG, "vector.log", store_sleep.RECIPE, store_sleep.ASLEEP,
                     store_sleep.READ_STAMP, store_sleep.LOCK):
            (box.run_dir / name).unlink(missing_ok=True)
        shutil.rmtree(box.run_dir / "vector", ignore_errors=True)

    def discover(self, host: HostContext) -> set[str]:
        ids = {p.parent.name for p in Path(host.boxes_dir).glob("*/metrics") if p.is_dir()}
        stores = every_store(host)
        names = {VECTOR, *(n for s in stores for n in s.processes)}
        ids |= procs.named_box_ids(names, Path(host.boxes_dir))
        for s in stores:
            ids |= s.discover()
        return ids

    def status(self, host: HostContext, box: Box) -> dict[str, Any] | None:
        data = box.data.get(self.name)
        if not data:
            return None
        # A sleeping store is stopped on purpose while its box is quiet (store_sleep.py): not down.
        sleeping = store_sleep.asleep(box.run_dir)
        out = {"url": data["url"], "up": sleeping or healthy(data["url"], timeout=0.5), "asleep": sleeping,
               "provider": data.get("provider", "native"), "collector": data.get("collector", "builtin")}
        return {"metrics": out}


def wake(box: Box) -> None:
    """Make the box's store answer (before a query, a probe's record, a browse's): say it was read
    (the supervisor keeps it awake READ_LINGER), and start it again if it sleeps: through the box's
    supervisor, which runs in the box's network; from here for an unsandboxed box without one."""
    if not (box.data.get("metrics") or {}).get("url"):
        return
    store_sleep.stamp_read(box.run_dir)
    if not store_sleep.asleep(box.run_dir):
        return
    from worktreebox.errors import WtboxError
    from worktreebox.providers.sandbox import sandboxed
    from worktreebox.services import client, control

    if client.supervisor_pid(box) is not None:
        try:
            client.checked(client.control_request(box, control.WAKE_STORE, timeout=store_sleep.WAKE_TIMEOUT + 5))
            return
        except (OSError, ValueError) as e:
            if client.supervisor_pid(box) is not None:
                raise WtboxError(f"The metrics store of {box.id} sleeps and its supervisor could not start it "
                                 f"({str(e).rstrip('.')}).") from None
    if sandboxed(box):
        raise WtboxError(f"The metrics store of {box.id} sleeps and its supervisor is not running; "
                         f"'wtbox up {box.id}' starts both again.")
    store_sleep.box_store(box).wake(url=box.data["metrics"]["url"])


def in_box_network(c: Creation) -> procs.Launcher:
    """How wtbox's own helpers of a box start (its metrics store, its OTLP receiver): in a sandboxed
    box's network namespace, once the sandbox resource made it (it is made alongside), as root
    there (the box's firewall still holds them; its processes cannot see or signal them)."""
    from worktreebox.providers import sandbox

    c.wait_for("sandbox")
    if not sandbox.sandboxed(c.box):
        return procs.Launcher()
    from worktreebox.providers.sandbox.base import load

    return sandbox.provider_of(c.box).netns_launcher(load(c.box.run_dir), as_box_user=False)


def _stores_of(host: HostContext, box: Box) -> list[MetricsStore]:
    """The store the box recorded; for a `new` killed before it recorded one (no env_keys yet),
    every store, since its provider may have come from the repo's wtbox.toml; else the host's."""
    data = box.data.get("metrics") or {}
    if data.get("provider"):
        return [store(host, data["provider"])]
    if not data and "env_keys" not in box.data:
        return every_store(host)
    return [store(host)]


# ---------------------------------------------------------------- scrape config


def scrape_targets(services: dict[str, Any], *, facts: dict[str, Any],
                   source: str = "wtbox.toml") -> list[dict[str, Any]]:
    """Services with `metrics = URL`, their URL rendered with the box facts and split for the config."""
    import urllib.parse

    out = []
    for name, svc in services.items():
        if not svc.metrics:
            continue
        url = svc.metrics
        if "{" in url:
            url = render(url, facts, f"{source}: [services.{name}] metrics")
        u = urllib.parse.urlsplit(url)
        if u.scheme not in ("http", "https") or not u.netloc:
            raise ConfigError(f"{source}: [services.{name}] metrics: expected an http:// URL such as "
                              f"\"http://127.0.0.1:{{{{ ports.web }}}}/metrics\", got {url!r}.")
        params = urllib.parse.parse_qs(u.query)  # name → [values], as the scrape config wants
        out.append({"service": name, "scheme": u.scheme, "address": u.netloc, "path": u.path or "/metrics",
                    "params": params, "url": url})
    return out


def render_scrape_config(box_id: str, targets: list[dict[str, Any]], interval: str = SCRAPE_INTERVAL) -> str:
    return _render("observability/scrape.yml.j2", box_id=box_id, targets=targets, interval=interval,
                   timeout=interval)


# ---------------------------------------------------------------- vector


def render_vector_config(box: Box, metrics_url: str, victorialogs_url: str | None = None,
                         interval_secs: int = 15, otlp: dict[str, str] | None = None) -> str:
    """otlp: {grpc_address, http_address, receiver_url} adds an OTLP source forwarding to the receiver."""
    return _render("observability/vector.toml.j2", box_id=box.id, logs_dir=str(box.logs_dir),
                   data_dir=str(box.run_dir / "vector"), metrics_url=metrics_url,
                   victorialogs_url=victorialogs_url, interval_secs=interval_secs, otlp=otlp)


def vector_otlp(c: Creation) -> dict[str, str] | None:
    """Two more leased ports for Vector's OTLP source (gRPC and HTTP), forwarding to the box's receiver."""
    from worktreebox.resources import ports

    box = c.box
    if "otlp" not in box.ports:
        return None
    extra = ports.lease(c.host, box.id, ["otlp_grpc", "otlp_vector"])
    box.ports.update(extra)
    c.env["WTBOX_OTLP_GRPC_ENDPOINT"] = f"http://127.0.0.1:{extra['otlp_grpc']}"
    return {"grpc_address": f"127.0.0.1:{extra['otlp_grpc']}", "http_address": f"127.0.0.1:{extra['otlp_vector']}",
            "receiver_url": f"http://127.0.0.1:{box.ports['otlp']}"}


def start_vector(box: Box, metrics_url: str, victorialogs_url: str | None,
                 otlp: dict[str, str] | None = None, cgroup: cgroups.Leaf | None = None) -> int:
    """Start a detached Vector for the box (WTBOX_ID in its env so teardown finds it)."""
    (box.run_dir / "vector").mkdir(parents=True, exist_ok=True)
    box.logs_dir.mkdir(parents=True, exist_ok=True)
    config = box.run_dir / VECTOR_FILE
    config.write_text(render_vector_config(box, metrics_url, victorialogs_url, otlp=otlp))
    env = {**os.environ, "WTBOX_ID": box.id, "WTBOX_BOX_DIR": str(box.dir)}
    pid = procs.spawn_detached([shutil.which(VECTOR) or VECTOR, "--config", str(config)], env=env,
                               log_path=box.run_dir / "vector.log", cgroup=cgroup)
    (box.run_dir / VECTOR_PID).write_text(f"{pid}\n")
    return pid


def _render(template: str, **ctx: Any) -> str:
    return render_file(asset_path(template), ctx)
