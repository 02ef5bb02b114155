"""A flood of one-datagram UDP sessions: the table stays within its limit, the proxy's
memory with it, and the proxy goes on serving the sessions it has and, once the flood's
sessions expire, new ones."""

from __future__ import annotations

import socket
import struct
import time

import pytest
import trio
from lab_tools import CliProxy, raise_own_fd_limit
from udp_tools import UDP_LISTEN_ARGS, UDP_PORT, echo_server, exchange, udp_socket

from uproxy_netns import CLIENT_V4, SERVER_V4, Lab

pytestmark = pytest.mark.lab

FLOOD = 100_000
# The flood goes to two ports where the server drops everything (no answer, no ICMP error),
# from 50,000 client ports each: 100,000 distinct sessions.
FLOOD_PORTS = (9094, 9095)
FIRST_CLIENT_PORT = 10_000
MAX_SESSIONS = 3000
IDLE_TIMEOUT_S = 1.0
# The flood's sessions are at most MAX_SESSIONS at once, at a few KiB each: well under this.
RSS_GROWTH_LIMIT_KIB = 64 << 10


def _udp_packet(source: tuple[str, int], destination: tuple[str, int], payload: bytes) -> bytes:
    """An IPv4 UDP packet for a raw socket: the kernel fills in the IP checksum and id, and a
    zero UDP checksum means none."""
    udp = struct.pack("!HHHH", source[1], destination[1], 8 + len(payload), 0) + payload
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(udp),
        0,
        0,
        64,
        socket.IPPROTO_UDP,
        0,
        socket.inet_aton(source[0]),
        socket.inet_aton(destination[0]),
    )
    return header + udp


def _flood(lab: Lab) -> float:
    """Send the flood's datagrams from the client namespace; how long that took."""
    with lab.client.entered():
        raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    started = time.monotonic()
    with raw:
        for index in range(FLOOD):
            port = FLOOD_PORTS[index % 2]
            client_port = FIRST_CLIENT_PORT + index // 2
            packet = _udp_packet((CLIENT_V4, client_port), (SERVER_V4, port), b"flood")
            raw.sendto(packet, (SERVER_V4, 0))
    return time.monotonic() - started


async def test_a_flood_of_one_datagram_sessions(lab: Lab, cli_proxy: CliProxy) -> None:
    raise_own_fd_limit()
    cli_proxy.start(
        *UDP_LISTEN_ARGS,
        "--max-udp-sessions",
        str(MAX_SESSIONS),
        "--udp-idle-timeout",
        str(IDLE_TIMEOUT_S),
        "--log-level",
        "warning",
    )
    ports = f"{FLOOD_PORTS[0]}:{FLOOD_PORTS[1]}"
    silent = ["INPUT", "-p", "udp", "--dport", ports, "-j", "DROP"]
    lab.server.run(["iptables", "-I", *silent])
    server = (SERVER_V4, UDP_PORT)
    try:
        async with echo_server(lab, SERVER_V4):
            with udp_socket(lab.client, CLIENT_V4) as steady:
                assert (await exchange(steady, b"before", server))[0] == b"before"
                rss_before = cli_proxy.rss_kib()
                answered = 0
                async with trio.open_nursery() as nursery:

                    async def keep_talking() -> None:
                        # A session in flight is never dropped for the flood, nor left idle.
                        nonlocal answered
                        while True:
                            data = b"%d" % answered
                            assert (await exchange(steady, data, server))[0] == data
                            answered += 1
                            await trio.sleep(0.1)

                    nursery.start_soon(keep_talking)
                    sent_in = await trio.to_thread.run_sync(_flood, lab)
                    await trio.sleep(0.5)
                    rss_after = cli_proxy.rss_kib()
                    nursery.cancel_scope.cancel()
                assert answered >= 3
            # The flood's sessions have expired: a new client gets a session at once.
            await trio.sleep(IDLE_TIMEOUT_S * 1.5)
            with udp_socket(lab.client, CLIENT_V4) as newcomer:
                assert (await exchange(newcomer, b"new", server))[0] == b"new"
    finally:
        lab.server.run(["iptables", "-D", *silent])
    print(
        f"flood of {FLOOD} sent in {sent_in:.2f}s; RSS {rss_before} -> {rss_after} KiB; "
        f"{answered} exchanges on the steady session meanwhile"
    )
    assert rss_after - rss_before < RSS_GROWTH_LIMIT_KIB
    assert "UDP datagrams dropped (session_limit)" in cli_proxy.log
