"""A bounded soak: bulk, short and idle flows at once through ``uproxy serve`` for a fixed time.

UPROXY_SOAK_SECONDS sets the length (CI keeps the default short). It prints what it saw and
fails on any lost or wrong byte, any failed flow, any descriptor left behind, or memory that
keeps growing after the warm-up.
"""

from __future__ import annotations

import hashlib
import os
import socket

import pytest
import trio
from lab_tools import CliProxy, connect, echo_server, eventually, listen, recv_exactly, send_all

from uproxy_netns import SERVER_V4, SERVER_V6, Lab
from uproxy_trio._splice import POOL_KEEP

pytestmark = pytest.mark.lab

SOAK_SECONDS = float(os.environ.get("UPROXY_SOAK_SECONDS", "8"))
IDLE_FLOWS = 100
BULK_SIZE = 4 << 20
# Python's allocator keeps freed arenas for reuse, so RSS wobbles by a few MiB; growth past
# this after the warm-up is a leak, not noise.
RSS_TOLERANCE_KIB = 4096


async def test_soak(lab: Lab, cli_proxy: CliProxy) -> None:
    cli_proxy.start("--log-level", "warning")
    fds_at_start = cli_proxy.open_sockets()
    rss_at_start = cli_proxy.rss_kib()
    counts = {"bulk": 0, "short": 0, "idle": 0}
    rss_after_warmup = 0
    block = os.urandom(BULK_SIZE)

    async def bulk(server_ip: str) -> None:
        client = await connect(lab.client, server_ip, 9090)
        with client:
            digest = hashlib.sha256()

            async def send() -> None:
                await send_all(client, block)
                client.shutdown(socket.SHUT_WR)

            async with trio.open_nursery() as both:
                both.start_soon(send)
                received = 0
                while data := await client.recv(1 << 18):
                    digest.update(data)
                    received += len(data)
            assert received == BULK_SIZE
            assert digest.digest() == hashlib.sha256(block).digest()
        counts["bulk"] += 1

    async def short(server_ip: str) -> None:
        client = await connect(lab.client, server_ip, 9090)
        with client:
            message = os.urandom(64)
            await send_all(client, message)
            assert await recv_exactly(client, 64) == message
        counts["short"] += 1

    async def keep_going(work: object, server_ip: str, until: float) -> None:
        while trio.current_time() < until:
            await work(server_ip)  # type: ignore[operator]

    async with trio.open_nursery() as nursery:
        listener_v4 = await listen(lab.server, SERVER_V4, 9090)
        listener_v6 = await listen(lab.server, SERVER_V6, 9090)
        await nursery.start(echo_server, listener_v4)
        await nursery.start(echo_server, listener_v6)
        idle = [
            await connect(lab.client, SERVER_V4 if i % 2 else SERVER_V6, 9090)
            for i in range(IDLE_FLOWS)
        ]
        start = trio.current_time()
        warmup_done = start + SOAK_SECONDS / 4
        until = start + SOAK_SECONDS
        with trio.fail_after(SOAK_SECONDS + 120):
            async with trio.open_nursery() as load:
                for server_ip in (SERVER_V4, SERVER_V6):
                    load.start_soon(keep_going, bulk, server_ip, until)
                    for _ in range(4):
                        load.start_soon(keep_going, short, server_ip, until)
                await trio.sleep_until(warmup_done)
                rss_after_warmup = cli_proxy.rss_kib()
            # Every idle flow survived the load and still relays.
            for sock in idle:
                await send_all(sock, b"still?")
                assert await recv_exactly(sock, 6) == b"still?"
                counts["idle"] += 1
                sock.close()
        nursery.cancel_scope.cancel()
    rss_at_end = cli_proxy.rss_kib()
    await eventually(lambda: cli_proxy.open_sockets() == fds_at_start)
    fds_at_end = cli_proxy.open_sockets()
    pipes = cli_proxy.open_pipes()
    print(
        f"\nsoak {SOAK_SECONDS:.0f}s: flows bulk={counts['bulk']} short={counts['short']} "
        f"idle={counts['idle']} errors=0 sockets {fds_at_start}->{fds_at_end} "
        f"pooled-pipe-fds {pipes} "
        f"rss {rss_at_start}->{rss_after_warmup}->{rss_at_end} KiB"
    )
    assert counts["bulk"] >= 2
    assert counts["short"] >= 100
    assert counts["idle"] == IDLE_FLOWS
    assert rss_at_end - rss_after_warmup <= RSS_TOLERANCE_KIB
    assert pipes <= 2 * POOL_KEEP
    assert "ERROR" not in cli_proxy.log
    assert "Traceback" not in cli_proxy.log
    assert cli_proxy.stop() == 0
