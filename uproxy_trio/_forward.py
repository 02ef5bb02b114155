"""Forward listeners: Toxiproxy's own model, beside the transparent one.

A forward listener is a plain TCP listener that relays every connection to one fixed
upstream. It needs no root and no TPROXY rule, so the same interceptors and toxics serve a
developer's laptop and a CI job, where pointing the client at ``localhost:PORT`` is easy. Its
flows are like any other (the same nursery, relay tasks and events); ``flow.client`` is the
connecting peer and ``flow.server`` the upstream, and their route is the forward's name.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from dataclasses import dataclass

from ._address import Address, family_of
from ._interceptor import Interceptor
from ._transparent import ConnectFailed, listen_on, set_nodelay


@dataclass(frozen=True, slots=True)
class Forward:
    """Listen on ``listen`` and relay each connection to ``upstream`` through
    ``interceptors``. ``name`` is its route's name (for logs, live interceptors, ``flows``);
    it shares one namespace with the routes."""

    name: str
    listen: Address
    upstream: Address
    interceptors: Sequence[Interceptor] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "interceptors", tuple(self.interceptors))


def open_forward_listener(address: Address) -> socket.socket:
    """A plain (not transparent) listener on ``address``; ``OSError`` in one line if not."""
    sock = socket.socket(family_of(address), socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return listen_on(sock, address)


def open_upstream(upstream: Address) -> socket.socket:
    """A plain socket for the connection to ``upstream``, ready for ``connect_out``."""
    try:
        sock = socket.socket(family_of(upstream), socket.SOCK_STREAM)
    except OSError as exc:
        raise ConnectFailed.from_error(exc, "cannot open the outgoing socket") from exc
    sock.setblocking(False)
    set_nodelay(sock)
    return sock
