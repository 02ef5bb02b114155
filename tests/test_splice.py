"""The zero-copy path: bulk moves through splice(2), idle flows hold no pipes, and a reset in
the middle of a splice is still a reset."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import trio
from lab_tools import (
    CliProxy,
    connect,
    echo_server,
    listen,
    open_flow,
    raise_own_fd_limit,
    recv_exactly,
    recv_until_eof,
    reset_close,
    send_all,
)

from uproxy_netns import SERVER_V4, Lab
from uproxy_netns._idle import measure_idle_flows
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


UPLOAD_ONLY = """
from uproxy_trio import directions


@directions("client_to_server")
async def upload_only(flow, direction, chunks):
    async for chunk in chunks:
        yield chunk
"""


async def test_a_direction_no_interceptor_touches_is_spliced_beside_one_that_is_intercepted(
    lab: Lab, cli_proxy: CliProxy, tmp_path: Path
) -> None:
    interceptor = tmp_path / "upload_only.py"
    interceptor.write_text(UPLOAD_ONLY)
    cli_proxy.start("--interceptor", f"{interceptor}:upload_only")
    download = os.urandom(8 << 20)
    with trio.fail_after(30):
        async with open_flow(lab, SERVER_V4) as (client, server, _):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_all, server, download)
                assert await recv_exactly(client, len(download)) == download
            # The download went through pipes (the pool keeps them); the upload still works.
            assert cli_proxy.open_pipes() > 0
            await send_all(client, b"up")
            assert await recv_exactly(server, 2) == b"up"
    assert cli_proxy.stop() == 0


async def test_a_reset_in_the_middle_of_a_splice_is_passed_on(
    lab: Lab, cli_proxy: CliProxy
) -> None:
    cli_proxy.start()
    with trio.fail_after(20):
        async with open_flow(lab, SERVER_V4) as (client, server, _):
            # The server streams and the client only reads: the proxy holds no byte from the
            # client, so closing its socket gives a RST only if the proxy asks for one, and a
            # FIN otherwise. What the client sees is what the proxy sent.
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_all, server, bytes(64 << 20))
                await recv_exactly(client, 4 << 20)  # well into the bulk, so spliced
                assert cli_proxy.open_pipes() > 0, "the bulk was not spliced"
                nursery.cancel_scope.cancel()
            reset_close(server)
            # A RST fails the client's recv; a FIN would read to a clean EOF.
            with pytest.raises(ConnectionResetError):
                await recv_until_eof(client, limit=64 << 20)
    assert cli_proxy.stop() == 0
    assert "close reason=server_reset" in cli_proxy.log


def test_an_idle_flow_costs_the_proxy_at_most_12_kib(lab: Lab, cli_proxy: CliProxy) -> None:
    # The budget: 4000 idle flows at no more than 12 KiB of proxy memory each. The
    # shared read buffer and lending pipes only while bytes move are what keep it there.
    raise_own_fd_limit()
    cli_proxy.start("--log-level", "warning")
    result = measure_idle_flows(lab.client, lab.server, SERVER_V4, 9093, 4000, cli_proxy.pid)
    assert result.relayed == 4000
    assert result.kib_per_flow <= 12, f"{result.kib_per_flow:.2f} KiB per idle flow"
    assert cli_proxy.stop() == 0


async def test_the_open_file_limit_is_raised_logged_and_used(lab: Lab, cli_proxy: CliProxy) -> None:
    cli_proxy.start(wrap=["prlimit", "--nofile=1024:4096", "--"])
    limits = Path(f"/proc/{cli_proxy.pid}/limits").read_text()  # noqa: ASYNC240 - in memory
    assert re.search(r"Max open files\s+4096\s+4096", limits)
    assert "open-file limit raised from 1024 to 4096" in cli_proxy.log
    # Two descriptors a flow: 600 flows at once are past the soft limit it started with.
    raise_own_fd_limit()
    flows: list[trio.socket.SocketType] = []
    async with trio.open_nursery() as nursery:
        listener = await listen(lab.server, SERVER_V4, 9090)
        await nursery.start(echo_server, listener)
        with trio.fail_after(60):
            for _ in range(600):
                client = await connect(lab.client, SERVER_V4, 9090)
                flows.append(client)
                await send_all(client, b"!")
                assert await recv_exactly(client, 1) == b"!"
            assert cli_proxy.open_fds() > 1024 + 100
            for client in flows:
                client.close()
        nursery.cancel_scope.cancel()
    assert cli_proxy.stop() == 0
