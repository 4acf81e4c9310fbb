"""`wtbox mcp`: every wtbox operation as a Model Context Protocol tool, on the official `mcp` SDK.

Tools return the objects the CLI's `--json` prints (a list comes wrapped as {"result": [...]},
as MCP's structured content must be an object). Errors come back as tool errors carrying
wtbox's one-sentence message; the server itself never dies of one. Live boxes' status, env and
recent logs are also resources (wtbox://box/<id>/status, .../env, .../logs/<service>).

Only this module and the `mcp` command import the SDK, and the tools import the rest of wtbox
when first called: an agent's client starts this server often, and the time to the first tool
list should be the SDK's own.

Blocking work runs in worker threads. A cancelled call (notifications/cancelled, or the client
going away) sets a flag the work watches, and the handler waits, shielded, until the work has
undone itself: a cancelled `box_new` rolls back exactly as Ctrl-C does, a cancelled `box_exec`
stops its command, a cancelled `fanout` stops its runs as Ctrl-C does.
"""
import functools
import json
import os
import sys
import threading
from collections.abc import Callable
from typing import Annotated, Any, Literal

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread
from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceError, ResourceNotFoundError, ToolError
from mcp.server.transport_security import TransportSecuritySettings
from mcp_types import CallToolResult, Resource, TextContent, ToolAnnotations
from pydantic import Field, ValidationError

NAME = "wtbox"
RESOURCE_LOG_LINES = 200  # records in a wtbox://box/<id>/logs/<service> resource
INSTRUCTIONS = (
    "wtbox makes disposable development boxes on this host: each is a git worktree on its own "
    "branch with leased ports, its own PostgreSQL schema, caches, services with captured logs and "
    "its own metrics store. Make one with box_new, run commands in it with box_exec, read its "
    "logs and metrics, and remove it with box_rm. A `box` argument is a box id, a unique id "
    "prefix, or the task name the box was made for."
)

BoxRef = Annotated[str, Field(description="The box: its id, a unique id prefix, or its task name.")]
ShowSecrets = Annotated[bool, Field(description="Show passwords and secret values (only when the server was "
                                                "started with --allow-secrets).")]


class Cancelled(KeyboardInterrupt):
    """Raised in the thread that waits for a fan-out when its call is cancelled: Fanout.wait
    handles it exactly as Ctrl-C."""


class WtboxMCP(MCPServer):
    """The SDK's server plus wtbox's error wording and the live boxes' resources."""

    def __init__(self, *, allow_secrets: bool = False, **kwargs: Any) -> None:
        super().__init__(NAME, instructions=INSTRUCTIONS, version=_version(), log_level="WARNING", **kwargs)
        self.allow_secrets = allow_secrets

    async def call_tool(self, name: str, arguments: dict[str, Any], context: Any = None) -> Any:
        """Every failure as a tool error with one sentence: wtbox's own message, the bad argument,
        or (for a bug) the exception's type and text; never a traceback on the wire."""
        try:
            return await super().call_tool(name, arguments, context)
        except ToolError as e:
            cause = e.__cause__
            if type(e) is ToolError and isinstance(cause, ValidationError):  # the arguments, not our code
                return tool_error(argument_error(name, cause))
            from worktreebox.errors import WtboxError

            if isinstance(cause, WtboxError):
                return tool_error(str(cause))
            if cause is None:  # the SDK's own (an unknown tool)
                return tool_error(str(e))
            if os.environ.get("WTBOX_DEBUG"):
                import traceback

                traceback.print_exception(cause, file=sys.stderr)
            return tool_error(f"internal error: {type(cause).__name__}: {cause} (set WTBOX_DEBUG=1 for a traceback "
                              "on the server's stderr).")

    async def list_resources(self) -> list[Resource]:
        """The static resources plus status, env and logs of every live box."""
        static = await super().list_resources()
        return static + await anyio.to_thread.run_sync(live_resources)


def tool_error(message: str) -> CallToolResult:
    return CallToolResult(content=[TextContent(type="text", text=message)], is_error=True)


def argument_error(tool: str, e: ValidationError) -> str:
    """The first complaint of pydantic as one sentence naming the argument."""
    err = e.errors()[0]
    where = ".".join(str(p) for p in err.get("loc", ())) or "arguments"
    msg = str(err.get("msg", "is not valid")).rstrip(".")
    if err.get("type") == "missing":
        return f"{tool}: the argument {where!r} is required."
    if err.get("type") == "extra_forbidden":
        return f"{tool}: there is no argument {where!r}."
    return f"{tool}: the argument {where!r} is not valid: {msg}."


def _version() -> str:
    from worktreebox import __version__

    return __version__


# ---------------------------------------------------------------------- plumbing

def _reveal(ctx: Context, show_secrets: bool) -> bool:
    """show_secrets is honoured only on a server started with --allow-secrets."""
    if not show_secrets:
        return False
    if not getattr(ctx.mcp_server, "allow_secrets", False):
        from worktreebox.errors import UsageError

        raise UsageError("show_secrets needs a server started with 'wtbox mcp --allow-secrets'; "
                         "this one masks every secret.")
    return True


class _Opened:
    """A Host for one call (its own registry connections, closed at the end: the server runs long)."""

    def __enter__(self):
        from worktreebox.host import Host
        from worktreebox.router.state import needs_revive

        self.host = Host()
        if needs_revive(self.host.home):  # a killed router comes back with every route, as for the CLI
            from worktreebox.resources.router import push

            push(self.host)
        return self.host

    def __exit__(self, *exc: object) -> None:
        self.host.registry.close()


def _blocking(fn: Callable[..., Any]) -> Callable[..., Any]:
    """fn(host, ...) run in a worker thread with a Host of its own."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        with _Opened() as host:
            return fn(host, *args, **kwargs)

    return run


async def in_thread(work: Callable[[], Any], cancel: threading.Event | None = None) -> Any:
    """Run `work` in a worker thread. If the call is cancelled: set `cancel` (the work watches it
    and undoes itself), wait, shielded, until the work has ended, then let the cancellation go on."""
    done = threading.Event()

    def body() -> Any:
        try:
            return work()
        finally:
            done.set()

    try:
        return await anyio.to_thread.run_sync(body, abandon_on_cancel=True)
    except anyio.get_cancelled_exc_class():
        if cancel is not None:
            cancel.set()
        with anyio.CancelScope(shield=True):
            while not done.is_set():
                await anyio.sleep(0.05)
        raise


class Progress:
    """A progress reporter any thread may call: each report is a notifications/progress (when
    the client asked for them); silent once the call is cancelled. It never raises.

    MCP wants the value to grow with every notification: without a value each report counts
    one; a value that would not grow (a fan-out attempt changing state while the number done
    stays the same) is nudged up a little, and reports past `total` are dropped."""

    def __init__(self, ctx: Context, cancel: threading.Event, total: float | None = None) -> None:
        self._ctx = ctx
        self._cancel = cancel
        self._token = anyio.lowlevel.current_token()  # made in the event loop's thread
        self._lock = threading.Lock()  # held while sending, so reports leave in order
        self._last = 0.0
        self.total = total

    def __call__(self, message: str, progress: float | None = None) -> None:
        if self._cancel.is_set():
            return
        with self._lock:
            n = self._last + 1 if progress is None else max(progress, self._last + 0.001)
            if self.total is not None and n > self.total:
                return
            self._last = n
            try:
                anyio.from_thread.run(self._ctx.report_progress, n, self.total, message, token=self._token)
            except Exception:  # a client that went away must not break the work
                pass


# ---------------------------------------------------------------------- tools: boxes

READ_ONLY = ToolAnnotations(read_only_hint=True, destructive_hint=False, open_world_hint=False)
CHANGES = ToolAnnotations(read_only_hint=False, destructive_hint=False, open_world_hint=False)
DESTROYS = ToolAnnotations(read_only_hint=False, destructive_hint=True, open_world_hint=False)


async def box_new(
    task: Annotated[str, Field(description="Short task name; the box id is derived from it (e.g. 'fix-login').")],
    ctx: Context,
    repo: Annotated[str | None, Field(description="Path of the git repository to cut the box from "
                                                  "(default: the one around the server's working directory).")] = None,
    ref: Annotated[str | None, Field(description="Git ref to start from (default: HEAD).")] = None,
    ttl: Annotated[str | None, Field(description="Remove after this long without use, e.g. '8h' "
                                                 "(default: [box] ttl of wtbox.toml, or 72h).")] = None,
    no_services: Annotated[bool, Field(description="Create the box without starting its services.")] = False,
    keep: Annotated[bool, Field(description="Never remove this box in gc.")] = False,
    no_pool: Annotated[bool, Field(description="Always make a fresh box, never one from the warm pool.")] = False,
    show_secrets: ShowSecrets = False,
) -> dict[str, Any]:
    """Create a box for TASK: worktree, ports, database, caches, metrics, services. Returns what
    `wtbox new --json` prints. Reports progress; cancelling the call removes the half-made box."""
    from worktreebox.box import slugify

    reveal = _reveal(ctx, show_secrets)
    slugify(task)  # a bad name is refused here, without starting a child
    argv = ["new", "--json"]
    for flag, value in (("--repo", repo), ("--from", ref), ("--ttl", ttl)):
        if value is not None:
            argv += [flag, value]
    argv += ["--no-services"] * no_services + ["--keep"] * keep + ["--no-pool"] * no_pool + ["--show-secrets"] * reveal
    cancel = threading.Event()
    progress = Progress(ctx, cancel)
    return await in_thread(lambda: new_in_child(argv + ["--", task], progress, cancel), cancel)


def new_in_child(argv: list[str], progress: Callable[[str], None], cancel: threading.Event) -> dict[str, Any]:
    """Run `wtbox new ... --json` as a child and return its JSON; `cancel` sends it SIGINT.

    A child, not Host.new in a thread, so that a cancellation lands wherever the creation is (in
    a `git worktree add`, a setup command, a wait for a service) and unwinds through the same
    rollback as Ctrl-C; a box the child finished just before the signal arrived is removed too.
    """
    import signal
    import subprocess

    from worktreebox.errors import UsageError, WtboxError
    from worktreebox.system import procs

    env = {**os.environ, "WTBOX_PROGRESS": "1"}
    child = procs.spawn([sys.executable, "-m", "worktreebox.cli.main", *argv], env=env,
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ident = procs.identity(child.pid)
    lines: list[str] = []

    def read_stderr() -> None:  # progress lines ("  ports leased"), warnings, and at the end the error
        for raw in child.stderr:
            line = raw.decode("utf-8", "replace").rstrip()
            lines.append(line)
            if line.strip():
                progress(line.strip().removeprefix("wtbox: "))

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    out: list[bytes] = []
    stdout_reader = threading.Thread(target=lambda: out.append(child.stdout.read()), daemon=True)
    stdout_reader.start()
    interrupted = False
    while True:
        try:
            child.wait(timeout=0.05)
            break
        except subprocess.TimeoutExpired:
            if cancel.is_set() and not interrupted:
                child.send_signal(signal.SIGINT)  # Ctrl-C: Host.new rolls back
                interrupted = True
    reader.join(timeout=5)
    stdout_reader.join(timeout=5)
    if cancel.is_set():
        _remove_made_by(ident)
        return {}  # nobody is waiting for it any more
    if child.returncode != 0:
        # The error is the last "wtbox: " line and what follows it (e.g. a setup command's last lines).
        starts = [i for i, line in enumerate(lines) if line.startswith("wtbox: ")]
        message = ("\n".join(lines[starts[-1]:])[len("wtbox: "):] if starts
                   else f"wtbox new exited with code {child.returncode}.")
        raise (UsageError if child.returncode == 2 else WtboxError)(message)
    return json.loads(b"".join(out))


def _remove_made_by(ident: list[int] | None) -> None:
    """Remove any box the (cancelled, now gone) child made: it may have finished before SIGINT."""
    with _Opened() as host:
        for b in host.list():
            if ident and b.data.get("creator") == ident:
                host.rm(b, force=True)


@_blocking
def _list(host) -> list[dict[str, Any]]:
    every = host.list()
    return [host.list_json(b, every) for b in every]


async def box_list() -> list[dict[str, Any]]:
    """List the boxes on this host (what `wtbox ls --json` prints)."""
    return await in_thread(_list)


@_blocking
def _status(host, box: str, reveal: bool) -> dict[str, Any]:
    return host.status(host.get(box), show_secrets=reveal)


async def box_status(box: BoxRef, ctx: Context, show_secrets: ShowSecrets = False) -> dict[str, Any]:
    """A box's ports, database, services and metrics (what `wtbox status --json` prints)."""
    reveal = _reveal(ctx, show_secrets)
    return await in_thread(lambda: _status(box, reveal))


@_blocking
def _url(host, box: str, service: str | None) -> dict[str, Any]:
    return host.url(host.get(box), service)


async def box_url(box: BoxRef, service: Annotated[str | None, Field(
        description="One service (port name) of the box; default its first.")] = None) -> dict[str, Any]:
    """The URL of a box (or of one of its services) through the host router, e.g.
    http://web.fix-login.localhost:20017/ (what `wtbox url --json` prints); one SSH tunnel to the
    router's port reaches every box by name."""
    return await in_thread(lambda: _url(box, service))


@_blocking
def _env(host, box: str, reveal: bool) -> dict[str, str]:
    from worktreebox.secrets import mask_env

    b = host.get(box)
    return dict(b.env) if reveal else mask_env(b.env)


async def box_env(box: BoxRef, ctx: Context, show_secrets: ShowSecrets = False) -> dict[str, str]:
    """The environment variables the box exports (passwords masked unless show_secrets)."""
    reveal = _reveal(ctx, show_secrets)
    return await in_thread(lambda: _env(box, reveal))


async def box_exec(
    box: BoxRef,
    cmd: Annotated[list[str] | str, Field(description="The command: an argv list (run as is) or a shell "
                                                      "string (run with sh -c).")],
    ctx: Context,
    cwd: Annotated[str | None, Field(description="Directory to run in, relative to the box's worktree "
                                                 "(default: the worktree); paths outside it are refused.")] = None,
    timeout: Annotated[float, Field(gt=0, description="Seconds before the command is stopped "
                                                      "(exit code 124).")] = 600.0,
    tail: Annotated[int, Field(ge=0, le=10000, description="Keep the last N lines of stdout and of "
                                                           "stderr.")] = 100,
    show_secrets: ShowSecrets = False,
) -> dict[str, Any]:
    """Run a command in the box's worktree with the box env, as `wtbox exec` does; returns
    exit_code and the last lines of stdout and stderr, with secret values masked."""
    reveal = _reveal(ctx, show_secrets)
    cancel = threading.Event()

    def work() -> dict[str, Any]:
        with _Opened() as host:
            return host.run(host.get(box), cmd, cwd=cwd, timeout=timeout, tail=tail, reveal=reveal, cancel=cancel)

    return await in_thread(work, cancel)


@_blocking
def _logs(host, box, service, level, grep, since, until, tail) -> list[dict[str, Any]]:
    services = [service] if isinstance(service, str) else list(service or [])
    return host.logs(host.get(box), services, since=since, until=until, level=level, grep=grep, tail=tail)


async def box_logs(
    box: BoxRef,
    service: Annotated[list[str] | str | None, Field(description="Only this service, or these services "
                                                                 "(default: all, with setup and migrate).")] = None,
    level: Annotated[Literal["debug", "info", "warning", "error", "critical"] | None,
                     Field(description="This level and above.")] = None,
    grep: Annotated[str | None, Field(description="Only messages matching this regular expression.")] = None,
    since: Annotated[str | None, Field(description="From this time on: a duration ago ('5m', '2h') or an "
                                                   "ISO time.")] = None,
    until: Annotated[str | None, Field(description="Up to this time: a duration ago or an ISO time.")] = None,
    tail: Annotated[int | None, Field(ge=0, description="Only the last N matching records (default 200; "
                                                        "null for all).")] = 200,
) -> list[dict[str, Any]]:
    """The captured log records of the box's services, oldest first: {ts, service, stream, level,
    msg} (what `wtbox logs --json` prints, one record per element)."""
    return await in_thread(lambda: _logs(box, service, level, grep, since, until, tail))


@_blocking
def _metrics(host, box, query, range_, step):
    from worktreebox.telemetry import metrics as metrics_query

    b = host.get(box)
    if not query:
        return {"metric_names": metrics_query.series_names(b)}
    return metrics_query.query(b, query, range_=range_, step=step)


async def box_metrics(
    box: BoxRef,
    query: Annotated[str | None, Field(description="A PromQL/MetricsQL query (none: list the metric "
                                                   "names the box has).")] = None,
    range: Annotated[str | None, Field(description="Make it a range query over the last DURATION "
                                                   "(e.g. '15m').")] = None,
    step: Annotated[str, Field(description="Resolution of a range query.")] = "15s",
) -> dict[str, Any]:
    """Query the box's own VictoriaMetrics (what `wtbox metrics --json` prints: {resultType, result};
    without a query, {metric_names: [...]})."""
    return await in_thread(lambda: _metrics(box, query, range, step))


@_blocking
def _probe(host, box, target, n, concurrency, method, data):
    return host.probe(host.get(box), target, n=n, concurrency=concurrency, method=method, data=data)


async def box_probe(
    box: BoxRef,
    target: Annotated[str, Field(description="A path of the box's first port (e.g. '/health') or a full "
                                             "http:// URL.")],
    n: Annotated[int, Field(ge=1, le=100000, description="Number of requests.")] = 200,
    concurrency: Annotated[int, Field(ge=1, le=256, description="Requests in flight at once.")] = 4,
    method: Annotated[str, Field(description="HTTP method.")] = "GET",
    data: Annotated[str | None, Field(description="Request body, sent with every request.")] = None,
) -> dict[str, Any]:
    """Measure a URL of the box: latency percentiles, status codes, errors; records the latency
    histogram in the box's metrics (what `wtbox probe --json` prints)."""
    return await in_thread(lambda: _probe(box, target, n, concurrency, method, data))


@_blocking
def _traces(host, box, service, name, min_duration, status, since, trace_id, logs, limit):
    return host.traces(host.get(box), service=service, name=name, min_duration=min_duration, status=status,
                       since=since, trace_id=trace_id, with_logs=logs, limit=limit)


async def box_traces(
    box: BoxRef,
    min_duration: Annotated[str | None, Field(description="Only spans at least this long: '200ms', '1.5s', "
                                                          "'500us'.")] = None,
    service: Annotated[str | None, Field(description="Only spans of this service (its OTEL_SERVICE_NAME).")] = None,
    name: Annotated[str | None, Field(description="Only span names matching this glob, e.g. 'GET /items*'.")] = None,
    status: Annotated[Literal["error", "ok", "unset"] | None, Field(description="Only spans with this "
                                                                                "status.")] = None,
    since: Annotated[str | None, Field(description="Only spans that started after this: a duration ago "
                                                   "('5m') or an ISO time.")] = None,
    trace_id: Annotated[str | None, Field(description="One trace (32 hex digits, or the first 8+) as a tree "
                                                      "instead of a list.")] = None,
    logs: Annotated[bool, Field(description="With trace_id: also the log records carrying that "
                                            "trace id.")] = False,
    limit: Annotated[int | None, Field(ge=0, description="At most this many spans, the newest that "
                                                         "match (null for all).")] = 100,
) -> list[dict[str, Any]] | dict[str, Any]:
    """Spans the box's OTLP endpoint received (what `wtbox traces --json` prints): a list of {trace_id,
    span_id, parent_span_id, name, service, start, duration_ms, status, kind, attributes}; with trace_id,
    {trace_id, duration_ms, span_count, services, spans (depth-first, each with depth), logs}."""
    return await in_thread(lambda: _traces(box, service, name, min_duration, status, since, trace_id, logs, limit))


@_blocking
def _browse(host, box, target, screenshot, full_page, viewport, wait_for, timeout, compare, diff):
    from worktreebox.config.load import parse_duration

    b = host.get(box)
    other = host.get(compare) if compare else None
    return host.browse(b, target, screenshot=screenshot, full_page=full_page, viewport=viewport, wait_for=wait_for,
                       timeout=parse_duration(timeout, where="timeout"), compare=other, diff=diff)


async def box_browse(
    box: BoxRef,
    target: Annotated[str, Field(description="A path of the box's first port (e.g. '/') or a full http:// URL.")] = "/",
    screenshot: Annotated[str | None, Field(description="Write a PNG of the page to this file (on the "
                                                        "server's machine).")] = None,
    full_page: Annotated[bool, Field(description="Capture the whole scrollable page, not only the viewport.")] = False,
    viewport: Annotated[str, Field(description="Window size as WIDTHxHEIGHT.")] = "1280x800",
    wait_for: Annotated[str | None, Field(description="After the load event, wait for this CSS selector to be "
                                                      "visible, or 'networkidle'.")] = None,
    timeout: Annotated[str, Field(description="Give up when the page has not loaded after this long.")] = "30s",
    compare: Annotated[str | None, Field(description="Load the same path in this other box and diff the "
                                                     "two screenshots (diff_ratio 0..1).")] = None,
    diff: Annotated[str | None, Field(description="With compare: write the pixel diff PNG to this file.")] = None,
) -> dict[str, Any]:
    """Load a page of the box in its headless Chromium: final url, status, title, load_seconds,
    console warnings and errors, failed requests (what `wtbox browse --json` prints); the errors also
    go to the box's logs (service browser) and metrics."""
    return await in_thread(lambda: _browse(box, target, screenshot, full_page, viewport, wait_for, timeout,
                                           compare, diff))


def _services_tool(action: str, doc: str):
    @_blocking
    def run(host, box, service):
        b = host.get(box)
        rows = host.services(b, action, service)
        return {"id": b.id, "box": b.id, "services": [{"name": n, **s} for n, s in rows.items()]}  # as the CLI

    async def tool(
        box: BoxRef,
        service: Annotated[str | None, Field(description="Only this service (default: all).")] = None,
    ) -> dict[str, Any]:
        return await in_thread(lambda: run(box, service))

    tool.__name__ = f"box_{action}"
    tool.__doc__ = doc
    return tool


box_up = _services_tool("up", "Start the box's services (or one) and wait until they are ready "
                              "(what `wtbox up --json` prints).")
box_down = _services_tool("down", "Stop the box's services (or one): SIGTERM, wait, SIGKILL "
                                  "(what `wtbox down --json` prints).")
box_restart = _services_tool("restart", "Restart the box's services (or one) and wait until they are ready "
                                        "(what `wtbox restart --json` prints).")


@_blocking
def _rm(host, box, force, keep_branch):
    import time

    b = host.get(box)
    t0 = time.perf_counter()
    host.rm(b, force=force, keep_branch=keep_branch)
    return {"id": b.id, "seconds": round(time.perf_counter() - t0, 3)}


async def box_rm(
    box: BoxRef,
    force: Annotated[bool, Field(description="Also discard uncommitted work and commits no other branch "
                                             "has (refused without it).")] = False,
    keep_branch: Annotated[bool, Field(description="Keep the wtbox/<id> branch in the repo.")] = False,
) -> dict[str, Any]:
    """Remove a box and everything it owns; refuses when the worktree holds unsaved work unless
    force (what each element of `wtbox rm --json` is)."""
    return await in_thread(lambda: _rm(box, force, keep_branch))


# ---------------------------------------------------------------------- tools: fan-out

async def fanout(
    task: Annotated[str, Field(description="Task name; the boxes are TASK-1 … TASK-N.")],
    n: Annotated[int, Field(ge=1, description="Number of attempts.")],
    ctx: Context,
    run: Annotated[str | None, Field(description="Shell command run in each box's worktree; {i} and {box} "
                                                 "are replaced, $WTBOX_FANOUT_INDEX and $WTBOX_FANOUT_N "
                                                 "are set.")] = None,
    checks: Annotated[list[str], Field(description="Commands run after the run (e.g. 'pytest -q'); exit "
                                                   "code, duration and test counts are recorded.")] = [],
    probes: Annotated[list[str], Field(description="Paths (or URLs) measured after the services "
                                                   "restarted.")] = [],
    probe_requests: Annotated[int, Field(ge=1, description="Requests per probe.")] = 100,
    timeout: Annotated[str | None, Field(description="Limit for the run and each check, e.g. '30m'.")] = None,
    jobs: Annotated[int | None, Field(ge=1, description="At most this many attempts at once "
                                                        "(default: all).")] = None,
    repo: Annotated[str | None, Field(description="Repository to cut the boxes from (default: the one "
                                                  "around the server's working directory).")] = None,
    ref: Annotated[str | None, Field(description="Git ref every box starts from (default: HEAD).")] = None,
    warm: Annotated[bool, Field(description="Top the warm pool up to N boxes first, then claim them all.")] = False,
    no_pool: Annotated[bool, Field(description="Make every box fresh, never from the warm pool.")] = False,
) -> list[dict[str, Any]]:
    """Create N boxes for TASK, run a command in each, measure them the same way; returns the
    comparison rows (what `wtbox fanout --json` prints). Reports progress per finished attempt;
    cancelling stops the runs as Ctrl-C does (the boxes stay for inspection)."""
    from worktreebox.config.load import parse_duration
    from worktreebox.errors import UsageError, WtboxError
    from worktreebox.fleet import fanout as F

    if warm and no_pool:
        raise UsageError("warm fills the pool and no_pool ignores it; give one of them.")
    cancel = threading.Event()
    progress = Progress(ctx, cancel, total=n)

    def work() -> list[dict[str, Any]]:
        with _Opened() as host:
            opts = F.Options(task=task, n=n, run=run, checks=tuple(checks), probes=tuple(probes), repo=repo,
                             ref=ref, timeout=parse_duration(timeout, where="timeout") if timeout else None,
                             jobs=jobs, probe_requests=probe_requests, warm=warm, use_pool=not no_pool)
            fo = F.Fanout(host, opts)
            fo.plan()  # refusals happen before anything is created

            def changed(a) -> None:
                done = sum(1 for x in fo.attempts if x.state in F.FINAL)
                progress(f"{a.box_id or a.task}: {a.state}" + (f" ({a.detail})" if a.detail else ""), done)

            def tick() -> None:  # in fo.wait(): a cancelled call interrupts like Ctrl-C
                if cancel.is_set():
                    raise Cancelled()

            fo.on_change = changed
            fo.start()
            rows = fo.wait(tick)
            if not any(r["id"] for r in rows):  # as `wtbox fanout` does
                raise WtboxError(f"No box of the fan-out could be created; first error: {rows[0]['error']}")
            return rows

    return await in_thread(work, cancel)


@_blocking
def _compare(host, boxes, task, sort):
    from worktreebox.fleet import fanout as F

    return F.compare(host, list(boxes or []), task, sort)


async def compare(
    boxes: Annotated[list[str], Field(description="Boxes to compare (or give fanout).")] = [],
    fanout: Annotated[str | None, Field(description="Compare the boxes of the latest fan-out of this "
                                                    "task.")] = None,
    sort: Annotated[str | None, Field(description="Order rows by best, index, box, run_exit, run_seconds, "
                                                  "checks_passed, tests_passed, tests_failed, diff, ready, "
                                                  "p95 or errors.")] = None,
) -> list[dict[str, Any]]:
    """Compare boxes side by side: run, checks, tests, diff, ready time, p95, errors in logs (what
    `wtbox compare --json` prints)."""
    return await in_thread(lambda: _compare(boxes, fanout, sort))


@_blocking
def _pick(host, box, merge_into, push, remote):
    from worktreebox.fleet import pick as P

    chosen, others = P.pick_plan(host, box)
    return P.pick(host, chosen, others, merge_into=merge_into, push=push, remote=remote)


async def box_pick(
    box: BoxRef,
    merge_into: Annotated[str | None, Field(description="Merge the box's branch into this branch first.")] = None,
    push: Annotated[bool, Field(description="Push the branch (merge_into's, if given) to remote.")] = False,
    remote: Annotated[str, Field(description="Remote for push.")] = "origin",
) -> dict[str, Any]:
    """Keep this box of a fan-out (marked keep) and remove the other boxes of its fan-out; no
    committed work is lost (what `wtbox pick --json` prints; boxes it could not remove are
    listed under `failed`)."""
    return await in_thread(lambda: _pick(box, merge_into, push, remote))


# ---------------------------------------------------------------------- resources

def live_resources() -> list[Resource]:
    """status, env and each service's logs of every live box, for resources/list."""
    from worktreebox.telemetry.logs import reader as L

    out = []
    with _Opened() as host:
        for b in host.list():
            base = f"wtbox://box/{b.id}"
            out.append(Resource(uri=f"{base}/status", name=f"{b.id} status", mime_type="application/json",
                                description=f"Status of box {b.id} (task {b.task!r}, {b.state})."))
            out.append(Resource(uri=f"{base}/env", name=f"{b.id} env", mime_type="application/json",
                                description=f"Environment of box {b.id}, secrets masked."))
            try:
                services = L.available_services(b.logs_dir)
            except OSError:
                services = []
            for s in services:
                if not s.startswith("_"):
                    out.append(Resource(uri=f"{base}/logs/{s}", name=f"{b.id} logs {s}",
                                        mime_type="application/jsonl",
                                        description=f"The last {RESOURCE_LOG_LINES} log records of {s} in {b.id}."))
    return out


def _resource(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run a resource reader in a thread; an unknown box is 'not found', other wtbox errors its sentence."""

    @functools.wraps(fn)
    async def read(**kwargs: Any) -> str:
        from worktreebox.errors import NotFound, WtboxError

        try:
            return await anyio.to_thread.run_sync(lambda: fn(**kwargs))
        except NotFound as e:
            raise ResourceNotFoundError(str(e)) from None
        except WtboxError as e:
            raise ResourceError(str(e)) from None

    return read


@_resource
def box_status_resource(box: str) -> str:
    return json.dumps(_status(box, False), indent=2, default=str)


@_resource
def box_env_resource(box: str) -> str:
    return json.dumps(_env(box, False), indent=2, sort_keys=True)


@_resource
def box_logs_resource(box: str, service: str) -> str:
    records = _logs(box, service, None, None, None, None, RESOURCE_LOG_LINES)
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


# ---------------------------------------------------------------------- the server

# A new operation is one async function above (its blocking part through in_thread, taking its
# arguments typed and described) and one line here.
TOOLS: list[tuple[Callable[..., Any], ToolAnnotations]] = [
    (box_new, CHANGES), (box_list, READ_ONLY), (box_status, READ_ONLY), (box_url, READ_ONLY), (box_env, READ_ONLY),
    (box_exec, CHANGES), (box_logs, READ_ONLY), (box_metrics, READ_ONLY), (box_traces, READ_ONLY),
    (box_probe, CHANGES), (box_browse, CHANGES),
    (box_up, CHANGES), (box_down, CHANGES), (box_restart, CHANGES), (box_rm, DESTROYS),
    (fanout, CHANGES), (compare, READ_ONLY), (box_pick, DESTROYS),
]


def build_server(*, allow_secrets: bool = False, **kwargs: Any) -> WtboxMCP:
    """The server with every tool and resource template registered (no transport yet)."""
    server = WtboxMCP(allow_secrets=allow_secrets, **kwargs)
    for fn, annotations in TOOLS:
        server.add_tool(fn, annotations=annotations)
    for uri, fn, mime, doc in (
        ("wtbox://box/{box}/status", box_status_resource, "application/json", "Status of a box (as box_status)."),
        ("wtbox://box/{box}/env", box_env_resource, "application/json", "Environment of a box, secrets masked."),
        ("wtbox://box/{box}/logs/{service}", box_logs_resource, "application/jsonl",
         f"The last {RESOURCE_LOG_LINES} log records of one service of a box."),
    ):
        server.resource(uri, name=fn.__name__.removesuffix("_resource").replace("_", "-"), mime_type=mime,
                        description=doc)(fn)
    return server


def serve_stdio(*, allow_secrets: bool = False) -> None:
    """Serve on stdin/stdout until the client closes them (the SDK keeps stray writes off stdout)."""
    build_server(allow_secrets=allow_secrets).run("stdio")


# ---------------------------------------------------------------------- HTTP: loopback + token

def http_app(server: WtboxMCP, host: str, port: int):
    """The streamable HTTP app at /mcp: bearer token required, Host and Origin limited to this
    loopback address (the SDK's DNS-rebinding protection)."""
    names = ["127.0.0.1", "localhost"] if host == "127.0.0.1" else ["[::1]", "localhost"]
    security = TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=[f"{n}:{port}" for n in names],
        allowed_origins=[f"http://{n}:{port}" for n in names],
    )
    return server.streamable_http_app(streamable_http_path="/mcp", transport_security=security, host=host)


def serve_http(host: str, port: int, token: str, *, allow_secrets: bool = False,
               ready: Callable[[str], None] | None = None) -> None:
    """Serve streamable HTTP on a loopback address (mcp_auth.parse_bind) until SIGINT/SIGTERM;
    `ready(url)` once the socket listens."""
    import socket

    import uvicorn

    from worktreebox.errors import WtboxError
    from worktreebox.mcp.auth import StaticToken

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise WtboxError(f"Cannot listen on {host}:{port}: {e.strerror}; pick another port.") from None
    sock.listen(128)
    port = sock.getsockname()[1]  # the real one when 0 was asked for
    origin = f"http://{f'[{host}]' if family == socket.AF_INET6 else host}:{port}"
    server = build_server(allow_secrets=allow_secrets, token_verifier=StaticToken(token),
                          auth=AuthSettings(issuer_url=origin, resource_server_url=None))
    config = uvicorn.Config(http_app(server, host, port), log_level="warning", access_log=False, lifespan="on")
    if ready:
        ready(origin + "/mcp")
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it shut down on
        pass
