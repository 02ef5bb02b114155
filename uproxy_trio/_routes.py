"""Which route a flow takes: the routes a user wrote, in order, and the first one that matches.

A route picks flows by transport, client network, server network and server port (any of them,
all when absent), and says what happens to them: their interceptors and timeouts. The proxy
asks ``Routes.position`` once per flow, at accept, so matching must cost little next to a
flow's life even with many routes. A loop over 100 routes cost 1.8 µs here comparing ports
alone, so instead the table is cut, per dimension, into intervals (ports, and addresses per IP
family) that each carry the bit mask of the routes they satisfy. A flow's
candidates are those masks ANDed, dimension by dimension, stopping as soon as none is left; the
lowest bit left is the first route in file order. A dimension no remaining candidate constrains
is skipped, so a flow pays for a client address only when a route that could still match names
a client network. ``tests/perf_routes.py`` measures it.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from bisect import bisect_right
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import overload

from ._address import Address
from ._interceptor import Interceptor

TRANSPORTS = ("tcp", "udp")

# A route's name goes into the access-log line as route=NAME: one word, no quoting needed.
_NAME = re.compile(r"[A-Za-z0-9_.:@/+-]+")

_PORTS = re.compile(r"(?P<first>[0-9]+)(?:\s*-\s*(?P<last>[0-9]+))?")

_FAMILIES = {4: socket.AF_INET, 6: socket.AF_INET6}
_WIDTHS = {4: 4, 6: 16}


@dataclass(frozen=True, slots=True)
class Network:
    """An IP network as a range of integers: what matching compares a flow's address with."""

    version: int
    first: int
    last: int


def parse_network(text: str) -> Network:
    """``192.0.2.0/24``, ``2001:db8::/32``, or one address (``192.0.2.7``, a /32 or /128).

    Raises ``ValueError`` with a one-line reason; a network with host bits set is refused
    rather than silently widened, since ``192.0.2.7/24`` is most likely a typo.
    """
    if not isinstance(text, str):
        raise ValueError(f"{text!r} is not a network (192.0.2.0/24, 2001:db8::/32)")
    try:
        network = ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        if "host bits set" in str(exc):
            widened = ipaddress.ip_network(text, strict=False)
            raise ValueError(f"{text!r} has host bits set (the network is {widened})") from None
        raise ValueError(f"{text!r} is not a network (192.0.2.0/24, 2001:db8::/32)") from None
    return Network(network.version, int(network.network_address), int(network.broadcast_address))


def parse_ports(value: int | str) -> tuple[int, int]:
    """A port (``5432``, ``"5432"``) or a range (``"6000-6100"``, both ends included), as
    ``(first, last)``. Raises ``ValueError`` with a one-line reason."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"{value!r} is not a port or FIRST-LAST")
    text = str(value).strip()
    found = _PORTS.fullmatch(text)
    if found is None:
        raise ValueError(f"{text!r} is not a port or FIRST-LAST (5432, 6000-6100)")
    first = int(found["first"])
    last = first if found["last"] is None else int(found["last"])
    for port in (first, last):
        if not 1 <= port <= 65535:
            raise ValueError(f"{text!r}: port {port} is out of range (1-65535)")
    if first > last:
        raise ValueError(f"{text!r}: the range ends before it starts")
    return first, last


@dataclass(frozen=True, slots=True)
class Route:
    """Which flows (all of the given conditions hold; an absent one holds for any flow) and
    what happens to them.

    ``client`` and ``server`` are networks as ``parse_network`` reads them, ``port`` is the
    server's port or range as ``parse_ports`` reads it. ``interceptors`` form the flow's
    onion as ``Proxy(interceptors=...)`` would (none: the flow is spliced, as if unrouted).
    A timeout of ``None`` is the proxy's own. Every field is checked here, so a ``Route``
    that exists is one the proxy can use; a bad one raises ``ValueError`` in one line that
    starts with the field's name (``port: ...``).
    """

    name: str
    transport: str | None = None
    client: str | None = None
    server: str | None = None
    port: int | str | None = None
    interceptors: Sequence[Interceptor] = ()
    idle_timeout: float | None = None
    connect_timeout: float | None = None

    def __post_init__(self) -> None:
        # Each message starts with the field it is about, so a config file's error can name
        # the key.
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise ValueError(f"name: {self.name!r} must be one word of letters, digits and _.:@/+-")
        if self.transport is not None and self.transport not in TRANSPORTS:
            raise ValueError(f"transport: {self.transport!r} is not one of tcp, udp")
        for field, network in (("client", self.client), ("server", self.server)):
            if network is not None:
                try:
                    parse_network(network)
                except ValueError as exc:
                    raise ValueError(f"{field}: {exc}") from None
        if self.port is not None:
            try:
                parse_ports(self.port)
            except ValueError as exc:
                raise ValueError(f"port: {exc}") from None
        for field, timeout in (
            ("idle_timeout", self.idle_timeout),
            ("connect_timeout", self.connect_timeout),
        ):
            if timeout is not None and (
                isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0
            ):
                raise ValueError(f"{field}: {timeout!r} is not a positive number of seconds")
        # Frozen, so a table's routes cannot change under the flows that use them.
        object.__setattr__(self, "interceptors", tuple(self.interceptors))


class _Intervals:
    """Values cut into intervals, each with the mask of the routes it satisfies.

    Ports are looked up as integers; addresses as the bytes ``inet_pton`` gives, which sort
    as their integers do and spare the conversion (0.1 µs of the 0.3 an IPv6 lookup costs).
    """

    __slots__ = ("_masks", "_starts")

    def __init__(
        self, ranges: Sequence[tuple[int, int] | None], anywhere: int, width: int | None = None
    ) -> None:
        """``ranges[i]`` is route ``i``'s (first, last), or ``None`` when it names none here;
        ``anywhere`` is the mask of the routes that hold for every value. With ``width``,
        values are looked up as big-endian bytes of that length."""
        starts = sorted({bound for r in ranges if r for bound in (r[0], r[1] + 1)})
        if width is not None:
            # The interval that starts past the last address would be empty.
            starts = [start for start in starts if start < 1 << (8 * width)]
        masks = [anywhere] + [
            anywhere | _mask(i for i, r in enumerate(ranges) if r and r[0] <= start <= r[1])
            for start in starts
        ]
        self._masks = masks
        self._starts: list[int] | list[bytes] = (
            starts if width is None else [start.to_bytes(width, "big") for start in starts]
        )

    def mask(self, value: int | bytes) -> int:
        return self._masks[bisect_right(self._starts, value)]


class Routes(Sequence[Route]):
    """An ordered table of routes; ``match`` gives the first that holds for a flow.

    Route names are unique, so a log line's ``route=NAME`` says which one a flow took.
    """

    def __init__(self, routes: Iterable[Route] = ()) -> None:
        self._routes = tuple(routes)
        names = set()
        for route in self._routes:
            if route.name in names:
                raise ValueError(f"two routes are named {route.name!r}")
            names.add(route.name)
        everyone = _mask(range(len(self._routes)))
        self._transports = {
            transport: _mask(
                i for i, r in enumerate(self._routes) if r.transport in (None, transport)
            )
            for transport in TRANSPORTS
        }
        port_ranges = [parse_ports(r.port) if r.port is not None else None for r in self._routes]
        self._port_bound = _mask(i for i, r in enumerate(port_ranges) if r)
        self._ports = _Intervals(port_ranges, everyone & ~self._port_bound)
        self._client_bound, self._clients = _by_family([r.client for r in self._routes])
        self._server_bound, self._servers = _by_family([r.server for r in self._routes])

    def position(self, transport: str, client: Address, server: Address) -> int | None:
        """Where the first route that holds for this flow sits in the table, or ``None``.

        ``client`` and ``server`` are a flow's addresses, IP literals as ``Flow`` has them.
        """
        candidates = self._transports.get(transport, 0)
        if candidates & self._port_bound:
            candidates &= self._ports.mask(server[1])
        if candidates & self._server_bound:
            candidates &= _address_mask(self._servers, server[0])
        if candidates & self._client_bound:
            candidates &= _address_mask(self._clients, client[0])
        if not candidates:
            return None
        return (candidates & -candidates).bit_length() - 1

    def match(self, transport: str, client: Address, server: Address) -> Route | None:
        """The first route, in table order, that holds for this flow; ``None`` if none does."""
        position = self.position(transport, client, server)
        return None if position is None else self._routes[position]

    def __len__(self) -> int:
        return len(self._routes)

    def __iter__(self) -> Iterator[Route]:
        return iter(self._routes)

    @overload
    def __getitem__(self, index: int) -> Route: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[Route]: ...
    def __getitem__(self, index: int | slice) -> Route | Sequence[Route]:
        return self._routes[index]

    def __repr__(self) -> str:
        return f"Routes({list(self._routes)!r})"


def _mask(positions: Iterable[int]) -> int:
    mask = 0
    for position in positions:
        mask |= 1 << position
    return mask


def _by_family(networks: Sequence[str | None]) -> tuple[int, dict[int, _Intervals]]:
    """The mask of the routes that name a network, and each family's intervals."""
    parsed = [parse_network(text) if text is not None else None for text in networks]
    bound = _mask(i for i, network in enumerate(parsed) if network)
    anywhere = _mask(range(len(parsed))) & ~bound
    intervals = {
        version: _Intervals(
            [(n.first, n.last) if n and n.version == version else None for n in parsed],
            anywhere,
            _WIDTHS[version],
        )
        for version in _FAMILIES
    }
    return bound, intervals


def _address_mask(intervals: dict[int, _Intervals], host: str) -> int:
    # inet_pton: about 0.1 µs, a tenth of what an ipaddress object costs.
    version = 6 if ":" in host else 4
    try:
        packed = socket.inet_pton(_FAMILIES[version], host)
    except OSError:
        raise ValueError(f"{host!r} is not an IP address") from None
    return intervals[version].mask(packed)
