"""The MCP tools, made from the operations' declarations (operations/).

The SDK reads a tool's parameters from `inspect.signature(fn, eval_str=True)` and its Context
parameter from the type hints: each tool is a generated function whose `__signature__` has an
`Annotated[type, Field(...)]` per declared parameter (plus the MCP-only extras listed in
operations/exceptions.py), and `__annotations__` to match. Tools return what the CLI's `--json`
prints; blocking work runs in a worker thread with a Host of its own (calls.py).
"""
from __future__ import annotations

import dataclasses
import inspect
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Annotated, Any, Literal

from mcp.server.mcpserver import Context
from mcp_types import ToolAnnotations
from pydantic import Field

from worktreebox.mcp.calls import Opened, Progress, in_thread, reveal
from worktreebox.operations import boxes, fleet, network, observe, router, services, state
from worktreebox.operations.spec import CHANGES, DESTROYS, READ_ONLY, SHOW_SECRETS, Operation, Param

ANNOTATIONS = {
    READ_ONLY: ToolAnnotations(read_only_hint=True, destructive_hint=False, open_world_hint=False),
    CHANGES: ToolAnnotations(read_only_hint=False, destructive_hint=False, open_world_hint=False),
    DESTROYS: ToolAnnotations(read_only_hint=False, destructive_hint=True, open_world_hint=False),
}
Body = Callable[..., Awaitable[Any]]  # body(ctx, **params)


def annotation(p: Param) -> Any:
    """The pydantic annotation of a declared parameter: its type, choices, range and description."""
    kind: Any = Literal[p.choices] if p.choices else p.type
    if p.many:
        kind = list[kind] | kind  # a list, or one value
    if p.default is None:
        kind = kind | None
    return Annotated[kind, Field(description=p.help, ge=p.min, le=p.max)]


def tool_signature(op: Operation, params: Sequence[Param]) -> inspect.Signature:
    def default(p: Param) -> Any:
        if p.required:
            return inspect.Parameter.empty
        return list(p.default) if p.many else p.default

    out = [inspect.Parameter(p.name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation(p), default=default(p))
           for p in params]
    out.append(inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=Context))
    return inspect.Signature(out, return_annotation=op.returns)


def description(op: Operation) -> str:
    return f"{op.help} Returns what `wtbox {op.name} --json` prints." + (f" {op.result}" if op.result else "")


def make_tool(op: Operation, body: Body | None = None, *, extras: Sequence[Param] = (),
              defaults: dict[str, Any] | None = None) -> Callable[..., Awaitable[Any]]:
    """The tool of `op`: its declared parameters (with MCP's own `defaults` where they differ) plus
    `extras`; `body(ctx, **params)` runs it (default: op.perform in a thread)."""
    params = [dataclasses.replace(p, default=(defaults or {}).get(p.name, p.default)) for p in op.params]
    sig = tool_signature(op, [*params, *extras])
    run = body or performed(op)

    async def call(**kwargs: Any) -> Any:
        ctx = kwargs.pop("ctx", None)
        return await run(ctx, **kwargs)

    call.__name__ = call.__qualname__ = str(op.tool)
    call.__doc__ = description(op)
    call.__signature__ = sig  # type: ignore[attr-defined]
    call.__annotations__ = {**{n: p.annotation for n, p in sig.parameters.items()}, "return": op.returns}
    return call


def performed(op: Operation) -> Body:
    """The plain body: op.perform(host, **params) in a worker thread (show_secrets honoured only
    on a server started with --allow-secrets)."""

    async def body(ctx: Context | None, **params: Any) -> Any:
        if "show_secrets" in params:
            params["show_secrets"] = reveal(ctx, params["show_secrets"])

        def work() -> Any:
            with Opened() as host:
                return op.perform(host, **params)

        return await in_thread(work)

    return body


# ---------------------------------------------------------------------- bodies that do more

async def new_body(ctx: Context, show_secrets: bool = False, **params: Any) -> Any:
    """Host.new in a worker thread, watching the call's cancel event: a cancelled call rolls back
    exactly as Ctrl-C does, wherever the creation is (system/cancel.py)."""
    from worktreebox.errors import Interrupted
    from worktreebox.system import cancel

    shown = reveal(ctx, show_secrets)
    event = threading.Event()
    progress = Progress(ctx, event)

    def work() -> Any:
        with cancel.watching(event), Opened() as host:
            try:
                return boxes.new(host, show_secrets=shown, progress=progress, on_wait=progress, **params)
            except cancel.Cancelled:  # cancelled outside Host.new's own rollback (nothing was made yet)
                raise Interrupted("Interrupted; nothing was made.") from None

    return await in_thread(work, event)


async def exec_body(ctx: Context, show_secrets: bool = False, **params: Any) -> Any:
    shown = reveal(ctx, show_secrets)
    event = threading.Event()

    def work() -> Any:
        with Opened() as host:
            return boxes.run(host, show_secrets=shown, cancel=event, **params)

    return await in_thread(work, event)


async def fanout_body(ctx: Context, **params: Any) -> Any:
    """Progress per finished attempt; a cancelled call interrupts the wait as Ctrl-C does."""
    from worktreebox.fleet.fanout import FINAL
    from worktreebox.system.cancel import Cancelled

    event = threading.Event()
    progress = Progress(ctx, event, total=params["n"])

    def changed(fo: Any, a: Any) -> None:
        done = sum(1 for x in fo.attempts if x.state in FINAL)
        progress(f"{a.box_id or a.task}: {a.state}" + (f" ({a.detail})" if a.detail else ""), done)

    def tick() -> None:  # in Fanout.wait(): a cancelled call interrupts like Ctrl-C
        if event.is_set():
            raise Cancelled()

    def work() -> Any:
        with Opened() as host:
            return fleet.fanout(host, on_change=changed, tick=tick, **params)

    return await in_thread(work, event)


EXEC_EXTRAS = (
    Param("cwd", "Directory to run in, relative to the box's worktree (default: the worktree); paths outside "
                 "it are refused."),
    Param("timeout", "Seconds before the command is stopped (exit code 124).", float, 600.0, min=0),
    Param("tail", "Keep the last N lines of stdout and of stderr.", int, 100, min=0, max=10000),
    SHOW_SECRETS,
)


def all_tools() -> list[tuple[Callable[..., Any], Operation]]:
    """Every tool, in the order tools/list shows them."""
    return [(fn, op) for fn, op in (
        (make_tool(boxes.NEW, new_body), boxes.NEW),
        (make_tool(boxes.LS), boxes.LS),
        (make_tool(boxes.STATUS), boxes.STATUS),
        (make_tool(router.URL), router.URL),
        (make_tool(boxes.ENV, extras=[SHOW_SECRETS]), boxes.ENV),
        (make_tool(boxes.EXEC, exec_body, extras=EXEC_EXTRAS), boxes.EXEC),
        (make_tool(boxes.TEST), boxes.TEST),
        (make_tool(observe.LOGS, defaults={"tail": 200}), observe.LOGS),
        (make_tool(observe.METRICS), observe.METRICS),
        (make_tool(observe.TRACES), observe.TRACES),
        (make_tool(observe.PROBE), observe.PROBE),
        (make_tool(observe.BROWSE), observe.BROWSE),
        (make_tool(services.UP), services.UP),
        (make_tool(services.DOWN), services.DOWN),
        (make_tool(services.RESTART), services.RESTART),
        (make_tool(boxes.RM), boxes.RM),
        (make_tool(network.NET), network.NET),
        (make_tool(network.EXPOSE), network.EXPOSE),
        (make_tool(fleet.FANOUT, fanout_body), fleet.FANOUT),
        (make_tool(fleet.COMPARE), fleet.COMPARE),
        (make_tool(fleet.DIFF), fleet.DIFF),
        (make_tool(fleet.PICK), fleet.PICK),
        (make_tool(state.SNAPSHOT), state.SNAPSHOT),
        (make_tool(state.RESTORE), state.RESTORE),
        (make_tool(state.FORK), state.FORK),
        (make_tool(state.DB_RESET), state.DB_RESET),
        (make_tool(state.DB_DUMP), state.DB_DUMP),
    )]
