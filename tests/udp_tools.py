"""UDP sockets in the lab's namespaces, an echo server, and the proxy with UDP listeners."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import trio
from cli_tools import PROXY_PORT
from lab_tools import PROXY_LISTEN, EventLog, family_of

import uproxy_trio
from uproxy_netns import Lab, Namespace

# Where the lab's UDP TPROXY rule delivers (UDP port 9091, on both loopbacks).
UDP_LISTEN = PROXY_LISTEN
UDP_LISTEN_ARGS = [
    arg for host in ("127.0.0.1", "[::1]") for arg in ("--udp-listen", f"{host}:{PROXY_PORT}")
]
# The lab intercepts UDP 9090-9099 as it does TCP: 9090 for servers that answer, the others
# for ports where nothing listens.
UDP_PORT = 9090
CLOSED_UDP_PORT = 9093
BIG_BUFFER = 8 << 20

UdpSocket = trio.socket.SocketType


def udp_socket(ns: Namespace, host: str, port: int = 0) -> UdpSocket:
    """A UDP socket in ``ns`` bound to ``host:port``, with a receive buffer that holds a
    test's bursts (SO_RCVBUFFORCE: the tests run as root)."""
    sock = ns.socket(family_of(host), socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, 33, BIG_BUFFER)  # SO_RCVBUFFORCE
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return trio.socket.from_stdlib_socket(sock)


async def udp_echo(sock: UdpSocket) -> None:
    """Send every datagram back to where it came from, until cancelled."""
    while True:
        data, peer = await sock.recvfrom(1 << 16)
        await sock.sendto(data, peer)


@asynccontextmanager
async def echo_server(lab: Lab, host: str, port: int = UDP_PORT) -> AsyncIterator[UdpSocket]:
    """A UDP echo server in the server namespace for the block."""
    with udp_socket(lab.server, host, port) as sock:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(udp_echo, sock)
            yield sock
            nursery.cancel_scope.cancel()


async def exchange(
    sock: UdpSocket, data: bytes, server: tuple[str, int], timeout: float = 5
) -> tuple[bytes, Any]:
    """Send ``data`` to ``server`` and return the first answer and where it came from."""
    await sock.sendto(data, server)
    with trio.fail_after(timeout):
        return await sock.recvfrom(1 << 16)


@asynccontextmanager
async def udp_proxy(
    options: Mapping[str, Any] | None = None,
) -> AsyncIterator[tuple[uproxy_trio.Proxy, EventLog]]:
    """A library proxy with TCP and UDP listeners on the lab's port, for the block; the
    caller must be in the proxy namespace (``inside_proxy``)."""
    events = EventLog()
    proxy = uproxy_trio.Proxy(on_event=events, **(options or {}))
    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: proxy.serve(
                PROXY_LISTEN, udp_listen=UDP_LISTEN, task_status=task_status
            )
        )
        yield proxy, events
        nursery.cancel_scope.cancel()
