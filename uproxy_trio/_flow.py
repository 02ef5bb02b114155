"""What a flow is, as the relay and the interceptors see it."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ._address import Address


class Direction(enum.Enum):
    """Which way bytes move. Each flow has one relay, and one interceptor chain, per direction."""

    CLIENT_TO_SERVER = "client_to_server"
    SERVER_TO_CLIENT = "server_to_client"

    @property
    def source(self) -> str:
        """The side this direction reads from: ``"client"`` or ``"server"``."""
        return "client" if self is Direction.CLIENT_TO_SERVER else "server"

    @property
    def sink(self) -> str:
        """The side this direction writes to."""
        return "server" if self is Direction.CLIENT_TO_SERVER else "client"


@dataclass(frozen=True, slots=True)
class Flow:
    """One intercepted connection (TCP) or session (UDP).

    ``client`` is the connecting peer's own address; ``server`` is the original destination,
    which the TPROXY rule preserved as the accepted socket's local address. The proxy's
    outgoing connection uses exactly this pair, so neither end can tell the proxy is there.
    ``transport`` is ``"tcp"`` or ``"udp"``.
    """

    id: int
    client: Address
    server: Address
    transport: str = "tcp"


@dataclass(frozen=True, slots=True)
class FlowInfo:
    """A flow in flight, as ``Proxy.flows`` reports it (for ``GET /flows``, say)."""

    flow: Flow
    route: str | None
    """The route it took; ``None`` when none did."""
    interceptors: tuple[str, ...]
    """The names of the interceptors running on it now, its route's and the live ones."""
    bytes_client_to_server: int
    bytes_server_to_client: int
    age_s: float
