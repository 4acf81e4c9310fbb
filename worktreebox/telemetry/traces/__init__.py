"""Traces of a box: the OTLP/HTTP receiver, the span store and queries over it.

- `otlp`: OTLP requests (protobuf or JSON) → span records, log records, metric samples.
- `store`: append-only JSONL of spans under boxes/<id>/traces/, rotated like logs.
- `spanmetrics`: span durations as a Prometheus histogram for the box's VictoriaMetrics.
- `receiver`: `python -m worktreebox.services.otlp_receiver`, one small process per box.
- `query`: find_spans / trace_tree / trace_logs, what `wtbox traces` (and agents) call.
"""
