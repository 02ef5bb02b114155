"""``--source-port ephemeral``: the client's IP with a port the kernel picks, so a 4-tuple
taken on the proxy host no longer costs the client its flow."""

from __future__ import annotations

import socket

import trio
from lab_tools import EventLog, echo_server, listen, recv_exactly, run_library_proxy, send_all

from uproxy_netns import CLIENT_V4, SERVER_V4, Lab
from uproxy_trio import UpstreamFailed
from uproxy_trio._transparent import IP_TRANSPARENT


async def test_ephemeral_source_port_relays_where_the_client_port_is_taken(
    inside_proxy: Lab,
) -> None:
    lab = inside_proxy
    events = EventLog()
    peers: list[tuple[str, int]] = []
    async with trio.open_nursery() as nursery:
        listener = await listen(lab.server, SERVER_V4, 9090)
        await nursery.start(echo_server, listener, peers.append)
        await nursery.start(run_library_proxy, events, {"source_port": "ephemeral"})
        with trio.fail_after(10):
            # Something on the proxy host already holds client:PORT -> server:9090, which
            # resets such a client with --source-port keep (test_reliability.py).
            squatter = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            squatter.setsockopt(socket.IPPROTO_IP, IP_TRANSPARENT, 1)
            squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            await squatter.bind((CLIENT_V4, 0))  # a port free on the proxy host
            await squatter.connect((SERVER_V4, 9090))
            client_port = squatter.getsockname()[1]
            client = trio.socket.from_stdlib_socket(lab.client.socket(socket.AF_INET))
            await client.bind((CLIENT_V4, client_port))
            await client.connect((SERVER_V4, 9090))
            await send_all(client, b"still here")
            assert await recv_exactly(client, 10) == b"still here"
        for sock in (squatter, client):
            sock.close()
        nursery.cancel_scope.cancel()
    assert not events.of_type(UpstreamFailed)
    (peer,) = [peer for peer in peers if peer[1] != client_port]
    assert peer[0] == CLIENT_V4  # the server still sees the client's own IP
