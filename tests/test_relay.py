"""The relay's TCP semantics, proven over real sockets in the lab with the library in-process."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import pytest
import trio
from lab_tools import (
    ADDRESSES,
    CONNECT_TIMEOUT_S,
    SCHEDULING_ALLOWANCE_S,
    EventLog,
    both_ways,
    connect,
    connect_expecting_reset,
    descriptors,
    echo_server,
    eventually,
    listen,
    open_flow,
    recv_exactly,
    recv_until_eof,
    reset_close,
    run_library_proxy,
    send_all,
    silent_server_port,
)
from relay_tools import all_tasks

from uproxy_netns import SERVER_V4, SERVER_V6, Lab
from uproxy_trio import (
    Direction,
    Flow,
    FlowClosed,
    FlowOpened,
    HalfClosed,
    UpstreamConnected,
    UpstreamFailed,
)
from uproxy_trio._proxy import _FLOW_TASK, _RELAY_TASK

pytestmark = pytest.mark.lab


@pytest.mark.parametrize(("client_ip", "server_ip"), ADDRESSES)
async def test_flow_keeps_both_addresses_and_reports_its_life(
    inside_proxy: Lab, library_proxy: EventLog, client_ip: str, server_ip: str
) -> None:
    lab = inside_proxy
    with trio.fail_after(10):
        started = trio.current_time()
        async with open_flow(lab, server_ip) as (client, server, peer):
            accepted = trio.current_time()
            # Neither end can tell the proxy is there.
            assert peer[:2] == client.getsockname()[:2]
            assert peer[0] == client_ip
            assert client.getpeername()[:2] == (server_ip, 9090)
            await both_ways(client, server, b"ping", b"pong!")
            client.shutdown(socket.SHUT_WR)
            assert await recv_until_eof(server) == b""
            server_saw_eof = trio.current_time()
            server.close()
            assert await recv_until_eof(client) == b""
            client.close()
            (closed,) = await library_proxy.wait_for(FlowClosed)
            reported = trio.current_time()

    flow = closed.flow
    assert flow.client == (client_ip, peer[1])
    assert flow.server == (server_ip, 9090)
    kinds = [type(event) for event in library_proxy.events]
    assert kinds == [FlowOpened, UpstreamConnected, HalfClosed, HalfClosed, FlowClosed]
    assert [event.side for event in library_proxy.of_type(HalfClosed)] == ["client", "server"]
    assert (closed.reason, closed.first_closed) == ("closed", "client")
    assert (closed.bytes_client_to_server, closed.bytes_server_to_client) == (4, 5)
    # The flow began before the server accepted and ended after the server's FIN, which
    # followed its EOF; it lay within the test's own span.
    assert server_saw_eof - accepted <= closed.duration_s <= reported - started


async def test_half_close_from_client_keeps_server_to_client_flowing(
    inside_proxy: Lab, library_proxy: EventLog
) -> None:
    lab = inside_proxy
    request, response = b"GET / HTTP/1.0\r\n\r\n" * 1000, bytes(range(256)) * 4000
    with trio.fail_after(10):
        async with open_flow(lab, SERVER_V4) as (client, server, _):
            await send_all(client, request)
            client.shutdown(socket.SHUT_WR)
            # The server sees every request byte, then the EOF, while its own side is still open.
            assert await recv_until_eof(server) == request
            await send_all(server, response)
            server.close()
            assert await recv_until_eof(client) == response
            client.close()
            (closed,) = await library_proxy.wait_for(FlowClosed)
    assert (closed.reason, closed.first_closed) == ("closed", "client")


async def test_half_close_from_server_keeps_client_to_server_flowing(
    inside_proxy: Lab, library_proxy: EventLog
) -> None:
    lab = inside_proxy
    with trio.fail_after(10):
        async with open_flow(lab, SERVER_V6) as (client, server, _):
            await send_all(server, b"banner")
            server.shutdown(socket.SHUT_WR)
            assert await recv_until_eof(client) == b"banner"
            # The client can still talk after the server's FIN, and the server still hears it.
            await send_all(client, b"late words")
            client.shutdown(socket.SHUT_WR)
            assert await recv_until_eof(server) == b"late words"
            server.close()
            client.close()
            (closed,) = await library_proxy.wait_for(FlowClosed)
    assert (closed.reason, closed.first_closed) == ("closed", "server")


@pytest.mark.parametrize("resetting_side", ["client", "server"])
async def test_reset_on_one_side_resets_the_other(
    inside_proxy: Lab, library_proxy: EventLog, resetting_side: str
) -> None:
    lab = inside_proxy
    with trio.fail_after(10):
        async with open_flow(lab, SERVER_V4) as (client, server, _):
            await send_all(client, b"x")
            assert await recv_exactly(server, 1) == b"x"
            aborting, survivor = (
                (client, server) if resetting_side == "client" else (server, client)
            )
            reset_close(aborting)
            # A reset must arrive as a reset, not as a clean FIN (recv returning b"").
            with pytest.raises(ConnectionResetError):
                await recv_until_eof(survivor)
            survivor.close()
            (closed,) = await library_proxy.wait_for(FlowClosed)
    assert closed.reason == f"{resetting_side}_reset"


@pytest.mark.parametrize(
    ("destination", "port", "reason"),
    [
        pytest.param(SERVER_V4, 9092, "refused", id="refused-v4"),
        pytest.param(SERVER_V6, 9092, "refused", id="refused-v6"),
        # The proxy host has no route to this documentation network.
        pytest.param("203.0.113.9", 9090, "unreachable", id="unreachable"),
    ],
)
async def test_upstream_failure_resets_the_client(
    inside_proxy: Lab, library_proxy: EventLog, destination: str, port: int, reason: str
) -> None:
    lab = inside_proxy
    with trio.fail_after(10):
        await connect_expecting_reset(lab.client, destination, port)
        (failed,) = await library_proxy.wait_for(UpstreamFailed)
        (closed,) = await library_proxy.wait_for(FlowClosed)
    assert failed.reason == reason
    assert closed.reason == f"upstream_{reason}"


async def test_silent_upstream_times_out_and_resets_the_client(inside_proxy: Lab) -> None:
    lab = inside_proxy
    events = EventLog()
    with silent_server_port(lab, 9093):
        async with trio.open_nursery() as nursery:
            await nursery.start(run_library_proxy, events, {"connect_timeout": CONNECT_TIMEOUT_S})
            with trio.fail_after(5):
                started = trio.current_time()
                client = await connect(lab.client, SERVER_V4, 9093)
                with pytest.raises(ConnectionResetError):
                    await recv_until_eof(client)
                waited = trio.current_time() - started
                client.close()
                (failed,) = await events.wait_for(UpstreamFailed)
            nursery.cancel_scope.cancel()
    assert failed.reason == "timeout"
    assert CONNECT_TIMEOUT_S <= waited <= CONNECT_TIMEOUT_S + SCHEDULING_ALLOWANCE_S


async def passing(
    flow: Flow, direction: Direction, chunks: AsyncIterator[bytes]
) -> AsyncIterator[bytes]:
    async for chunk in chunks:
        yield chunk


@pytest.mark.parametrize("intercepted", [False, True], ids=["plain", "intercepted"])
async def test_every_flow_has_a_nursery_with_one_relay_task_per_direction(
    inside_proxy: Lab, intercepted: bool
) -> None:
    # The design card's shape, for plain and intercepted flows alike: the flow's task opens
    # the flow's nursery (whose cancel scope tears it down), and two relay tasks run in it.
    lab = inside_proxy
    events = EventLog()
    options = {"interceptors": [passing]} if intercepted else {}
    async with trio.open_nursery() as nursery:
        await nursery.start(run_library_proxy, events, options)
        with trio.fail_after(10):
            async with open_flow(lab, SERVER_V4) as (client, server, _):
                await both_ways(client, server)
                (flow_task,) = [task for task in all_tasks() if task.name == _FLOW_TASK]
                (flow_nursery,) = flow_task.child_nurseries
                relays = [task.name for task in flow_nursery.child_tasks]
            (closed,) = await events.wait_for(FlowClosed)
        nursery.cancel_scope.cancel()
    assert relays == [_RELAY_TASK, _RELAY_TASK]
    assert closed.intercepted is intercepted


async def test_every_flow_ends_without_leaking_sockets_or_tasks(inside_proxy: Lab) -> None:
    lab = inside_proxy
    events = EventLog()
    async with trio.open_nursery() as nursery:
        listener = await listen(lab.server, SERVER_V4, 9090)
        await nursery.start(echo_server, listener)
        await nursery.start(run_library_proxy, events, {})
        baseline = descriptors()["socket"]

        async def one_flow(index: int) -> None:
            if index % 5 == 0:  # refused upstream
                await connect_expecting_reset(lab.client, SERVER_V4, 9092)
                return
            client = await connect(lab.client, SERVER_V4, 9090)
            try:
                if index % 5 == 1:  # client aborts mid-flow
                    await send_all(client, b"abc")
                    await recv_exactly(client, 3)
                    reset_close(client)
                else:
                    payload = index.to_bytes(4, "big") * 1000
                    await send_all(client, payload)
                    client.shutdown(socket.SHUT_WR)
                    assert await recv_until_eof(client) == payload
            finally:
                client.close()

        with trio.fail_after(30):
            async with trio.open_nursery() as clients:
                for index in range(100):
                    clients.start_soon(one_flow, index)
            await events.wait_for(FlowClosed, 100)
        # Every socket the proxy opened for those flows is closed again (the echo server's
        # own sockets close as its tasks notice the resets, hence the wait).
        await eventually(lambda: descriptors()["socket"] == baseline)
        reasons = sorted({event.reason for event in events.of_type(FlowClosed)})
        assert reasons == ["client_reset", "closed", "upstream_refused"]
        nursery.cancel_scope.cancel()
