"""Stand-ins for the core's ``Forward`` and ``FlowInfo`` until they land in ``uproxy_trio``
(the lead's branch); removed at that merge, and the imports point at ``uproxy_trio``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from uproxy_trio import Address, Flow, Interceptor


@dataclass(frozen=True)
class Forward:
    name: str
    listen: Address
    upstream: Address
    interceptors: Sequence[Interceptor] = ()


@dataclass(frozen=True)
class FlowInfo:
    flow: Flow
    route: str | None
    interceptors: tuple[str, ...]
    bytes_client_to_server: int
    bytes_server_to_client: int
    age_s: float
