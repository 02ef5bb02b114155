"""What the control API does, apart from HTTP: Toxiproxy's proxies and toxics mapped onto the
proxy's routes, forward listeners and live interceptor chains, and the native flow calls.

A Toxiproxy "proxy" here is a route (its ``upstream`` is the route's server match, its
``listen`` the transparent listeners) or a forward listener (its own ``listen`` and
``upstream``); both share one namespace of names. Each keeps a list of toxics, in the order
they were added; every change rebuilds the list's interceptors with ``make_toxic`` and hands
the whole chain to ``Proxy.set_live_interceptors``, which applies it to the flows in flight
too. Every method either does all it was asked or raises ``ApiError`` with Toxiproxy's status
code and message, having changed nothing.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from uproxy_trio import (
    Address,
    FlowInfo,
    Forward,
    Interceptor,
    Route,
    Routes,
    format_address,
    parse_address,
)

LOGGER = logging.getLogger("uproxy.control")

STREAMS = ("upstream", "downstream")
# Toxiproxy's default listen address, when a client sends none.
DEFAULT_LISTEN = "127.0.0.1:0"

Json = dict[str, Any]


class ApiError(Exception):
    """A refused call: Toxiproxy's status code and message (``{"error": ..., "status": ...}``)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def body(self) -> Json:
        return {"error": self.message, "status": self.status}


def bad_body(reason: str) -> ApiError:
    return ApiError(400, f"bad request body: {reason}")


PROXY_NOT_FOUND = ApiError(404, "proxy not found")
PROXY_EXISTS = ApiError(409, "proxy already exists")
TOXIC_NOT_FOUND = ApiError(404, "toxic not found")
TOXIC_EXISTS = ApiError(409, "toxic already exists")
INVALID_STREAM = ApiError(400, "stream was invalid, can be either upstream or downstream")


class MakeToxic(Protocol):
    """``uproxy_trio.toxics.make_toxic``: an interceptor for one toxic, or ``ValueError``."""

    def __call__(
        self,
        type: str,
        *,
        name: str,
        stream: str,
        toxicity: float,
        attributes: Mapping[str, Any],
        seed: int | None,
    ) -> Interceptor: ...


class ControlledProxy(Protocol):
    """What the control API asks of ``uproxy_trio.Proxy`` (a fake in the unit tests)."""

    @property
    def routes(self) -> Routes | None: ...
    def set_routes(self, routes: Routes | None) -> None: ...
    @property
    def addresses(self) -> list[Address]: ...
    @property
    def forwards(self) -> Mapping[str, tuple[Forward, Address]]: ...
    async def add_forward(self, forward: Forward) -> Address: ...
    async def remove_forward(self, name: str) -> None: ...
    def flows(self) -> list[FlowInfo]: ...
    def reset_flow(self, flow_id: int) -> bool: ...
    def set_live_interceptors(
        self, route: str | None, interceptors: Sequence[Interceptor]
    ) -> None: ...
    def set_enabled(self, route: str, enabled: bool) -> None: ...


@dataclass(frozen=True)
class Toxic:
    """A toxic as the API shows it; ``interceptor`` is what ``make_toxic`` built from it."""

    name: str
    type: str
    stream: str
    toxicity: float
    attributes: Json
    interceptor: Interceptor = field(compare=False, repr=False)

    def as_json(self) -> Json:
        return {
            "name": self.name,
            "type": self.type,
            "stream": self.stream,
            "toxicity": self.toxicity,
            "attributes": self.attributes,
        }


@dataclass
class _State:
    """What the API keeps per proxy name beyond what the core knows."""

    toxics: list[Toxic] = field(default_factory=list)
    enabled: bool = True


class Control:
    """The control API's state and calls, over one running proxy.

    ``reload`` reads the config file again (as SIGHUP does) and returns why it was refused,
    or ``None``; ``toxic_types`` are the names ``make_toxic`` knows.
    """

    def __init__(
        self,
        proxy: ControlledProxy,
        make_toxic: MakeToxic,
        toxic_types: Collection[str],
        *,
        seed: int | None = None,
        reload: Callable[[], str | None] | None = None,
    ) -> None:
        self._proxy = proxy
        self._make_toxic = make_toxic
        self._toxic_types = toxic_types
        self._seed = seed
        self._reload = reload
        self._states: dict[str, _State] = {}

    # -- proxies -------------------------------------------------------------------------

    def names(self) -> list[str]:
        """Every proxy: the routes in table order, then the forwards."""
        routes = [route.name for route in self._proxy.routes or ()]
        return [*routes, *(name for name in self._proxy.forwards if name not in routes)]

    def proxies(self) -> dict[str, Json]:
        return {name: self.proxy(name) for name in self.names()}

    def proxy(self, name: str) -> Json:
        forward = self._proxy.forwards.get(name)
        if forward is not None:
            described, bound = forward
            listen, upstream = format_address(bound), format_address(described.upstream)
        else:
            route = self._route(name)
            listen = ", ".join(format_address(a) for a in self._proxy.addresses)
            upstream = _server_match(route)
        state = self._states.get(name, _State())
        return {
            "name": name,
            "listen": listen,
            "upstream": upstream,
            "enabled": state.enabled,
            "toxics": [toxic.as_json() for toxic in state.toxics],
        }

    async def create_proxy(self, body: object) -> Json:
        """A forward listener from ``{"name", "listen", "upstream", "enabled"}``."""
        fields = _object(body)
        name = _required_string(fields, "name")
        upstream = _required_string(fields, "upstream")
        listen = _optional_string(fields, "listen") or DEFAULT_LISTEN
        enabled = _optional_bool(fields, "enabled", True)
        if name in self.names():
            raise PROXY_EXISTS
        forward = Forward(name, _address(listen, "listen"), _address(upstream, "upstream"))
        await self._add_forward(forward)
        self._states[name] = _State(enabled=enabled)
        if not enabled:
            self._proxy.set_enabled(name, False)
        LOGGER.info("forward %s from %s to %s", name, listen, upstream)
        return self.proxy(name)

    async def update_proxy(self, name: str, body: object) -> Json:
        """Toxiproxy's ``POST /proxies/{name}``: ``enabled``, and for a forward a new
        ``listen`` or ``upstream`` (its toxics stay)."""
        current = self.proxy(name)
        fields = _object(body)
        listen = _optional_string(fields, "listen") or current["listen"]
        upstream = _optional_string(fields, "upstream") or current["upstream"]
        enabled = _optional_bool(fields, "enabled", current["enabled"])
        if (listen, upstream) != (current["listen"], current["upstream"]):
            if name not in self._proxy.forwards:
                raise ApiError(400, f"{name} is a route: its listen and upstream are the config's")
            forward = Forward(name, _address(listen, "listen"), _address(upstream, "upstream"))
            old, bound = self._proxy.forwards[name]
            await self._proxy.remove_forward(name)
            try:
                await self._add_forward(forward)
            except ApiError:
                # The old listener comes back where it was, so a refused change changes nothing.
                await self._proxy.add_forward(replace(old, listen=bound))
                raise
            self._push(name)
            if not current["enabled"]:
                self._proxy.set_enabled(name, False)
        if enabled != current["enabled"]:
            self._proxy.set_enabled(name, enabled)
            self._state(name).enabled = enabled
        return self.proxy(name)

    async def delete_proxy(self, name: str) -> None:
        """A forward stops listening and its flows are reset; a route leaves the table, and
        its flows in flight lose their toxics."""
        self.proxy(name)  # 404 if unknown
        # The core keeps live chains and ``enabled`` by name: a proxy made later under this
        # name must not inherit them.
        self._proxy.set_live_interceptors(name, [])
        self._proxy.set_enabled(name, True)
        if name in self._proxy.forwards:
            await self._proxy.remove_forward(name)
        else:
            routes = self._proxy.routes or Routes()
            self._proxy.set_routes(Routes(r for r in routes if r.name != name))
        self._states.pop(name, None)
        LOGGER.info("proxy %s deleted", name)

    async def populate(self, body: object) -> list[Json]:
        """Toxiproxy's ``POST /populate``: create each proxy, replacing a forward of the same
        name whose listen or upstream differ."""
        if not isinstance(body, list):
            raise bad_body("expected a list of proxies")
        wanted = [_object(item) for item in body]
        for number, fields in enumerate(wanted, 1):
            for key in ("name", "upstream"):
                if not isinstance(fields.get(key), str) or not fields[key]:
                    raise ApiError(400, f"missing required field: {key} at proxy {number}")
        made = []
        for fields in wanted:
            name = fields["name"]
            if name in self.names():
                current = self.proxy(name)
                listen = fields.get("listen") or DEFAULT_LISTEN
                if current["upstream"] == fields["upstream"] and (
                    listen == current["listen"] or listen.endswith(":0")
                ):
                    made.append(current)
                    continue
                await self.delete_proxy(name)
            made.append(await self.create_proxy(fields))
        return made

    def reset(self) -> None:
        """Toxiproxy's ``POST /reset``: every proxy enabled, every toxic removed."""
        for name, state in self._states.items():
            if state.toxics:
                state.toxics = []
                self._proxy.set_live_interceptors(name, [])
            if not state.enabled:
                state.enabled = True
                self._proxy.set_enabled(name, True)
        LOGGER.info("reset: every proxy enabled, every toxic removed")

    # -- toxics --------------------------------------------------------------------------

    def toxics(self, name: str) -> list[Json]:
        self.proxy(name)
        return [toxic.as_json() for toxic in self._state(name).toxics]

    def toxic(self, name: str, toxic_name: str) -> Json:
        return self._find(name, toxic_name).as_json()

    def add_toxic(self, name: str, body: object) -> Json:
        self.proxy(name)
        fields = _object(body)
        stream = fields.get("stream", "downstream")
        if stream not in STREAMS:
            raise INVALID_STREAM
        kind = fields.get("type")
        if not isinstance(kind, str) or kind not in self._toxic_types:
            known = ", ".join(sorted(self._toxic_types))
            # Toxiproxy's words first, which its clients may look for; then the types there are.
            raise ApiError(400, f"invalid toxic type: {kind!r} (known: {known})")
        toxic_name = fields.get("name") or f"{kind}_{stream}"
        if not isinstance(toxic_name, str):
            raise bad_body("name: not a string")
        state = self._state(name)
        if any(toxic.name == toxic_name for toxic in state.toxics):
            raise TOXIC_EXISTS
        toxic = self._build(
            toxic_name,
            kind,
            stream,
            _toxicity(fields.get("toxicity", 1.0)),
            _attributes(fields.get("attributes", {})),
        )
        state.toxics.append(toxic)
        self._push(name)
        LOGGER.info("toxic %s (%s, %s) on %s", toxic_name, kind, stream, name)
        return toxic.as_json()

    def update_toxic(self, name: str, toxic_name: str, body: object) -> Json:
        """New ``attributes`` (merged into the old) and ``toxicity``; the flows in flight get
        the new toxic at once."""
        old = self._find(name, toxic_name)
        fields = _object(body)
        attributes = {**old.attributes, **_attributes(fields.get("attributes", {}))}
        toxicity = _toxicity(fields.get("toxicity", old.toxicity))
        new = self._build(old.name, old.type, old.stream, toxicity, attributes)
        toxics = self._state(name).toxics
        toxics[toxics.index(old)] = new
        self._push(name)
        return new.as_json()

    def remove_toxic(self, name: str, toxic_name: str) -> None:
        old = self._find(name, toxic_name)
        self._state(name).toxics.remove(old)
        self._push(name)
        LOGGER.info("toxic %s removed from %s", toxic_name, name)

    # -- native --------------------------------------------------------------------------

    def flows(self) -> list[Json]:
        return [flow_json(info) for info in self._proxy.flows()]

    def kill_flow(self, flow_id: str) -> None:
        if not flow_id.isdigit() or not self._proxy.reset_flow(int(flow_id)):
            raise ApiError(404, "flow not found")

    def reload(self) -> Json:
        """Read the config file again, as SIGHUP does; toxics and ``enabled`` stay on the
        routes that are still there, and go with the ones that are not."""
        if self._reload is None:
            raise ApiError(409, "no config file to reload (start with --config)")
        refused = self._reload()
        if refused is not None:
            raise ApiError(400, refused)
        for name in list(self._states):
            if name not in self.names():
                # The core keeps a live chain by name: a route that comes back later must
                # not find its old toxics there.
                del self._states[name]
                self._proxy.set_live_interceptors(name, [])
                self._proxy.set_enabled(name, True)
            else:
                self._push(name)
                if not self._states[name].enabled:
                    self._proxy.set_enabled(name, False)
        return {"routes": len(self._proxy.routes or ())}

    # -- helpers -------------------------------------------------------------------------

    def _route(self, name: str) -> Route:
        for route in self._proxy.routes or ():
            if route.name == name:
                return route
        raise PROXY_NOT_FOUND

    def _state(self, name: str) -> _State:
        return self._states.setdefault(name, _State())

    def _find(self, name: str, toxic_name: str) -> Toxic:
        self.proxy(name)
        for toxic in self._state(name).toxics:
            if toxic.name == toxic_name:
                return toxic
        raise TOXIC_NOT_FOUND

    def _build(self, name: str, kind: str, stream: str, toxicity: float, attributes: Json) -> Toxic:
        try:
            interceptor = self._make_toxic(
                kind,
                name=name,
                stream=stream,
                toxicity=toxicity,
                attributes=attributes,
                seed=self._seed,
            )
        except ValueError as exc:
            raise ApiError(400, f"bad toxic attributes: {exc}") from None
        return Toxic(name, kind, stream, toxicity, attributes, interceptor)

    def _push(self, name: str) -> None:
        toxics = self._state(name).toxics
        self._proxy.set_live_interceptors(name, [toxic.interceptor for toxic in toxics])

    async def _add_forward(self, forward: Forward) -> None:
        try:
            await self._proxy.add_forward(forward)
        except OSError as exc:
            # Toxiproxy answers a listener that cannot bind with a 500 and the reason; the
            # core's says where ("cannot listen on 127.0.0.1:6379: address already in use").
            raise ApiError(500, exc.strerror or str(exc)) from None
        except ValueError as exc:
            raise ApiError(409, str(exc)) from None


def flow_json(info: FlowInfo) -> Json:
    """One flow as ``GET /flows`` lists it."""
    flow = info.flow
    return {
        "id": flow.id,
        "transport": flow.transport,
        "client": format_address(flow.client),
        "server": format_address(flow.server),
        "route": info.route,
        "interceptors": list(info.interceptors),
        "bytes_client_to_server": info.bytes_client_to_server,
        "bytes_server_to_client": info.bytes_server_to_client,
        "age_s": round(info.age_s, 3),
    }


def _server_match(route: Route) -> str:
    """A route's ``upstream``: its server network and port, ``*`` for any."""
    network = route.server or "*"
    if ":" in network:
        network = f"[{network}]"
    return f"{network}:{route.port if route.port is not None else '*'}"


def _object(body: object) -> Json:
    if not isinstance(body, dict):
        raise bad_body("expected a JSON object")
    return body


def _required_string(fields: Json, key: str) -> str:
    value = fields.get(key)
    if value is None or value == "":
        raise ApiError(400, f"missing required field: {key}")
    if not isinstance(value, str):
        raise bad_body(f"{key}: not a string")
    return value


def _optional_string(fields: Json, key: str) -> str | None:
    value = fields.get(key)
    if value is not None and not isinstance(value, str):
        raise bad_body(f"{key}: not a string")
    return value


def _optional_bool(fields: Json, key: str, default: bool) -> bool:
    value = fields.get(key, default)
    if not isinstance(value, bool):
        raise bad_body(f"{key}: not true or false")
    return value


def _toxicity(value: object) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not 0 <= value <= 1
    ):
        raise bad_body(f"toxicity: {value!r} is not a number from 0 to 1")
    return float(value)


def _attributes(value: object) -> Json:
    if not isinstance(value, dict):
        raise bad_body("attributes: expected a JSON object")
    return dict(value)


def _address(text: str, key: str) -> Address:
    """An IP literal and port; ``localhost`` is taken as 127.0.0.1, as Toxiproxy's clients
    and docs write it."""
    host, sep, port = text.rpartition(":")
    if sep and host == "localhost":
        text = f"127.0.0.1:{port}"
    elif sep and host in ("", "0.0.0.0"):  # Toxiproxy's ":PORT", any address
        text = f"0.0.0.0:{port}"
    try:
        if text.endswith(":0"):
            # Port 0: the kernel picks one, as Toxiproxy allows (parse_address refuses 0).
            address = parse_address(text[:-2] + ":1")
            return (address[0], 0)
        return parse_address(text)
    except ValueError as exc:
        raise bad_body(f"{key}: {exc}") from None
