"""``uproxy serve --config FILE.toml``: the file's options and routes, checked, or one line that
names the file and the key and says what is wrong.

The top-level keys are ``serve``'s long options with ``_`` for ``-``; the command line (and
its ``UPROXY_*`` variables) override them. ``[[routes]]`` tables become a ``Routes`` table,
their interceptors loaded exactly as ``--interceptor`` SPECs are (nothing in a SPEC is
evaluated). Here each value is checked for its type and range; what a top-level value means
(an address, one of a few words) is checked with the command line's own checks, by
``serve``, which knows whether the value came from here.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from uproxy_trio import Forward, Interceptor, Route, Routes

from ._forwards import parse_forward
from ._spec import SpecError, load_interceptor


class ConfigError(Exception):
    """What is wrong with a config file, as one line that starts with the file's name."""


def _strings(value: object) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValueError(f"{value!r} is not a list of strings")
    return value


def _string(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a string")
    return value


def _seconds(least: float) -> Callable[[object], float]:
    def check(value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or value < least:
            raise ValueError(f"{value!r} is not a number of seconds of at least {least}")
        return float(value)

    return check


def _count(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{value!r} is not a whole number of at least 1")
    return value


def _port(value: object) -> int | str:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"{value!r} is not a port or FIRST-LAST")
    return value  # its range is Route's to check


def _integer(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{value!r} is not a whole number")
    return value


def _workers(value: object) -> str:
    if value == "auto":
        return value
    return str(_count(value))


# serve's options, as the file spells them, and the check for each value's type and range
# (the command line's own minimums).
OPTIONS: Mapping[str, Callable[[object], object]] = {
    "listen": _strings,
    "connect_timeout": _seconds(0.001),
    "label": _string,
    "interceptor": _strings,
    "grace": _seconds(0),
    "max_flows": _count,
    "idle_timeout": _seconds(0.001),
    "udp_listen": _strings,
    "udp_idle_timeout": _seconds(0.001),
    "max_udp_sessions": _count,
    "udp_gso": _string,
    "source_port": _string,
    "user": _string,
    "group": _string,
    "workers": _workers,
    "metrics": _string,
    "control": _string,
    "forward": _strings,
    "seed": _integer,
    "toxic_type": _strings,
    "log_level": _string,
    "log_format": _string,
}

ROUTE_KEYS: Mapping[str, Callable[[object], object]] = {
    "name": _string,
    "transport": _string,
    "client": _string,
    "server": _string,
    "port": _port,
    "interceptors": _strings,
    "idle_timeout": _seconds(0.001),
    "connect_timeout": _seconds(0.001),
}

FORWARD_KEYS: Mapping[str, Callable[[object], object]] = {
    "name": _string,
    "listen": _string,
    "upstream": _string,
    "interceptors": _strings,
}

# The arrays of tables a file may hold beside the options.
TABLES = ("routes", "forwards")


@dataclass(frozen=True, slots=True)
class ConfigFile:
    """A config file read and checked: its options (``serve``'s parameter names), its
    routes and its forwards, loaded."""

    path: Path
    options: dict[str, Any]
    routes: Routes
    forwards: tuple[Forward, ...] = ()

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.path}: {key}: {message}")


def read_config(path: Path) -> ConfigFile:
    """Read and check ``path``, loading its routes' interceptors; ``ConfigError`` if any of it
    is wrong."""
    try:
        with path.open("rb") as file:
            document = tomllib.load(file)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not TOML: not UTF-8 text") from None
    options = _checked(
        str(path),
        {key: value for key, value in document.items() if key not in TABLES},
        OPTIONS,
        f"the keys are {', '.join(sorted([*OPTIONS, *TABLES]))}",
    )
    routes = _routes(path, _tables(path, document, "routes"))
    forwards = _forwards(path, _tables(path, document, "forwards"), routes)
    return ConfigFile(path, options, routes, forwards)


def _tables(path: Path, document: dict[str, Any], key: str) -> list[dict[str, Any]]:
    tables = document.get(key, [])
    if not isinstance(tables, list) or not all(isinstance(table, dict) for table in tables):
        raise ConfigError(f"{path}: {key}: not an array of tables (write [[{key}]])")
    return tables


def _checked(
    where: str,
    table: Mapping[str, Any],
    checks: Mapping[str, Callable[[object], object]],
    known: str,
) -> dict[str, Any]:
    """``table``'s values, each through its key's check: a ``ConfigError`` at ``where`` for a
    bad value, or for a key with no check (``known`` says which keys there are)."""
    checked: dict[str, Any] = {}
    for key, value in table.items():
        check = checks.get(key)
        if check is None:
            raise ConfigError(f"{where}: {key}: unknown key ({known})")
        try:
            checked[key] = check(value)
        except ValueError as exc:
            raise ConfigError(f"{where}: {key}: {exc}") from None
    return checked


def _where(path: Path, key: str, number: int, table: Mapping[str, Any]) -> str:
    """How an error names the file's ``number``th ``[[key]]`` table (by its name, if it has
    one that is a string)."""
    name = table.get("name")
    return f"{path}: [[{key}]] #{number}" + (f" {name!r}" if isinstance(name, str) else "")


def _loaded(where: str, specs: list[str]) -> list[Interceptor]:
    """A table's ``interceptors``, loaded as ``--interceptor`` SPECs are."""
    try:
        return [load_interceptor(spec) for spec in specs]
    except SpecError as exc:
        raise ConfigError(f"{where}: interceptors: {exc}") from None


def _forwards(path: Path, tables: list[dict[str, Any]], routes: Routes) -> tuple[Forward, ...]:
    forwards: list[Forward] = []
    taken = {route.name for route in routes}
    for number, table in enumerate(tables, 1):
        where = _where(path, "forwards", number, table)
        fields = _checked(
            where, table, FORWARD_KEYS, f"a forward's keys are {', '.join(FORWARD_KEYS)}"
        )
        for key in ("listen", "upstream"):
            if key not in fields:
                raise ConfigError(f"{where}: {key}: missing (a forward has a listen and upstream)")
        interceptors = _loaded(where, fields.get("interceptors", []))
        try:
            forward = parse_forward(
                f"{fields['listen']}={fields['upstream']}", fields.get("name"), interceptors
            )
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if forward.name in taken:
            raise ConfigError(f"{where}: name: a route or forward is named {forward.name!r}")
        taken.add(forward.name)
        forwards.append(forward)
    return tuple(forwards)


def _routes(path: Path, tables: list[dict[str, Any]]) -> Routes:
    routes: list[Route] = []
    for number, table in enumerate(tables, 1):
        where = _where(path, "routes", number, table)
        name = table.get("name")
        if name is None:
            raise ConfigError(f"{where}: name: missing (every route has a name)")
        fields = _checked(where, table, ROUTE_KEYS, f"a route's keys are {', '.join(ROUTE_KEYS)}")
        fields["interceptors"] = _loaded(where, fields.get("interceptors", []))
        if name in (route.name for route in routes):
            raise ConfigError(f"{where}: name: another route is named {name!r}")
        try:
            routes.append(Route(**fields))
        except ValueError as exc:  # the message starts with the field: "port: ..."
            raise ConfigError(f"{where}: {exc}") from None
    return Routes(routes)
