"""``--source-port ephemeral``: the client's IP with a port the kernel picks, so a 4-tuple
taken on the proxy host no longer costs the client its flow."""

from __future__ import annotations

import socket

import pytest
import trio
from lab_tools import (
    CliProxy,
    EventLog,
    echo_server,
    eventually,
    listen,
    listeners,
    recv_exactly,
    run_library_proxy,
    send_all,
)

from uproxy_netns import CLIENT_V4, SERVER_V4, Lab
from uproxy_trio import UpstreamFailed
from uproxy_trio._transparent import IP_TRANSPARENT

pytestmark = pytest.mark.lab


async def relay_past_a_squatter(lab: Lab) -> int:
    """Echo through the proxy from a client whose ``ip:port -> server:9090`` something on
    the proxy host already holds, which resets such a client with ``--source-port keep``
    (test_reliability.py); returns the client's port."""
    squatter = trio.socket.from_stdlib_socket(lab.proxy.socket(socket.AF_INET))
    client = trio.socket.from_stdlib_socket(lab.client.socket(socket.AF_INET))
    with squatter, client:
        squatter.setsockopt(socket.IPPROTO_IP, IP_TRANSPARENT, 1)
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        await squatter.bind((CLIENT_V4, 0))  # a port free on the proxy host
        await squatter.connect((SERVER_V4, 9090))
        client_port: int = squatter.getsockname()[1]
        await client.bind((CLIENT_V4, client_port))
        await client.connect((SERVER_V4, 9090))
        await send_all(client, b"still here")
        assert await recv_exactly(client, 10) == b"still here"
    return client_port


def relayed_peer(peers: list[tuple[str, int]], client_port: int) -> tuple[str, int]:
    """The server's view of the relayed flow: every peer but the squatter."""
    (peer,) = [peer for peer in peers if peer[1] != client_port]
    return peer


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
            client_port = await relay_past_a_squatter(lab)
        nursery.cancel_scope.cancel()
    assert not events.of_type(UpstreamFailed)
    # The server still sees the client's own IP.
    assert relayed_peer(peers, client_port)[0] == CLIENT_V4


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_serve_source_port_ephemeral_reaches_the_proxy_and_its_workers(
    lab: Lab, cli_proxy: CliProxy, workers: str
) -> None:
    cli_proxy.start("--source-port", "ephemeral", "--workers", workers)
    await eventually(lambda: listeners(lab.proxy) == 2 * int(workers))
    peers: list[tuple[str, int]] = []
    async with trio.open_nursery() as nursery:
        listener = await listen(lab.server, SERVER_V4, 9090)
        await nursery.start(echo_server, listener, peers.append)
        with trio.fail_after(10):
            client_port = await relay_past_a_squatter(lab)
        nursery.cancel_scope.cancel()
    assert cli_proxy.stop() == 0
    assert "failed" not in cli_proxy.log, cli_proxy.log
    assert relayed_peer(peers, client_port)[0] == CLIENT_V4
