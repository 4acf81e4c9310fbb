"""Prometheus text exposition of wtbox's own metrics, described by observability/metrics.toml.

The collector and `wtbox probe` push these lines into a box's store; names, types, help
texts and histogram buckets live in the one metrics.toml.
"""
from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any


@functools.cache
def metric_specs() -> dict[str, dict[str, Any]]:
    """observability/metrics.toml: name → {type, help, labels, ...}."""
    import tomllib

    from worktreebox.config.assets import asset_path

    specs: dict[str, dict[str, Any]] = tomllib.loads(asset_path("observability/metrics.toml").read_text())["metrics"]
    return specs


def histogram_buckets(name: str) -> list[float]:
    """Bucket edges (seconds) of a histogram in metrics.toml: its `buckets`, or those of `buckets_of`."""
    spec = metric_specs()[name]
    if "buckets_of" in spec:
        spec = metric_specs()[spec["buckets_of"]]
    return [float(b) for b in spec["buckets"]]


def exposition(samples: Iterable[tuple[str, dict[str, str], float]], timestamp_ms: int | None = None) -> str:
    """Prometheus text exposition of (name, labels, value), with # HELP/# TYPE from metrics.toml."""
    specs = metric_specs()
    out: list[str] = []
    described: set[str] = set()
    ts = f" {timestamp_ms}" if timestamp_ms is not None else ""
    for name, labels, value in samples:
        base = _family(name, specs)
        if base in specs and base not in described:
            described.add(base)
            out.append(f"# HELP {base} {specs[base]['help']}")
            out.append(f"# TYPE {base} {specs[base]['type']}")
        lab = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
        out.append(f"{name}{{{lab}}} {_num(value)}{ts}")
    return "\n".join(out) + "\n"


def _family(name: str, specs: dict) -> str:
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and name[: -len(suffix)] in specs:
            return name[: -len(suffix)]
    return name


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(v: float) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return str(v)
    return repr(float(v))
