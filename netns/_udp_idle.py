"""Idle UDP sessions through a proxy: what each costs the proxy in memory, and whether each
still works (``IdleResult``, as for TCP flows).

The caller plays client and server (sockets made in their namespaces): one client socket per
session, one server socket for them all. Each session is opened by one datagram, answered;
the proxy's resident set size is read before and after; then every session carries one
more datagram each way, checked against its own client.
"""

from __future__ import annotations

import socket
from contextlib import ExitStack

from ._idle import SOCKET_TIMEOUT_S, IdleResult, _settled_resident_kib, resident_kib
from ._namespace import LabError, Namespace

# Datagrams in flight at once while the sessions are opened: small enough for every buffer
# on the way, large enough not to pay a round trip per session.
_WINDOW = 64


def measure_idle_sessions(
    client: Namespace,
    server: Namespace,
    client_host: str,
    host: str,
    port: int,
    sessions: int,
    proxy_pid: int,
) -> IdleResult:
    """Hold ``sessions`` UDP sessions from ``client`` to ``host:port`` in ``server`` through
    the proxy ``proxy_pid``, then check each one relays a datagram both ways."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with ExitStack() as sockets:
        answering = sockets.enter_context(server.socket(family, socket.SOCK_DGRAM))
        answering.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        answering.settimeout(SOCKET_TIMEOUT_S)
        answering.bind((host, port))
        before = resident_kib(proxy_pid)
        clients = []
        for _ in range(sessions):
            sock = sockets.enter_context(client.socket(family, socket.SOCK_DGRAM))
            sock.settimeout(SOCKET_TIMEOUT_S)
            sock.bind((client_host, 0))
            clients.append(sock)
        for start in range(0, sessions, _WINDOW):
            _round_trips(clients[start : start + _WINDOW], answering, (host, port))
        after = _settled_resident_kib(proxy_pid)
        relayed = sum(
            _round_trips(clients[start : start + _WINDOW], answering, (host, port))
            for start in range(0, sessions, _WINDOW)
        )
    return IdleResult(sessions, before, after, relayed)


def _round_trips(
    clients: list[socket.socket], answering: socket.socket, server: tuple[str, int]
) -> int:
    """One datagram from each client, each answered by the server to whoever the server saw;
    how many clients got their own datagram back."""
    try:
        for sock in clients:
            sock.sendto(b"%d" % sock.getsockname()[1], server)
        for _ in clients:
            data, peer = answering.recvfrom(64)
            answering.sendto(data, peer)
        return sum(sock.recv(64) == b"%d" % sock.getsockname()[1] for sock in clients)
    except OSError as exc:
        raise LabError(f"a UDP session through the proxy did not answer: {exc}") from None
