"""OTLP export requests → what a box stores: span records, log records, metric samples.

Decoding is the OpenTelemetry protocol package's (`opentelemetry-proto` message classes;
`google.protobuf.json_format` for the JSON encoding), never a hand-written parser. The
message classes are imported per signal on first use: the receiver pays for traces at
start and for logs or metrics only when an app sends them.
"""
from __future__ import annotations

import base64
import importlib
import math
import re
import time
import zlib
from collections.abc import Iterable
from typing import Any

from worktreebox.telemetry.traces import store

PROTOBUF_TYPES = ("application/x-protobuf", "application/protobuf")
JSON_TYPES = ("application/json",)
MAX_BODY = 64 * 1024 * 1024  # after decompression; a bigger export is refused, not half-read

# signal → (module, request class, response class, the request's repeated resource field)
SIGNALS = {
    "traces": ("opentelemetry.proto.collector.trace.v1.trace_service_pb2",
               "ExportTraceServiceRequest", "ExportTraceServiceResponse", "resource_spans"),
    "logs": ("opentelemetry.proto.collector.logs.v1.logs_service_pb2",
             "ExportLogsServiceRequest", "ExportLogsServiceResponse", "resource_logs"),
    "metrics": ("opentelemetry.proto.collector.metrics.v1.metrics_service_pb2",
                "ExportMetricsServiceRequest", "ExportMetricsServiceResponse", "resource_metrics"),
}
# OTLP/JSON writes these ids as hex (the spec's one exception to proto3 JSON, which uses base64).
_HEX_ID_KEYS = {"traceId", "spanId", "parentSpanId", "trace_id", "span_id", "parent_span_id"}
_ZERO16, _ZERO8 = bytes(16), bytes(8)
_HEX = re.compile(r"^(?:[0-9a-fA-F]{2})*$")
_NAME_BAD = re.compile(r"[^a-zA-Z0-9_:]")
_LABEL_BAD = re.compile(r"[^a-zA-Z0-9_]")


class BadRequest(Exception):
    """The request cannot be decoded: the receiver answers with `status` and this one sentence."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _classes(signal: str) -> tuple[Any, Any, str]:
    mod, req, resp, field = SIGNALS[signal]
    m = importlib.import_module(mod)
    return getattr(m, req), getattr(m, resp), field


def encoding_of(content_type: str | None) -> str:
    """'protobuf' or 'json' from a Content-Type header; BadRequest(415) for anything else."""
    ct = (content_type or "").split(";", 1)[0].strip().lower()
    if ct in PROTOBUF_TYPES:
        return "protobuf"
    if ct in JSON_TYPES:
        return "json"
    raise BadRequest(f"unsupported Content-Type {content_type!r}; send application/x-protobuf or application/json",
                     415)


def decompress(body: bytes, content_encoding: str | None) -> bytes:
    """Undo gzip/deflate (what OTEL_EXPORTER_OTLP_COMPRESSION asks for), bounded by MAX_BODY."""
    enc = (content_encoding or "identity").strip().lower()
    if enc in ("", "identity", "none"):
        return body
    if enc not in ("gzip", "deflate"):
        raise BadRequest(f"unsupported Content-Encoding {content_encoding!r}; use gzip or none", 415)
    d = zlib.decompressobj(31 if enc == "gzip" else 15)
    try:
        out = d.decompress(body, MAX_BODY + 1)
    except zlib.error as e:
        raise BadRequest(f"the {enc} body is corrupt: {e}") from None
    if len(out) > MAX_BODY:
        raise BadRequest(f"the request is larger than {MAX_BODY // (1024 * 1024)} MiB uncompressed", 413)
    return out


def parse_request(signal: str, body: bytes, encoding: str) -> Any:
    """The Export<Signal>ServiceRequest in `body`; BadRequest when it is not one."""
    req_cls, _, field = _classes(signal)
    req = req_cls()
    if encoding == "protobuf":
        from google.protobuf.message import DecodeError

        try:
            req.ParseFromString(body)
        except DecodeError:
            raise BadRequest(f"the body is not an OTLP {signal} request in protobuf encoding") from None
        if body and not len(getattr(req, field)) and _has_unknown_fields(req):
            # Bytes that happen to be valid wire format but carry nothing OTLP knows.
            raise BadRequest(f"the body is not an OTLP {signal} request in protobuf encoding")
        return req
    import json

    from google.protobuf import json_format

    try:
        obj = json.loads(body or b"{}")
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"the body is not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise BadRequest(f"the JSON body is not an OTLP {signal} request object")
    _hex_ids_to_base64(obj)
    try:
        json_format.ParseDict(obj, req, ignore_unknown_fields=True)
    except (json_format.ParseError, ValueError, TypeError) as e:
        raise BadRequest(f"the JSON body is not an OTLP {signal} request: {str(e)[:200]}") from None
    return req


def _has_unknown_fields(msg: Any) -> bool:
    from google.protobuf import unknown_fields

    return len(unknown_fields.UnknownFieldSet(msg)) > 0


def _hex_ids_to_base64(obj: Any) -> None:
    """Rewrite OTLP/JSON's hex trace and span ids in place into the base64 that json_format reads."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in _HEX_ID_KEYS and isinstance(v, str):
                if _HEX.match(v):
                    obj[k] = base64.b64encode(bytes.fromhex(v)).decode()
            elif isinstance(v, (dict, list)):
                _hex_ids_to_base64(v)
    elif isinstance(obj, list):
        for v in obj:
            _hex_ids_to_base64(v)


def response(signal: str, encoding: str, rejected: int = 0, message: str = "") -> bytes:
    """The Export<Signal>ServiceResponse body, with partial_success when something was rejected."""
    _, resp_cls, _ = _classes(signal)
    resp = resp_cls()
    if rejected:
        counter = {"traces": "rejected_spans", "logs": "rejected_log_records",
                   "metrics": "rejected_data_points"}[signal]
        setattr(resp.partial_success, counter, rejected)
        resp.partial_success.error_message = message
    if encoding == "protobuf":
        return resp.SerializeToString()
    from google.protobuf import json_format

    return json_format.MessageToJson(resp, indent=None).encode()


# ---------------------------------------------------------------- values


def any_value(v: Any) -> Any:
    """An AnyValue as plain JSON data (bytes as base64, non-finite doubles as strings)."""
    kind = v.WhichOneof("value")
    if kind == "string_value":
        return v.string_value
    if kind == "int_value":
        return v.int_value
    if kind == "bool_value":
        return v.bool_value
    if kind == "double_value":
        d = v.double_value
        return d if math.isfinite(d) else str(d)
    if kind == "array_value":
        return [any_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return attributes(v.kvlist_value.values)
    if kind == "bytes_value":
        return base64.b64encode(v.bytes_value).decode()
    return None


def attributes(kvs: Iterable[Any]) -> dict[str, Any]:
    out = {}
    for kv in kvs:
        v = kv.value
        # Strings are most attributes: read them without the generic any_value() call.
        out[kv.key] = v.string_value if v.WhichOneof("value") == "string_value" else any_value(v)
    return out


def service_of(resource: Any) -> str:
    for kv in resource.attributes:
        if kv.key == "service.name":
            return str(any_value(kv.value) or "unknown_service")
    return "unknown_service"


# ---------------------------------------------------------------- traces


def span_records(req: Any) -> tuple[list[dict[str, Any]], int]:
    """(store records of the valid spans, number rejected for invalid ids)."""
    out: list[dict[str, Any]] = []
    rejected = 0
    record = store.span_record
    for rs in req.resource_spans:
        service = service_of(rs.resource)
        for ss in rs.scope_spans:
            for sp in ss.spans:
                tid, sid, pid = sp.trace_id, sp.span_id, sp.parent_span_id
                if len(tid) != 16 or len(sid) != 8 or tid == _ZERO16 or sid == _ZERO8 or len(pid) not in (0, 8):
                    rejected += 1
                    continue
                status = sp.status
                events = [{"n": e.name, "s": e.time_unix_nano, "a": attributes(e.attributes)}
                          for e in sp.events] if len(sp.events) else None
                out.append(record(start_ns=sp.start_time_unix_nano, end_ns=sp.end_time_unix_nano,
                                  status=status.code, trace_id=tid.hex(), span_id=sid.hex(),
                                  parent_id=pid.hex() if pid and pid != _ZERO8 else "", service=service,
                                  name=sp.name, kind=sp.kind, attributes=attributes(sp.attributes),
                                  status_message=status.message, events=events))
    return out, rejected


# ---------------------------------------------------------------- logs

_SEVERITY_WORDS = {"trace": "debug", "debug": "debug", "info": "info", "warn": "warning", "warning": "warning",
                   "error": "error", "fatal": "critical", "critical": "critical"}


def level_of(severity_number: int, severity_text: str) -> str:
    """OTLP severity → the level words of wtbox's logs (1-8 debug, 9-12 info, 13-16 warning, ...)."""
    if severity_number:
        return ("debug" if severity_number <= 8 else "info" if severity_number <= 12 else
                "warning" if severity_number <= 16 else "error" if severity_number <= 20 else "critical")
    word = severity_text.strip().lower().rstrip("0123456789")
    return _SEVERITY_WORDS.get(word, "info")


def log_records(req: Any) -> list[dict[str, Any]]:
    """{service, level, msg, time_ns, trace_id, span_id, attributes} per OTLP log record."""
    import json

    out = []
    for rl in req.resource_logs:
        service = service_of(rl.resource)
        for sl in rl.scope_logs:
            for lr in sl.log_records:
                body = any_value(lr.body)
                msg = body if isinstance(body, str) else "" if body is None else json.dumps(body, ensure_ascii=False)
                rec: dict[str, Any] = {"service": service, "level": level_of(lr.severity_number, lr.severity_text),
                                       "msg": msg, "time_ns": lr.time_unix_nano or lr.observed_time_unix_nano}
                if len(lr.trace_id) == 16 and any(lr.trace_id):
                    rec["trace_id"] = lr.trace_id.hex()
                if len(lr.span_id) == 8 and any(lr.span_id):
                    rec["span_id"] = lr.span_id.hex()
                attrs = attributes(lr.attributes)
                if attrs:
                    rec["attributes"] = attrs
                out.append(rec)
    return out


# ---------------------------------------------------------------- metrics


def metric_name(name: str) -> str:
    """An OTel instrument name as a Prometheus metric name (dots and dashes become '_')."""
    n = _NAME_BAD.sub("_", name) or "_"
    return "_" + n if n[0].isdigit() else n


def _labels(service: str, attrs: dict[str, Any]) -> dict[str, str]:
    import json

    out = {}
    for k, v in attrs.items():
        key = _LABEL_BAD.sub("_", k) or "_"
        if key[0].isdigit():
            key = "_" + key
        out[key] = v if isinstance(v, str) else json.dumps(v)
    # The box's own names win over what an app claims (as in the scrape config).
    for own in ("service", "box"):
        if own in out:
            out["exported_" + own] = out.pop(own)
    out["service"] = service
    return out


class MetricConverter:
    """OTLP metrics → VictoriaMetrics import lines ({"metric", "values", "timestamps"}).

    Delta temporality (an SDK setting) is summed into running totals here, so every series
    VictoriaMetrics stores is cumulative, as Prometheus counters and histograms are.
    """

    def __init__(self, box_id: str) -> None:
        self.box_id = box_id
        self._totals: dict[tuple, float] = {}

    def lines(self, req: Any) -> tuple[list[dict[str, Any]], int]:
        """(import lines, data points not stored: exponential histograms)."""
        out: list[dict[str, Any]] = []
        skipped = 0
        for rm in req.resource_metrics:
            service = service_of(rm.resource)
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    kind = m.WhichOneof("data")
                    name = metric_name(m.name)
                    if kind == "gauge":
                        for dp in m.gauge.data_points:
                            self._add(out, name, _labels(service, attributes(dp.attributes)), _number(dp), dp, False)
                    elif kind == "sum":
                        delta = m.sum.aggregation_temporality == 1
                        if m.sum.is_monotonic and not name.endswith("_total"):
                            name += "_total"
                        for dp in m.sum.data_points:
                            self._add(out, name, _labels(service, attributes(dp.attributes)), _number(dp), dp, delta)
                    elif kind == "histogram":
                        delta = m.histogram.aggregation_temporality == 1
                        for dp in m.histogram.data_points:
                            self._histogram(out, name, _labels(service, attributes(dp.attributes)), dp, delta)
                    elif kind == "summary":
                        for dp in m.summary.data_points:
                            labels = _labels(service, attributes(dp.attributes))
                            for q in dp.quantile_values:
                                self._add(out, name, {**labels, "quantile": f"{q.quantile:g}"}, q.value, dp, False)
                            self._add(out, name + "_sum", labels, dp.sum, dp, False)
                            self._add(out, name + "_count", labels, dp.count, dp, False)
                    elif kind == "exponential_histogram":
                        skipped += len(m.exponential_histogram.data_points)
        return out, skipped

    def _histogram(self, out: list, name: str, labels: dict[str, str], dp: Any, delta: bool) -> None:
        cumulative = 0
        counts = list(dp.bucket_counts)
        for bound, count in zip(dp.explicit_bounds, counts, strict=False):
            cumulative += count
            self._add(out, name + "_bucket", {**labels, "le": f"{bound:g}"}, cumulative, dp, delta)
        self._add(out, name + "_bucket", {**labels, "le": "+Inf"}, dp.count, dp, delta)
        if dp.HasField("sum"):
            self._add(out, name + "_sum", labels, dp.sum, dp, delta)
        self._add(out, name + "_count", labels, dp.count, dp, delta)

    def _add(self, out: list, name: str, labels: dict[str, str], value: float, dp: Any, delta: bool) -> None:
        metric = {"__name__": name, **labels, "box": self.box_id}
        if delta:
            key = tuple(sorted(metric.items()))
            value = self._totals[key] = self._totals.get(key, 0) + value
        if isinstance(value, float) and not math.isfinite(value):
            return  # the JSON import format has no NaN/Inf
        ts = (dp.time_unix_nano or dp.start_time_unix_nano) // 1_000_000 or int(time.time() * 1000)
        out.append({"metric": metric, "values": [value], "timestamps": [ts]})


def _number(dp: Any) -> float:
    return dp.as_double if dp.WhichOneof("value") == "as_double" else dp.as_int
