"""Reading a box's metrics: the operations `wtbox metrics` and the MCP server share.

Whichever provider runs the store, it answers VictoriaMetrics' HTTP API at the URL the
box recorded, so these need only the box.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from worktreebox.config.load import parse_duration
from worktreebox.errors import UsageError, WtboxError
from worktreebox.telemetry.vmclient import Client

if TYPE_CHECKING:
    from worktreebox.box import Box


def client_for(box: Box) -> Client:
    """The client of a box's store, or a clear error when the box has none."""
    data = box.data.get("metrics") or {}
    if not data.get("url"):
        raise WtboxError(f"{box.id} has no metrics store: its wtbox.toml sets [observability] enabled = false.")
    return Client(data["url"], box_id=box.id)


def series_names(box: Box) -> list[str]:
    """The metric names the box's store holds, sorted."""
    return client_for(box).metric_names()


def query(box: Box, promql: str, *, range_: str | float | None = None, step: str | float = "15s") -> dict[str, Any]:
    """An instant query, or with `range_` (a duration such as "15m") a range query ending now
    at `step` resolution; returns VictoriaMetrics' `data` object ({resultType, result})."""
    client = client_for(box)
    if not range_:
        return client.query(promql)
    seconds = parse_duration(range_, where="--range")
    step_s = parse_duration(step, where="--step")
    if seconds <= 0 or step_s <= 0:
        raise UsageError("--range and --step must be longer than zero.")
    end = time.time()
    return client.query_range(promql, end - seconds, end, step_s)
