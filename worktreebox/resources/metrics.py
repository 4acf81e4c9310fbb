"""The metrics resource: a VictoriaMetrics per box (plus Vector when asked for and installed).

Runs in parallel with the worktree and the database, so it needs nothing but the box dir,
its leased `metrics` port and the facts the ports resource already set.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import victoriametrics as vm
from ..errors import ConfigError
from .base import Creation, Resource

if TYPE_CHECKING:
    from ..box import Box
    from ..host import Host

SCRAPE_FILE = "scrape.yml"
VECTOR_FILE = "vector.toml"
VECTOR_PID = "vector.pid"
VECTOR = "vector"
# Local targets are cheap to scrape; a short interval lets `wtbox metrics` show a change quickly.
SCRAPE_INTERVAL = "5s"


class Metrics(Resource):
    name = "metrics"
    parallel = True

    def create(self, c: Creation) -> None:
        obs = c.config.observability
        if not obs.enabled:
            return
        provider = obs.provider or getattr(c.host.config, "observability_provider", "native")
        box = c.box
        port = box.ports["metrics"]
        url = f"http://127.0.0.1:{port}"
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
        if provider == "docker":
            from .. import docker_metrics

            docker_metrics.start(box, port, scrape, host=c.host, retention=obs.retention)
        else:
            vm.start(box.id, port=port, data_dir=box.metrics_dir, run_dir=box.run_dir,
                     retention=obs.retention, scrape_config=scrape)
        if obs.collector == "vector":
            if shutil.which(VECTOR):
                start_vector(box, url, obs.victorialogs_url)
                box.data[self.name]["collector"] = "vector"
            else:
                c.note("`vector` is not on PATH; wtbox's built-in collector ships the box's logs and process metrics")
        c.env["WTBOX_METRICS_URL"] = url
        c.env["WTBOX_PROMETHEUS_REMOTE_WRITE_URL"] = url + "/api/v1/write"
        c.facts["metrics"] = {"url": url, "port": port, "remote_write_url": url + "/api/v1/write"}

    def destroy(self, host: "Host", box: "Box") -> None:
        data = box.data.get(self.name)
        # Skip the process scan when nothing of ours was ever started (observability off):
        # VictoriaMetrics creates its storage dir first thing, and the pid files come with it.
        if data or box.metrics_dir.exists() or any((box.run_dir / f).exists() for f in (vm.PID_FILE, VECTOR_PID)):
            vm.stop(box.id, run_dir=box.run_dir, names=(vm.BINARY, VECTOR), pid_files=(vm.PID_FILE, VECTOR_PID))
        if _uses_docker(host, box):
            from .. import docker_metrics

            docker_metrics.stop(box, home=host.home)
        elif not data and "env_keys" not in box.data:
            # A `new` killed before it finished creating (no env_keys yet) may have started a container
            # (its docker provider may have come from the repo's wtbox.toml): sweep by label.
            from .. import dockerenv

            dockerenv.sweep_box(host.home, box.id)
        shutil.rmtree(box.metrics_dir, ignore_errors=True)
        for name in (SCRAPE_FILE, VECTOR_FILE, vm.LOG_FILE, "vector.log"):
            (box.run_dir / name).unlink(missing_ok=True)
        shutil.rmtree(box.run_dir / "vector", ignore_errors=True)

    def discover(self, host: "Host") -> set[str]:
        ids = {p.parent.name for p in Path(host.boxes_dir).glob("*/metrics") if p.is_dir()}
        ids |= _live_box_ids(Path(host.boxes_dir))
        from .. import dockerenv

        ids |= dockerenv.discover_box_ids(host.home)  # labelled containers, whatever the config says now
        return ids

    def status(self, host: "Host", box: "Box") -> dict[str, Any] | None:
        data = box.data.get(self.name)
        if not data:
            return None
        out = {"url": data["url"], "up": vm.healthy(data["url"], timeout=0.5),
               "provider": data.get("provider", "native"), "collector": data.get("collector", "builtin")}
        return {"metrics": out}


def _uses_docker(host: "Host", box: "Box") -> bool:
    """The box's store is (or, for an orphan without a record, may be) a container."""
    data = box.data.get("metrics") or {}
    if data.get("provider"):
        return data["provider"] == "docker"
    return getattr(host.config, "observability_provider", "native") == "docker"


# ---------------------------------------------------------------- scrape config


def scrape_targets(services: dict, *, facts: dict[str, Any], source: str = "wtbox.toml") -> list[dict[str, Any]]:
    """Services with `metrics = URL`, their URL rendered with the box facts and split for the config."""
    import urllib.parse

    out = []
    for name, svc in services.items():
        if not svc.metrics:
            continue
        url = svc.metrics
        if "{" in url:
            url = _render_string(url, facts, f"{source}: [services.{name}] metrics")
        u = urllib.parse.urlsplit(url)
        if u.scheme not in ("http", "https") or not u.netloc:
            raise ConfigError(f"{source}: [services.{name}] metrics: expected an http:// URL such as "
                              f"\"http://127.0.0.1:{{{{ ports.web }}}}/metrics\", got {url!r}.")
        params = urllib.parse.parse_qs(u.query)  # name → [values], as the scrape config wants
        out.append({"service": name, "scheme": u.scheme, "address": u.netloc, "path": u.path or "/metrics",
                    "params": params, "url": url})
    return out


def _render_string(template: str, facts: dict[str, Any], where: str) -> str:
    import jinja2

    env = jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=False)
    try:
        return env.from_string(template).render(**facts)
    except jinja2.TemplateError as e:
        raise ConfigError(f"{where}: cannot render {template!r}: {e}.") from None


def render_scrape_config(box_id: str, targets: list[dict[str, Any]], interval: str = SCRAPE_INTERVAL) -> str:
    return _render("observability/scrape.yml.j2", box_id=box_id, targets=targets, interval=interval,
                   timeout=interval)


# ---------------------------------------------------------------- vector


def render_vector_config(box: "Box", metrics_url: str, victorialogs_url: str | None = None,
                         interval_secs: int = 15) -> str:
    return _render("observability/vector.toml.j2", box_id=box.id, logs_dir=str(box.logs_dir),
                   data_dir=str(box.run_dir / "vector"), metrics_url=metrics_url,
                   victorialogs_url=victorialogs_url, interval_secs=interval_secs)


def start_vector(box: "Box", metrics_url: str, victorialogs_url: str | None) -> int:
    """Start a detached Vector for the box (WTBOX_ID in its env so teardown finds it)."""
    (box.run_dir / "vector").mkdir(parents=True, exist_ok=True)
    box.logs_dir.mkdir(parents=True, exist_ok=True)
    config = box.run_dir / VECTOR_FILE
    config.write_text(render_vector_config(box, metrics_url, victorialogs_url))
    env = {**os.environ, "WTBOX_ID": box.id, "WTBOX_BOX_DIR": str(box.dir)}
    pid = vm.spawn_detached([shutil.which(VECTOR) or VECTOR, "--config", str(config)], env=env,
                            log_path=box.run_dir / "vector.log")
    (box.run_dir / VECTOR_PID).write_text(f"{pid}\n")
    return pid


def _render(template: str, **ctx: Any) -> str:
    import jinja2

    from ..assets import asset_path

    path = asset_path(template)
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=True)
    return env.from_string(path.read_text()).render(**ctx)


def _live_box_ids(boxes_dir: Path) -> set[str]:
    """Box ids of live VictoriaMetrics/Vector processes whose storage lies under this host's boxes dir."""
    import psutil

    prefix = f"-storageDataPath={boxes_dir}/"
    ids = set()
    for p in psutil.process_iter(["name", "cmdline"]):
        try:
            if p.info["name"] not in (vm.BINARY, VECTOR):
                continue
            cmdline = p.info["cmdline"] or []
            mine = any(a.startswith(prefix) for a in cmdline) or any(a.startswith(f"{boxes_dir}/") for a in cmdline)
            box_id = p.environ().get("WTBOX_ID")
            if mine and box_id:
                ids.add(box_id)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return ids
