"""Config files as declared schemas on cfgv: which tables and keys there are, each key's parser
(values.py), and every problem as one sentence naming the file, the table and the key.

cfgv over pydantic: importing cfgv costs ~1 ms, pydantic ~85-110 ms plus ~30 ms to build the
models (measured here), and a config is parsed by fresh processes whose start-up counts (`new`
run in process, a claim from the warm pool, each box's supervisor). The wording stays ours:
each parser says what it expected, cfgv carries where.

A schema is a `cfgv.Map` of the items below, as pre-commit declares its own. `cfgv.validate`
checks a document; `cfgv.apply_defaults` then returns it with each present key parsed (absent
keys stay absent: the dataclasses in repo.py and host.py hold the defaults).
"""
from __future__ import annotations

import tomllib
from typing import Any

import cfgv

from worktreebox.config.values import PORT_NAME, Invalid, Parser
from worktreebox.errors import ConfigError


class At:
    """A step on the way to a problem, as cfgv's context: into a table, or to a key."""

    __slots__ = ("key", "table")

    def __init__(self, *, table: str | None = None, key: str | None = None) -> None:
        self.table, self.key = table, key


class Key:
    """A key of a table and its parser; a required key missing is parsed as None (and refused).
    cfgv checks with it first, then converts with it: each value is parsed twice (microseconds)."""

    __slots__ = ("key", "parse", "required")

    def __init__(self, key: str, parse: Parser, *, required: bool = False) -> None:
        self.key, self.parse, self.required = key, parse, required

    def check(self, table: dict[str, Any]) -> None:
        if self.key in table or self.required:
            with cfgv.validate_context(At(key=self.key)):
                self.parse(table.get(self.key))

    def apply_default(self, table: dict[str, Any]) -> None:
        if self.key in table or self.required:
            table[self.key] = self.parse(table.get(self.key))

    def remove_default(self, table: dict[str, Any]) -> None:
        raise AssertionError("config is never written back")


class Table:
    """[key]: a table of the document, checked by `schema` (a cfgv.Map)."""

    __slots__ = ("key", "schema")

    def __init__(self, key: str, schema: cfgv.Map) -> None:
        self.key, self.schema = key, schema

    def check(self, doc: dict[str, Any]) -> None:
        if self.key in doc:
            with cfgv.validate_context(At(table=self.key)):
                if not isinstance(doc[self.key], dict):
                    raise Invalid(f"must be a table, got {doc[self.key]!r}", sep=" ")
                cfgv.validate(doc[self.key], self.schema)

    def apply_default(self, doc: dict[str, Any]) -> None:
        doc[self.key] = cfgv.apply_defaults(doc.get(self.key, {}), self.schema)

    def remove_default(self, doc: dict[str, Any]) -> None:
        raise AssertionError("config is never written back")


class NamedTables:
    """[prefix.<name>]: a table per name ([services.web], [deps.bundle]), each checked by `schema`.
    With `among_keys`, the named tables sit among plain keys of the same table (as in [deps]) and
    are gathered under `into`; otherwise every entry must be a table."""

    __slots__ = ("among_keys", "into", "needs", "prefix", "schema", "what")

    def __init__(self, prefix: str, what: str, schema: cfgv.Map, *, into: str | None = None,
                 among_keys: tuple[str, ...] | None = None, needs: str = 'cmd = "..."') -> None:
        self.prefix, self.what, self.schema = prefix, what, schema  # what: "service", "recipe"
        self.into, self.among_keys, self.needs = into, among_keys, needs  # needs: its required key, as written

    def names(self, table: dict[str, Any]) -> list[str]:
        if self.among_keys is None:
            return list(table)
        return [k for k, v in table.items() if k not in self.among_keys and isinstance(v, dict)]

    def check(self, table: dict[str, Any]) -> None:
        for name in self.names(table):
            self._check_one(name, table[name])

    def _check_one(self, name: str, value: Any) -> None:
        with cfgv.validate_context(At(table=f"{self.prefix}.{name!r}")):
            if not PORT_NAME.match(name):
                raise Invalid(f"{self.what} names are lowercase letters, digits and '_'")
        with cfgv.validate_context(At(table=f"{self.prefix}.{name}")):
            if not isinstance(value, dict):
                raise Invalid(f"must be a table with at least {self.needs}", sep=" ")
            cfgv.validate(value, self.schema)

    def apply_default(self, table: dict[str, Any]) -> None:
        parsed = {name: cfgv.apply_defaults(table.pop(name), self.schema) for name in self.names(table)}
        if self.into:
            table[self.into] = parsed
        else:
            table.update(parsed)

    def remove_default(self, table: dict[str, Any]) -> None:
        raise AssertionError("config is never written back")


class NoOtherKeys:
    """Unknown keys refused, naming the known ones (a misspelt key is never silently ignored).
    `sections`: these are the document's tables. `among_tables`: named tables may sit beside."""

    __slots__ = ("among_tables", "keys", "sections")

    def __init__(self, keys: tuple[str, ...], *, sections: bool = False, among_tables: bool = False) -> None:
        self.keys, self.sections, self.among_tables = keys, sections, among_tables

    def check(self, table: dict[str, Any]) -> None:
        known = ", ".join(sorted(self.keys))
        for key, value in table.items():
            if key in self.keys or (self.among_tables and isinstance(value, dict)):
                continue
            if self.sections:
                raise Invalid(f"unknown section [{key}]; known sections: {known}")
            raise Invalid(f"has an unknown key {key!r}; known keys: {known}", sep=" ")

    def apply_default(self, table: dict[str, Any]) -> None:
        pass

    def remove_default(self, table: dict[str, Any]) -> None:
        pass


def table(name: str, *items: Key | NamedTables, among_tables: bool = False) -> cfgv.Map:
    """A table's schema: its keys in the order they are checked, unknown keys refused first."""
    keys = tuple(item.key for item in items if isinstance(item, Key))
    return cfgv.Map(name, None, NoOtherKeys(keys, among_tables=among_tables), *items)


def document(name: str, *tables: Table) -> cfgv.Map:
    """A whole file's schema: its tables, unknown ones refused first."""
    return cfgv.Map(name, None, NoOtherKeys(tuple(t.key for t in tables), sections=True), *tables)


def loads(text: str, source: str) -> dict[str, Any]:
    """TOML text as a document; a ConfigError naming the file when it is not TOML."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source} is not valid TOML: {e}.") from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise ConfigError(f"{source} is not valid TOML: {str(e).split(';')[0]}.") from None


def validated(schema: cfgv.Map, doc: dict[str, Any], source: str) -> dict[str, Any]:
    """The document with every present key parsed; a ConfigError naming file, table and key."""
    try:
        cfgv.validate(doc, schema)
    except cfgv.ValidationError as e:
        raise ConfigError(sentence(source, e)) from None
    parsed: dict[str, Any] = cfgv.apply_defaults(doc, schema)
    return parsed


def sentence(source: str, error: cfgv.ValidationError) -> str:
    """"<file>: [table] key: <complaint>." from cfgv's chain of contexts."""
    steps: list[At] = []
    while isinstance(error.error_msg, cfgv.ValidationError):
        if isinstance(error.ctx, At):
            steps.append(error.ctx)
        error = error.error_msg
    tables = [i for i, step in enumerate(steps) if step.table is not None]
    where = source + (f": [{steps[tables[-1]].table}]" if tables else "")
    keys = [step.key for step in steps[tables[-1] + 1 if tables else 0:] if step.key is not None]
    part = getattr(error, "part", None)
    if part is not None:
        keys.append(part)
    if keys:
        where += " " + ".".join(keys)
    return f"{where}{getattr(error, 'sep', ': ')}{error.error_msg}."

