"""The docker part of `wtbox doctor`: is Docker usable, and which docker providers would work."""
from __future__ import annotations

from typing import Any


def docker_report(host: Any = None) -> dict[str, Any]:
    """Availability, reason, images present, and which docker providers are usable (never starts anything)."""
    from .. import dockerenv

    if host is not None:
        cfg = host.config
        home = host.home
    else:
        from ..config import load_host_config
        from ..host import default_home

        home = default_home()
        cfg = load_host_config(home)
    ok, reason = dockerenv.docker_available()
    out: dict[str, Any] = {
        "available": ok,
        "reason": reason,
        "inside_container": dockerenv.inside_container(),
        "configured": {"database_provider": cfg.database_provider,
                       "observability_provider": cfg.observability_provider},
        "images": {"postgres": {"image": cfg.postgres_image, "present": False},
                   "victoriametrics": {"image": cfg.victoriametrics_image, "present": False}},
        "providers": {"database": False, "observability": False},
        "testcontainers": _version("testcontainers"),
    }
    if ok:
        dockerenv.configure_testcontainers()
        out["connection_mode"] = _connection_mode()
        try:
            import docker.errors

            c = dockerenv.client(timeout=5)
            for img in out["images"].values():
                try:
                    c.images.get(img["image"])
                    img["present"] = True
                except docker.errors.ImageNotFound:
                    pass
            out["labelled"] = {k: len(v) for k, v in dockerenv.find_labelled(home, c=c).items()}
        except Exception as e:  # doctor reports, it never fails on a half-working daemon
            out["available"] = False
            out["reason"] = f"Docker answers a ping but not the API: {dockerenv._first_line(e)}."
    usable = out["available"] and out["testcontainers"] is not None
    out["providers"]["database"] = bool(usable and out["images"]["postgres"]["present"])
    out["providers"]["observability"] = bool(usable and out["images"]["victoriametrics"]["present"])
    out["summary"] = _summary(out)
    # Docker is optional: this check fails only when a docker provider is configured but not usable.
    wants_db = cfg.database_provider == "docker"
    wants_obs = cfg.observability_provider == "docker"
    out["ok"] = (not wants_db or out["providers"]["database"]) and (not wants_obs or out["providers"]["observability"])
    return out


def _summary(r: dict[str, Any]) -> str:
    if not r["available"]:
        return r["reason"]
    if r["testcontainers"] is None:
        return "Docker runs, but testcontainers is not installed (pip install 'testcontainers>=4')."
    parts = []
    for key, label, setting in (("postgres", "database", "WTBOX_POSTGRES_IMAGE"),
                                ("victoriametrics", "observability", "WTBOX_VICTORIAMETRICS_IMAGE")):
        img = r["images"][key]
        if img["present"]:
            parts.append(f"{label}: usable ({img['image']})")
        else:
            parts.append(f"{label}: image {img['image']} missing (scripts/build_images.sh, then set {setting})")
    return f"{r['reason']}; " + "; ".join(parts)


def _connection_mode() -> str:
    import os

    return os.environ.get("TESTCONTAINERS_CONNECTION_MODE") or "docker_host"


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None
