"""What `wtbox init` derived from a repo: every value with where it came from, and what it could not map.

Readers (one module per source) fill one Plan in precedence order; the first source to say a
thing wins and a later one that says it differently is noted, never merged silently. The writer
turns a Plan into wtbox.toml with a provenance comment on each line; `--explain` prints it.
"""
from __future__ import annotations

import dataclasses
from typing import Any


def tpl(expr: str) -> str:
    """A Jinja2 expression as wtbox.toml writes it: tpl("ports.web") is "{{ ports.web }}"."""
    return "{{ " + expr + " }}"


@dataclasses.dataclass
class Fact:
    """One derived value and where it came from ("compose.yaml services.web")."""

    value: Any
    origin: str
    note: str = ""  # what was rewritten, e.g. "redis://redis:6379/0 → the box's redis"


@dataclasses.dataclass
class ServicePlan:
    name: str
    cmd: Fact
    port: str | None = None  # the box port name it listens on
    ready: Fact | None = None
    depends_on: list[str] = dataclasses.field(default_factory=list)
    env: dict[str, Fact] = dataclasses.field(default_factory=dict)
    cwd: str | None = None


@dataclasses.dataclass
class Target:
    """Something a repo's variables may point at: the box database, a backing service, an app service."""

    kind: str  # "db" | "backing" | "app"
    name: str  # backing or service name ("db" for the database)
    port: int | None = None  # its canonical port (where the repo's files reach it)

    def template(self, attr: str) -> str:
        if self.kind == "db":
            return tpl(f"db.{attr}")
        if self.kind == "backing":
            return tpl(f"backing.{self.name}.{attr}")
        return "127.0.0.1" if attr == "host" else tpl(f"ports.{self.name}")


@dataclasses.dataclass
class Plan:
    files: list[str] = dataclasses.field(default_factory=list)  # the files read, in precedence order
    backing: dict[str, Fact] = dataclasses.field(default_factory=dict)  # name -> image
    database: Fact | None = None  # the PostgreSQL service the box database stands for
    services: dict[str, ServicePlan] = dataclasses.field(default_factory=dict)
    env: dict[str, Fact] = dataclasses.field(default_factory=dict)  # -> [box] env
    setup: Fact | None = None
    migrate: Fact | None = None
    test: Fact | None = None
    notes: list[str] = dataclasses.field(default_factory=list)  # what could not be mapped, one sentence each
    mapped: list[str] = dataclasses.field(default_factory=list)  # what is covered without a line (dependency layers)
    # Host names and published ports the repo's files use for each target ("redis", ("localhost", 6379)).
    hosts: dict[str, Target] = dataclasses.field(default_factory=dict)
    published: dict[int, Target] = dataclasses.field(default_factory=dict)

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def first(self, attr: str, fact: Fact) -> None:
        """Set setup/migrate/test unless an earlier source set it; a different later one is noted."""
        old = getattr(self, attr)
        if old is None:
            setattr(self, attr, fact)
        elif old.value != fact.value:
            self.note(f"{fact.origin}: {attr} command {fact.value!r} not used; {old.origin} gave {old.value!r} first.")

    def add_env(self, name: str, fact: Fact) -> None:
        old = self.env.get(name)
        if old is None:
            self.env[name] = fact
        elif old.value != fact.value:
            self.note(f"{fact.origin}: {name} = {fact.value!r} not used; {old.origin} set it first.")

    @property
    def empty(self) -> bool:
        return not (self.backing or self.database or self.services or self.env or self.setup or self.migrate
                    or self.test)
