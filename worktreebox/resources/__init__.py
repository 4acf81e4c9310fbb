"""The pieces a box is made of, in creation order: one module per resource, one line each.

Each entry is "module:Class"; modules are imported only when a command needs the resources
(most commands need none). Each class says whether it is created in parallel with its
neighbours (see base.Resource.parallel). Adding a resource kind = one file + one line here.
"""
from __future__ import annotations

import contextvars
import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from worktreebox.resources.base import Resource

ORDER = (
    "disk:Disk",  # the box dir itself ([box] disk_max): everything after it writes into it
    "ports:Ports",
    "cgroup:Cgroup",  # before anything of the box runs: every later process starts inside it
    "worktree:Worktree",
    "sandbox:Sandbox",  # its namespaces, while the worktree is made; metrics, traces, browser wait for it
    "caches:Caches",
    "database:Database",
    "metrics:Metrics",
    "backing:Backing",  # the box's own Redis, RabbitMQ, ... ([backing.<name>])
    "traces:Traces",
    "browser:Browser",
    "deps:Deps",  # into the worktree: after it exists
    "setup:Setup",  # tree -> deps -> setup -> migrations -> services (their `start`s run in this order)
    "migrations:Migrations",
    "services:Services",
    "router:Router",  # routes last: a box is routed once its services start, unrouted first when it goes
)


def load_all() -> list[Resource]:
    """One instance of every resource, in creation order."""
    out = []
    for entry in ORDER:
        module, cls = entry.split(":")
        out.append(getattr(importlib.import_module(f"{__name__}.{module}"), cls)())
    return out


def stages(resources: list[Resource]) -> list[list[Resource]]:
    """The creation order as stages: a run of consecutive parallel resources is one stage."""
    out: list[list[Resource]] = []
    for r in resources:
        if r.parallel and out and out[-1][0].parallel:
            out[-1].append(r)
        else:
            out.append([r])
    return out


def run_stage(stage: list[Resource], step: Callable[[Resource], None]) -> None:
    """Run `step` on every resource of a stage, concurrently when there are several; all finish,
    the first error is raised."""
    if len(stage) == 1:
        step(stage[0])
        return
    from concurrent.futures import ThreadPoolExecutor  # ~4 ms with logging: only when a stage runs

    with ThreadPoolExecutor(max_workers=len(stage)) as pool:
        # each in a copy of this context: a cancelled MCP call reaches their waits (system/cancel.py)
        futures = [pool.submit(contextvars.copy_context().run, step, r) for r in stage]
        errors = []
        for f in futures:
            try:
                f.result()
            except BaseException as e:  # report the first, but let all finish
                errors.append(e)
    if errors:
        raise errors[0]
