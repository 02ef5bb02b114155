"""Forward listeners: Toxiproxy's own model, beside the transparent one.

A forward listener is a plain TCP listener that relays every connection to one fixed
upstream. It needs no root and no TPROXY rule, so the same interceptors and toxics serve a
developer's laptop and a CI job, where pointing the client at ``localhost:PORT`` is easy. Its
flows are like any other (the same nursery, relay tasks and events); ``flow.client`` is the
connecting peer and ``flow.server`` the upstream, and their route is the forward's name.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass

from ._address import Address, family_of, format_address
from ._interceptor import Interceptor
from ._transparent import LISTEN_BACKLOG, ConnectFailed, set_nodelay


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
        if sock.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        set_nodelay(sock)
        sock.bind(address)
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
        raise OSError(exc.errno, f"cannot listen on {format_address(address)}: {reason}") from exc
    return sock


def open_upstream(upstream: Address) -> socket.socket:
    """A plain socket for the connection to ``upstream``, ready for ``connect_out``."""
    try:
        sock = socket.socket(family_of(upstream), socket.SOCK_STREAM)
    except OSError as exc:
        raise ConnectFailed.from_error(exc, "cannot open the outgoing socket") from exc
    sock.setblocking(False)
    set_nodelay(sock)
    return sock
