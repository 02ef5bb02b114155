"""The one place that creates transparent sockets, and the one place that resets them.

``IP_TRANSPARENT`` (``IPV6_TRANSPARENT``) lets a socket accept connections addressed to any
IP, which is how the TPROXY rule delivers flows to us, and lets an outgoing socket bind to an
address this host does not own: the client's. Both need CAP_NET_ADMIN (or CAP_NET_RAW).
"""

from __future__ import annotations

import enum
import errno
import ipaddress
import os
import socket
import struct
from collections.abc import Sequence

import trio

from ._address import Address, family_of, format_address
from ._readiness import PEER_CLOSED, READABLE, WRITABLE, Readiness, Side, bit

# Linux values from <linux/in.h> and <linux/in6.h>; Python's socket module lacks the IPv6 one.
IP_TRANSPARENT = getattr(socket, "IP_TRANSPARENT", 19)
IPV6_TRANSPARENT = getattr(socket, "IPV6_TRANSPARENT", 75)

# How often and how long apart connect() is retried while the 4-tuple is taken (50 ms in all).
COLLISION_RETRIES = 10
COLLISION_RETRY_S = 0.005

_SERVER_WRITABLE = bit(Side.SERVER, WRITABLE)
_SERVER_CLOSED = bit(Side.SERVER, PEER_CLOSED)
_SERVER_BITS = bit(Side.SERVER, READABLE) | _SERVER_WRITABLE | _SERVER_CLOSED

# <linux/in.h>: bind() keeps the address and leaves the port to connect().
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)

# A full accept queue under a burst of SYNs costs the clients a retransmit (one second); the
# kernel caps this at net.core.somaxconn anyway.
LISTEN_BACKLOG = 4096

# close() with SO_LINGER {on, 0 s} sends a RST instead of a FIN: how a reset on one side is
# passed on to the other, and how a client learns its upstream could not be reached.
_LINGER_RESET = struct.pack("ii", 1, 0)


class TransparencyUnavailable(PermissionError):
    """The process may not set ``IP_TRANSPARENT``: it has neither CAP_NET_ADMIN nor CAP_NET_RAW."""


def _make_transparent(sock: socket.socket, family: socket.AddressFamily) -> None:
    if family == socket.AF_INET6:
        level, option = socket.IPPROTO_IPV6, IPV6_TRANSPARENT
    else:
        level, option = socket.IPPROTO_IP, IP_TRANSPARENT
    try:
        sock.setsockopt(level, option, 1)
    except PermissionError as exc:
        raise TransparencyUnavailable(
            exc.errno,
            "setting IP_TRANSPARENT needs CAP_NET_ADMIN or CAP_NET_RAW "
            "(run as root or grant one of them)",
        ) from None


def transparency_available() -> bool:
    """Whether this process may make transparent sockets (has CAP_NET_ADMIN or CAP_NET_RAW)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            _make_transparent(probe, socket.AF_INET)
        except TransparencyUnavailable:
            return False
    return True


def _transparent_socket(
    family: socket.AddressFamily, kind: socket.SocketKind = socket.SOCK_STREAM
) -> socket.socket:
    # Plain non-blocking sockets, their readiness learnt from the proxy's reactor: a relay does
    # a system call only when one is needed, and holds no wrapper per socket. SOCK_NONBLOCK
    # at creation spares the ioctl that setblocking(False) would cost per flow.
    sock = socket.socket(family, kind | socket.SOCK_NONBLOCK)
    try:
        _make_transparent(sock, family)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    except BaseException:
        sock.close()
        raise
    return sock


def transparent_datagram_socket(family: socket.AddressFamily) -> socket.socket:
    """A non-blocking UDP socket with ``IP_TRANSPARENT`` and ``SO_REUSEADDR``, not yet bound.

    UDP sessions bind such sockets to addresses this host does not own: the client's, towards
    the server, and the original destination's, towards the client. Several sessions share
    each of those addresses (one client talking to two servers, two clients to one server),
    hence ``SO_REUSEADDR``; once connected, each socket only takes its own peer's datagrams.
    """
    return _transparent_socket(family, socket.SOCK_DGRAM)


def open_transparent_listener(address: Address, *, reuse_port: bool = False) -> socket.socket:
    """Bind and listen on ``address`` so that TPROXY can hand us flows for any destination.

    ``reuse_port`` lets several processes listen on the same address, the kernel spreading
    new flows across them (SO_REUSEPORT; TPROXY's listener lookup honours it).
    """
    sock = _transparent_socket(family_of(address))
    if reuse_port:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        except BaseException:
            sock.close()
            raise
    return listen_on(sock, address)


def listen_on(sock: socket.socket, address: Address) -> socket.socket:
    """Bind ``sock`` to ``address`` and listen; ``sock`` is closed and ``OSError`` raised, in
    one line that names the address, if it cannot."""
    try:
        if sock.family == socket.AF_INET6:
            # One listener per family, as trio does: [::] then means IPv6 only, and a user can
            # list 0.0.0.0 beside it without a clash.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        # Accepted sockets inherit it: one system call per listener instead of one per flow.
        set_nodelay(sock)
        sock.bind(address)
        sock.listen(LISTEN_BACKLOG)
    except OSError as exc:
        sock.close()
        reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
        raise OSError(exc.errno, f"cannot listen on {format_address(address)}: {reason}") from exc
    except BaseException:
        sock.close()
        raise
    return sock


class ConnectFailure(enum.Enum):
    """Why the original destination could not be reached: a closed set, fit for a metrics
    label. The details (errno, addresses) go to the log only."""

    REFUSED = "refused"
    UNREACHABLE = "unreachable"
    TIMEOUT = "timeout"
    RESET = "reset"
    ADDRESS_IN_USE = "address_in_use"
    """The client's address or 4-tuple is taken on this host (TIME_WAIT, a local socket)."""
    NO_RESOURCES = "no_resources"
    """No descriptor or memory for the outgoing socket."""
    ERROR = "error"
    """Anything else; the log says what."""


_FAILURES = {
    errno.ECONNREFUSED: ConnectFailure.REFUSED,
    errno.EHOSTUNREACH: ConnectFailure.UNREACHABLE,
    errno.ENETUNREACH: ConnectFailure.UNREACHABLE,
    errno.EHOSTDOWN: ConnectFailure.UNREACHABLE,
    errno.ENETDOWN: ConnectFailure.UNREACHABLE,
    errno.ETIMEDOUT: ConnectFailure.TIMEOUT,
    errno.ECONNRESET: ConnectFailure.RESET,
    errno.EADDRINUSE: ConnectFailure.ADDRESS_IN_USE,
    errno.EADDRNOTAVAIL: ConnectFailure.ADDRESS_IN_USE,
    errno.EMFILE: ConnectFailure.NO_RESOURCES,
    errno.ENFILE: ConnectFailure.NO_RESOURCES,
    errno.ENOBUFS: ConnectFailure.NO_RESOURCES,
    errno.ENOMEM: ConnectFailure.NO_RESOURCES,
}


class ConnectFailed(Exception):
    """The original destination could not be reached: ``reason`` for metrics, ``detail`` for
    the log."""

    def __init__(self, reason: ConnectFailure, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail

    @classmethod
    def from_error(cls, exc: OSError, doing: str) -> ConnectFailed:
        name = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
        reason = _FAILURES.get(exc.errno or 0, ConnectFailure.ERROR)
        return cls(reason, f"{doing}: {name.lower()} ({exc.strerror or exc})")


def open_outgoing(
    client: Address, family: socket.AddressFamily, *, keep_port: bool = True
) -> socket.socket:
    """A socket bound to the client's own address, ready for ``connect_out``.

    With ``keep_port`` (the seed's behaviour) it takes the client's port too; without, the
    kernel picks a port when it connects, one whose 4-tuple is free (HAProxy's ``usesrc
    clientip``), so a busy host never collides with its own TIME_WAIT sockets.

    Raises ``ConnectFailed`` for a local failure such as running out of descriptors or the
    client's address being taken here. The caller closes the socket.
    """
    try:
        sock = _transparent_socket(family)
    except TransparencyUnavailable:
        raise
    except OSError as exc:
        raise ConnectFailed.from_error(exc, "cannot open the outgoing socket") from exc
    try:
        if keep_port:
            sock.bind(client)
        else:
            # The port is chosen at connect(), against the full 4-tuple, not at bind().
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((client[0], 0))
    except OSError as exc:
        sock.close()
        raise ConnectFailed.from_error(
            exc, f"cannot bind to client address {format_address(client)}"
        ) from exc
    return sock


async def connect_out(sock: socket.socket, server: Address, readiness: Readiness) -> None:
    """Connect ``sock`` (from ``open_outgoing``, watched as the flow's server side) to ``server``.

    Raises ``ConnectFailed`` for what a client would otherwise have seen as an error (refused,
    unreachable), and when the 4-tuple is taken here. A server that never answers is the
    caller's to time out, by cancelling this.
    """
    try:
        await _connect_once_free(sock, server, readiness)
    except OSError as exc:
        raise ConnectFailed.from_error(exc, f"cannot connect to {format_address(server)}") from exc
    await readiness.wait(_SERVER_WRITABLE)
    # A failed connect reports an error or a hang-up along with "writable": only then is
    # there an error worth a system call to fetch.
    error = (
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if readiness.bits & _SERVER_CLOSED
        else 0
    )
    if error:
        raise ConnectFailed.from_error(
            OSError(error, os.strerror(error)), f"cannot connect to {format_address(server)}"
        )
    set_nodelay(sock)


async def _connect_once_free(sock: socket.socket, server: Address, readiness: Readiness) -> None:
    """Start ``connect()``, retried briefly while the 4-tuple is still taken.

    When a client reuses its port at once, our previous flow's socket for the same 4-tuple may
    still be in LAST_ACK, waiting a round trip for the server's final ACK, and connect() fails
    with EADDRNOTAVAIL. That is our own leftover, not the client's doing, so it is worth a few
    milliseconds; a 4-tuple that stays taken is a real collision and fails.

    The socket is watched before it connects, and a socket that is not connecting reports
    itself writable (and hung up), so what was reported up to each attempt is forgotten: only
    edges reported after it count, and epoll re-checks a socket's state when it reports it.
    """
    for attempt in range(COLLISION_RETRIES + 1):
        try:
            sock.connect(server)
        except BlockingIOError:
            readiness.clear(_SERVER_BITS)
            return
        except OSError as exc:
            readiness.clear(_SERVER_BITS)
            if exc.errno != errno.EADDRNOTAVAIL or attempt == COLLISION_RETRIES:
                raise
            await trio.sleep(COLLISION_RETRY_S)
        else:
            return  # connected at once (a local server): the edge saying so follows


def is_own_listener(destination: Address, listeners: Sequence[Address]) -> bool:
    """Whether connecting to ``destination`` would land on one of our own ``listeners``.

    A listener on a wildcard address owns its port on every local address, so a destination
    on that port is ours if the address is local here, which binding to it tells us. Only
    flows to a listener's port pay for that check.
    """
    host, port = destination
    for listen_host, listen_port in listeners:
        if port != listen_port:
            continue
        if host == listen_host:
            return True
        if ipaddress.ip_address(listen_host).is_unspecified and family_of(
            (listen_host, port)
        ) == family_of(destination):
            return _is_local_address(host)
    return False


def _is_local_address(host: str) -> bool:
    with socket.socket(family_of((host, 0)), socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, 0))
        except OSError:
            return False
    return True


def set_nodelay(sock: socket.socket) -> None:
    """Forward each read at once: Nagle on a relay stacks a second delay on the sender's own."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass  # the peer may already have reset; the relay will see that itself


def reset(sock: socket.socket) -> None:
    """Close ``sock`` with a RST, so the peer sees the same abort we saw on the other side."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    except OSError:
        pass  # already reset by the peer: a plain close sends nothing more, which is right
    sock.close()
