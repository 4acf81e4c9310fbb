"""A small web app instrumented with the OpenTelemetry SDK and its OTLP/HTTP exporters, configured
only by the OTEL_* variables a box sets (zero configuration in the app).

    python otel_app.py PORT

GET /slow   a server span with a deliberately slow child span ("slow-child", SLOW_MS ms) and a fast
            one; answers {"trace_id", "span_id", "child_ms"} (the child's duration as the app measured it)
            and logs one JSON line with the trace id on stdout and one record through OTLP logs
GET /fast   a server span only
GET /error  a server span with status ERROR
GET /health no span (the readiness check)
Each traced request adds 1 to the OTLP counter `otel_app.requests` (route attribute).
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry import metrics, trace
from opentelemetry._logs import set_logger_provider
from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk._logs import LoggerProvider, LoggingHandler
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Status, StatusCode

SLOW = float(os.environ.get("SLOW_MS", "250")) / 1000

# Endpoint, protocol, service name and resource attributes all come from the environment.
tracer_provider = TracerProvider()
tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(), schedule_delay_millis=100))
trace.set_tracer_provider(tracer_provider)
logger_provider = LoggerProvider()
logger_provider.add_log_record_processor(BatchLogRecordProcessor(OTLPLogExporter(), schedule_delay_millis=100))
set_logger_provider(logger_provider)
otel_log = logging.getLogger("otel_app")
otel_log.addHandler(LoggingHandler(logger_provider=logger_provider))
otel_log.setLevel(logging.INFO)
otel_log.propagate = False
metrics.set_meter_provider(MeterProvider(metric_readers=[
    PeriodicExportingMetricReader(OTLPMetricExporter(), export_interval_millis=500)]))
requests_counter = metrics.get_meter("otel_app").create_counter("otel_app.requests")
tracer = trace.get_tracer("otel_app")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        if self.path == "/health":
            return self._answer(200, {"ok": True})
        route = self.path.split("?", 1)[0]
        with tracer.start_as_current_span(f"GET {route}", kind=trace.SpanKind.SERVER) as span:
            span.set_attribute("http.route", route)
            requests_counter.add(1, {"route": route})
            ctx = span.get_span_context()
            out = {"trace_id": format(ctx.trace_id, "032x"), "span_id": format(ctx.span_id, "016x")}
            if route == "/slow":
                with tracer.start_as_current_span("slow-child") as child:
                    child.set_attribute("sleep.ms", SLOW * 1000)
                    t0 = time.perf_counter()
                    time.sleep(SLOW)
                    out["child_ms"] = (time.perf_counter() - t0) * 1000
                with tracer.start_as_current_span("fast-child"):
                    pass
                print(json.dumps({"level": "info", "trace_id": out["trace_id"], "msg": "slow request done"}),
                      flush=True)
                otel_log.warning("slow request took %.0f ms", out["child_ms"])
            elif route == "/error":
                span.set_status(Status(StatusCode.ERROR, "failing on purpose"))
            self._answer(500 if route == "/error" else 200, out)

    def _answer(self, code: int, obj: dict) -> None:
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt: str, *args) -> None:
        pass


if __name__ == "__main__":
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
