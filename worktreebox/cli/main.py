"""The `wtbox` command: a lazy click group (each command's module is imported only when used,
so `wtbox ls` stays fast)."""
from __future__ import annotations

import importlib
import os
import sys

import click

from worktreebox import diagnostics, settings

COMMANDS = {
    "new": "box:new",
    "ls": "box:ls",
    "status": "box:status",
    "env": "box:env",
    "exec": "box:exec_",
    "shell": "box:shell",
    "rm": "box:rm",
    "net": "network:net",
    "expose": "network:expose",
    "init": "init:init",
    "test": "testcmd:test",
    "doctor": "doctor:doctor",
    "db": "db:db",
    "logs": "logs:logs",
    "up": "services:up",
    "down": "services:down",
    "restart": "services:restart",
    "metrics": "metrics:metrics",
    "probe": "metrics:probe",
    "traces": "traces:traces",
    "top": "top:top",
    "gc": "gc:gc",
    "keep": "gc:keep",
    "unkeep": "gc:unkeep",
    "fanout": "fanout:fanout",
    "compare": "fanout:compare",
    "diff": "diff:diff",
    "pick": "fanout:pick",
    "pool": "pool:pool",
    "mcp": "mcp:mcp",
    "browse": "browse:browse",
    "server": "server:server",
    "snapshot": "state:snapshot",
    "restore": "state:restore",
    "fork": "state:fork",
    "url": "router:url",
    "open": "router:open_",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None:
            return None
        mod, attr = target.split(":")
        try:
            return getattr(importlib.import_module(f"worktreebox.cli.commands.{mod}"), attr)
        except (ModuleNotFoundError, AttributeError):
            return None


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="worktreebox")
@click.option("-v", "--verbose", is_flag=True, help="Debug diagnostics on stderr (as WTBOX_DEBUG=1).")
def main(verbose: bool) -> None:
    """Isolated, disposable development boxes: a git worktree plus its own ports, database,
    caches, services, logs and metrics."""
    if verbose:
        diagnostics.configure(verbose=True)


def run() -> None:
    diagnostics.configure()
    try:  # Ctrl-C from here on, in what runs before the command too: "interrupted", 130
        _before_the_command()
        rv = main(standalone_mode=False)
    except click.exceptions.Abort as e:
        interrupted = (isinstance(e.__context__, (KeyboardInterrupt, EOFError))
                       or isinstance(e.__cause__, KeyboardInterrupt))
        click.echo("wtbox: interrupted." if interrupted else "wtbox: aborted.", err=True)
        sys.exit(130 if interrupted else 1)
    except click.exceptions.NoArgsIsHelpError as e:  # `wtbox`, `wtbox db`: the help, as click prints it
        e.show()
        sys.exit(e.exit_code)
    except click.ClickException as e:
        click.echo(f"wtbox: {usage_sentence(e)}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("wtbox: interrupted.", err=True)
        sys.exit(130)
    except Exception as e:  # an unexpected failure: one sentence naming the crash log (and the traceback if debugging)
        message = diagnostics.internal_error(e, ["wtbox", *sys.argv[1:]])
        if diagnostics.debugging():
            raise
        click.echo(f"wtbox: {message}", err=True)
        sys.exit(1)
    sys.exit(rv if isinstance(rv, int) else 0)


def _before_the_command() -> None:
    """A background gc once an hour, and a router brought back after a kill or a reboot."""
    if len(sys.argv) > 1 and sys.argv[1] not in ("gc", "--help", "-h", "--version") and not settings.NO_AUTO_GC.on():
        from worktreebox.host import default_home

        home = default_home()
        if _gc_due(home):
            from worktreebox.fleet.gc import start_background_gc

            start_background_gc(home)
    if len(sys.argv) > 1 and sys.argv[1] not in ("gc", "doctor", "server", "--help", "-h", "--version"):
        revive_router()


def revive_router() -> None:
    """A router that was killed (kill -9, a reboot) comes back with every route before the command
    runs: a file read and a /proc read when it is fine (gc brings it in step itself)."""
    from worktreebox.host import default_home
    from worktreebox.router.state import needs_revive

    home = default_home()
    if not needs_revive(home):
        return
    from worktreebox.errors import WtboxError
    from worktreebox.host import Host
    from worktreebox.resources.router import push

    try:
        push(Host(home))
    except WtboxError:  # e.g. an unreadable config.toml: the command itself says so
        pass


def usage_sentence(e: click.ClickException) -> str:
    """click's usage errors as one line (click prints a usage block, a hint and the error on three)."""
    msg = " ".join(e.format_message().split()).rstrip(". ")
    ctx = getattr(e, "ctx", None)
    if isinstance(e, click.UsageError) and ctx is not None:
        return f"{msg} (see '{ctx.command_path} --help')."
    return f"{msg}."


AUTO_GC_INTERVAL = 3600.0


def _gc_due(home) -> bool:
    """One stat: has an hour passed since the last gc? (the gc module is imported only then)"""
    import time

    try:
        return time.time() - os.stat(home / ".last-gc").st_mtime >= AUTO_GC_INTERVAL
    except FileNotFoundError:
        return os.path.exists(home / "registry.sqlite3")  # nothing was ever made here: no gc


if __name__ == "__main__":
    run()
