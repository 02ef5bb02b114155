"""Interceptors that end a whole flow on purpose (``CloseFlow``, ``ResetFlow``), as a peer
hanging up or a broken network would, and interceptors that pick their flows (``for_flows``)."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import pytest
import trio
from lab_tools import (
    EventLog,
    open_flow,
    recv_exactly,
    recv_until_eof,
    run_library_proxy,
    send_all,
)

from uproxy_netns import SERVER_V4, Lab
from uproxy_trio import (
    CloseFlow,
    Direction,
    Flow,
    FlowClosed,
    InterceptorFailed,
    ResetFlow,
    directions,
    for_flows,
)

pytestmark = pytest.mark.lab


@directions(Direction.CLIENT_TO_SERVER)
async def hang_up_on_bye(
    flow: Flow, direction: Direction, chunks: AsyncIterator[bytes]
) -> AsyncIterator[bytes]:
    async for chunk in chunks:
        before, found, _ = chunk.partition(b"bye")
        yield before
        if found:
            raise CloseFlow


@directions(Direction.CLIENT_TO_SERVER)
async def reset_on_bye(
    flow: Flow, direction: Direction, chunks: AsyncIterator[bytes]
) -> AsyncIterator[bytes]:
    async for chunk in chunks:
        before, found, _ = chunk.partition(b"bye")
        yield before
        if found:
            raise ResetFlow


async def test_close_flow_delivers_what_came_before_then_closes_both_sides(
    inside_proxy: Lab,
) -> None:
    events = EventLog()
    async with trio.open_nursery() as nursery:
        await nursery.start(run_library_proxy, events, {"interceptors": [hang_up_on_bye]})
        with trio.fail_after(10):
            async with open_flow(inside_proxy, SERVER_V4) as (client, server, _):
                await send_all(server, b"welcome")
                assert await recv_exactly(client, 7) == b"welcome"
                await send_all(client, b"last words bye and more")
                # A FIN each way, not a RST: both read to a clean EOF.
                assert await recv_until_eof(server) == b"last words "
                assert await recv_until_eof(client) == b""
            (closed,) = await events.wait_for(FlowClosed)
        nursery.cancel_scope.cancel()
    assert (closed.reason, closed.first_closed) == ("interceptor_closed", "proxy")
    assert closed.bytes_client_to_server == len(b"last words ")
    assert events.of_type(InterceptorFailed) == []


async def test_reset_flow_resets_both_sides_and_is_not_a_failure(inside_proxy: Lab) -> None:
    events = EventLog()
    async with trio.open_nursery() as nursery:
        await nursery.start(run_library_proxy, events, {"interceptors": [reset_on_bye]})
        with trio.fail_after(10):
            async with open_flow(inside_proxy, SERVER_V4) as (client, server, _):
                await send_all(client, b"hello")
                assert await recv_exactly(server, 5) == b"hello"
                await send_all(client, b"bye")
                for side in (server, client):
                    with pytest.raises(ConnectionResetError):
                        await recv_until_eof(side)
            (closed,) = await events.wait_for(FlowClosed)
        nursery.cancel_scope.cancel()
    assert closed.reason == "interceptor_reset"
    assert events.of_type(InterceptorFailed) == []


def odd_flows(flow: Flow) -> bool:
    return flow.id % 2 == 1


@for_flows(odd_flows)
async def tag(
    flow: Flow, direction: Direction, chunks: AsyncIterator[bytes]
) -> AsyncIterator[bytes]:
    async for chunk in chunks:
        yield chunk + b"!"


async def test_for_flows_intercepts_only_the_flows_it_picks(inside_proxy: Lab) -> None:
    events = EventLog()
    async with trio.open_nursery() as nursery:
        await nursery.start(run_library_proxy, events, {"interceptors": [tag]})
        seen = []
        for _ in range(4):
            with trio.fail_after(10):
                async with open_flow(inside_proxy, SERVER_V4) as (client, server, _):
                    await send_all(client, b"x")
                    client.shutdown(socket.SHUT_WR)
                    seen.append(await recv_until_eof(server))
                    server.close()
                    assert await recv_until_eof(client) == b""
        closed = await events.wait_for(FlowClosed, count=4)
        nursery.cancel_scope.cancel()
    assert seen == [b"x!", b"x", b"x!", b"x"]
    assert [event.intercepted for event in closed] == [True, False, True, False]
