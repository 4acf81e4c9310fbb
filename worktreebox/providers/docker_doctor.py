"""`wtbox doctor`'s docker check: is Docker usable here, and which docker providers would work
(never starts anything). Apart from docker_engine.py, which the commands that make and remove
boxes import: this is asked for by doctor only."""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from worktreebox.providers import docker_engine as engine

if TYPE_CHECKING:
    from worktreebox.config.load import HostConfig


def doctor_report(home: str | Path, cfg: HostConfig) -> dict[str, Any]:
    """`wtbox doctor`'s docker check: availability, reason, images present, and which docker
    providers are usable (never starts anything)."""
    ok, reason = engine.docker_available()
    out: dict[str, Any] = {
        "available": ok,
        "reason": reason,
        "inside_container": engine.inside_container(),
        "configured": {"database_provider": cfg.database_provider,
                       "observability_provider": cfg.observability_provider},
        "images": {"postgres": {"image": cfg.postgres_image, "present": False},
                   "victoriametrics": {"image": cfg.victoriametrics_image, "present": False}},
        "providers": {"database": False, "observability": False},
        "testcontainers": _version("testcontainers"),
    }
    if ok:
        engine.configure_testcontainers()
        out["connection_mode"] = _connection_mode()
        try:
            import docker.errors

            c = engine.client(timeout=5)
            for img in out["images"].values():
                try:
                    c.images.get(img["image"])
                    img["present"] = True
                except docker.errors.ImageNotFound:
                    pass
            out["labelled"] = {k: len(v) for k, v in engine.find_labelled(home, c=c).items()}
        except Exception as e:  # doctor reports, it never fails on a half-working daemon
            out["available"] = False
            out["reason"] = f"Docker answers a ping but not the API: {engine.first_line(e)}."
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
    return os.environ.get("TESTCONTAINERS_CONNECTION_MODE") or "docker_host"


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None
