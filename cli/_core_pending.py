"""A stand-in for the core's ``Forward`` until it lands in ``uproxy_trio``
(the lead's branch); removed at that merge, and the imports point at ``uproxy_trio``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from uproxy_trio import Address, Interceptor


@dataclass(frozen=True)
class Forward:
    name: str
    listen: Address
    upstream: Address
    interceptors: Sequence[Interceptor] = ()
