"""The zero-copy path: bulk moves through splice(2), idle flows hold no pipes, and a reset in
the middle of a splice is still a reset."""

from __future__ import annotations

import os

import pytest
import trio
from lab_tools import CliProxy, connect, echo_server, listen, recv_exactly, reset_close, send_all

from uproxy_netns import SERVER_V4, Lab
from uproxy_trio._splice import POOL_KEEP

pytestmark = pytest.mark.lab


async def test_bulk_is_spliced_and_idle_flows_give_their_pipes_back(
    lab: Lab, cli_proxy: CliProxy
) -> None:
    cli_proxy.start("--log-level", "warning")
    block = os.urandom(1 << 20)
    flows = 100
    idle: list[trio.socket.SocketType] = []

    async def burst_then_idle() -> None:
        client = await connect(lab.client, SERVER_V4, 9090)
        idle.append(client)

        async with trio.open_nursery() as both_ways:
            both_ways.start_soon(send_all, client, block)
            assert await recv_exactly(client, len(block)) == block

    async with trio.open_nursery() as nursery:
        listener = await listen(lab.server, SERVER_V4, 9090)
        await nursery.start(echo_server, listener)
        with trio.fail_after(60):
            async with trio.open_nursery() as clients:
                for _ in range(flows):
                    clients.start_soon(burst_then_idle)
            # 100 flows that moved bulk are now idle: no pipe is held for any of them, only
            # the pool's reusable ones remain (a held pipe per direction would be 400 fds).
            pipes = cli_proxy.open_pipes()
            assert 0 < pipes <= 2 * POOL_KEEP
            for client in idle:  # and every one still relays
                await send_all(client, b"again")
                assert await recv_exactly(client, 5) == b"again"
                client.close()
        nursery.cancel_scope.cancel()
    assert cli_proxy.stop() == 0


async def test_a_reset_in_the_middle_of_a_splice_is_passed_on(
    lab: Lab, cli_proxy: CliProxy
) -> None:
    cli_proxy.start()
    with trio.fail_after(20):
        listener = await listen(lab.server, SERVER_V4, 9090)
        client = await connect(lab.client, SERVER_V4, 9090)
        server, _ = await listener.accept()

        async def stream() -> None:
            # Ends with ECONNRESET or EPIPE once the reset arrives; anything else fails.
            try:
                while True:
                    await client.send(b"z" * (1 << 20))
            except (ConnectionResetError, BrokenPipeError):
                return

        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream)
            await recv_exactly(server, 4 << 20)  # well into the bulk, so spliced
            reset_close(server)
    client.close()
    listener.close()
    assert cli_proxy.stop() == 0
    assert "close reason=server_reset" in cli_proxy.log
