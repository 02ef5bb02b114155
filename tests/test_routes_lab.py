"""Routes in real flows, through the library: each flow takes its route's chain and timeouts,
an unrouted one is relayed as it is, and ``set_routes`` changes only the flows that follow."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

import pytest
import trio
from lab_tools import (
    CONNECT_TIMEOUT_S,
    PROXY_LISTEN,
    SCHEDULING_ALLOWANCE_S,
    TIMEOUT_LATENESS,
    EventLog,
    connect,
    connect_expecting_reset,
    listen,
    open_flow,
    recv_exactly,
    recv_until_eof,
    send_all,
    silent_server_port,
)

from uproxy_netns import SERVER_V4, Lab
from uproxy_trio import Direction, Flow, FlowClosed, Interceptor, Proxy, Route, Routes
from uproxy_trio.interceptors import label

pytestmark = pytest.mark.lab

IDLE_S = 0.3


def counting(seen: list[int]) -> Interceptor:
    """An interceptor that passes bytes on untouched and notes the flow of every chunk."""

    async def count(
        flow: Flow, direction: Direction, chunks: AsyncIterator[bytes]
    ) -> AsyncIterator[bytes]:
        async for chunk in chunks:
            seen.append(flow.id)
            yield chunk

    return count


async def start_proxy(nursery: trio.Nursery, events: EventLog, **options: Any) -> Proxy:
    proxy = Proxy(on_event=events, **options)
    await nursery.start(proxy.serve, PROXY_LISTEN)
    return proxy


async def round_trip(
    client: trio.socket.SocketType, server: trio.socket.SocketType, tag: bytes = b""
) -> None:
    """``ping`` from the client, ``pong`` back from the server: each arrives with ``tag``
    (what a label interceptor adds) or as it was sent."""
    await send_all(client, b"ping")
    assert await recv_exactly(server, 4 + len(tag)) == b"ping" + tag
    await send_all(server, b"pong")
    assert await recv_exactly(client, 4 + len(tag)) == b"pong" + tag


def closes(events: EventLog) -> dict[int, FlowClosed]:
    return {event.flow.id: event for event in events.of_type(FlowClosed)}


async def test_a_routed_flow_takes_its_routes_chain_and_an_unrouted_one_none(
    inside_proxy: Lab,
) -> None:
    lab, events, seen = inside_proxy, EventLog(), list[int]()
    routes = Routes([Route("tagged", port=9090, interceptors=[label("A"), counting(seen)])])
    async with trio.open_nursery() as nursery:
        await start_proxy(nursery, events, routes=routes)
        with trio.fail_after(10):
            async with open_flow(lab, SERVER_V4, 9090) as (client, server, _):
                await round_trip(client, server, b"A\n")
            async with open_flow(lab, SERVER_V4, 9092) as (client, server, _):
                await round_trip(client, server)
            await events.wait_for(FlowClosed, 2)
        nursery.cancel_scope.cancel()
    assert set(seen) == {1}  # the interceptor ran for the routed flow only
    closed = closes(events)
    assert (closed[1].route, closed[1].intercepted) == ("tagged", True)
    assert (closed[2].route, closed[2].intercepted) == (None, False)


async def test_a_route_without_interceptors_names_the_flow_and_leaves_it_plain(
    inside_proxy: Lab,
) -> None:
    lab, events, seen = inside_proxy, EventLog(), list[int]()
    routes = Routes([Route("watched", port=9090)])
    async with trio.open_nursery() as nursery:
        await start_proxy(nursery, events, routes=routes, interceptors=[counting(seen)])
        with trio.fail_after(10):
            async with open_flow(lab, SERVER_V4, 9090) as (client, server, _):
                await round_trip(client, server)
            await events.wait_for(FlowClosed)
        nursery.cancel_scope.cancel()
    # The proxy's own interceptors are for the flows no route takes: not for this one.
    assert seen == []
    (closed,) = events.of_type(FlowClosed)
    assert (closed.route, closed.intercepted) == ("watched", False)


async def test_a_routes_idle_timeout_applies_to_its_flows_only(inside_proxy: Lab) -> None:
    lab, events = inside_proxy, EventLog()
    routes = Routes([Route("quick", port=9092, idle_timeout=IDLE_S), Route("other", port=9094)])
    async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
        await start_proxy(nursery, events, routes=routes)
        with trio.fail_after(10):
            idle = {}
            for port in (9090, 9092, 9094):
                idle[port] = await stack.enter_async_context(open_flow(lab, SERVER_V4, port))
            started = trio.current_time()
            quick_client = idle[9092][0]
            with pytest.raises(ConnectionResetError):
                await recv_until_eof(quick_client)
            waited = trio.current_time() - started
            assert waited <= IDLE_S * TIMEOUT_LATENESS + SCHEDULING_ALLOWANCE_S
            # The others have no idle timeout (neither the proxy nor their route sets one):
            # idle for ten times as long, they still relay.
            await trio.sleep(10 * IDLE_S - waited)
            for port in (9090, 9094):
                client, server, _ = idle[port]
                await round_trip(client, server)
        (closed,) = events.of_type(FlowClosed)
        assert (closed.route, closed.reason) == ("quick", "idle_timeout")
        nursery.cancel_scope.cancel()


async def test_a_route_may_outlast_the_proxys_idle_timeout(inside_proxy: Lab) -> None:
    lab, events = inside_proxy, EventLog()
    routes = Routes([Route("patient", port=9090, idle_timeout=60)])
    async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
        await start_proxy(nursery, events, routes=routes, idle_timeout=IDLE_S)
        with trio.fail_after(10):
            patient = await stack.enter_async_context(open_flow(lab, SERVER_V4, 9090))
            unrouted_client, _, _ = await stack.enter_async_context(open_flow(lab, SERVER_V4, 9092))
            with pytest.raises(ConnectionResetError):
                await recv_until_eof(unrouted_client)
            await trio.sleep(5 * IDLE_S)
            await round_trip(patient[0], patient[1])
        (closed,) = events.of_type(FlowClosed)
        assert (closed.route, closed.reason) == (None, "idle_timeout")
        nursery.cancel_scope.cancel()


async def test_a_routes_connect_timeout_applies_to_its_flows_only(inside_proxy: Lab) -> None:
    lab, events = inside_proxy, EventLog()
    routes = Routes([Route("impatient", port=9093, connect_timeout=CONNECT_TIMEOUT_S)])
    with silent_server_port(lab, 9093), silent_server_port(lab, 9095):
        async with trio.open_nursery() as nursery:
            await start_proxy(nursery, events, routes=routes, connect_timeout=30)
            with trio.fail_after(10):
                started = trio.current_time()
                await connect_expecting_reset(lab.client, SERVER_V4, 9093)
                waited = trio.current_time() - started
                assert CONNECT_TIMEOUT_S <= waited <= CONNECT_TIMEOUT_S + SCHEDULING_ALLOWANCE_S
                # An unrouted flow to a silent server still waits, on the proxy's 30 s.
                with await connect(lab.client, SERVER_V4, 9095) as waiting:
                    with trio.move_on_after(1) as still:
                        await waiting.recv(1)
                    assert still.cancelled_caught
            nursery.cancel_scope.cancel()
    first_closed = events.of_type(FlowClosed)[0]
    assert (first_closed.route, first_closed.reason) == ("impatient", "upstream_timeout")


async def test_set_routes_changes_the_flows_that_follow_and_not_those_in_flight(
    inside_proxy: Lab,
) -> None:
    lab, events = inside_proxy, EventLog()
    routes_a = Routes([Route("a", port=9090, interceptors=[label("A")])])
    routes_b = Routes([Route("b", port=9090, interceptors=[label("B")])])
    async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
        proxy = await start_proxy(nursery, events, routes=routes_a)
        with trio.fail_after(10):
            listener = await listen(lab.server, SERVER_V4, 9090)
            stack.enter_context(listener)
            flows = []

            async def open_one() -> tuple[trio.socket.SocketType, trio.socket.SocketType]:
                client = stack.enter_context(await connect(lab.client, SERVER_V4, 9090))
                server = stack.enter_context((await listener.accept())[0])
                flows.append((client, server))
                return client, server

            first = await open_one()
            await round_trip(*first, b"A\n")
            proxy.set_routes(routes_b)
            second = await open_one()
            await round_trip(*second, b"B\n")
            # The first flow keeps the chain it started with.
            await round_trip(*first, b"A\n")
            proxy.set_routes(None)
            third = await open_one()
            await round_trip(*third)
            await round_trip(*second, b"B\n")
            for client, _ in flows:
                client.shutdown(socket.SHUT_WR)
            for _, server in flows:
                assert await server.recv(1) == b""
                server.close()
            await events.wait_for(FlowClosed, 3)
        nursery.cancel_scope.cancel()
    # The three close at once, so their events may come in any order.
    assert sorted((e.flow.id, e.route, e.reason) for e in events.of_type(FlowClosed)) == [
        (1, "a", "closed"),
        (2, "b", "closed"),
        (3, None, "closed"),
    ]


async def test_a_flow_keeps_its_routes_idle_timeout_after_the_route_is_gone(
    inside_proxy: Lab,
) -> None:
    """The proxy starts with no idle timeout at all; a table with one wakes the sweep, and a
    flow that started on that route is still timed out once the table no longer has it."""
    lab, events = inside_proxy, EventLog()
    quick = Routes([Route("quick", idle_timeout=IDLE_S)])
    async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
        proxy = await start_proxy(nursery, events)
        with trio.fail_after(10):
            before = await stack.enter_async_context(open_flow(lab, SERVER_V4, 9090))
            proxy.set_routes(quick)
            timed_client, _, _ = await stack.enter_async_context(open_flow(lab, SERVER_V4, 9092))
            proxy.set_routes(None)
            after = await stack.enter_async_context(open_flow(lab, SERVER_V4, 9094))
            started = trio.current_time()
            with pytest.raises(ConnectionResetError):
                await recv_until_eof(timed_client)
            assert trio.current_time() - started <= (
                IDLE_S * TIMEOUT_LATENESS + SCHEDULING_ALLOWANCE_S
            )
            await trio.sleep(5 * IDLE_S)
            for client, server, _ in (before, after):
                await round_trip(client, server)
        (closed,) = events.of_type(FlowClosed)
        assert (closed.flow.id, closed.route, closed.reason) == (2, "quick", "idle_timeout")
        nursery.cancel_scope.cancel()


async def test_bytes_of_a_routed_flow_arrive_whole(inside_proxy: Lab) -> None:
    """A routed, intercepted flow moves a bulk both ways byte-exact (the chain is the
    route's, the relay the same as ever)."""
    lab, events, seen = inside_proxy, EventLog(), list[int]()
    routes = Routes([Route("counted", port=9090, interceptors=[counting(seen)])])
    payload = bytes(range(256)) * 8192
    async with trio.open_nursery() as nursery:
        await start_proxy(nursery, events, routes=routes)
        with trio.fail_after(20):
            async with open_flow(lab, SERVER_V4, 9090) as (client, server, _):
                async with trio.open_nursery() as both:
                    both.start_soon(send_all, client, payload)
                    assert await recv_exactly(server, len(payload)) == payload
                await send_all(server, payload)
                assert await recv_exactly(client, len(payload)) == payload
        nursery.cancel_scope.cancel()
    assert len(seen) > 2
    assert set(seen) == {1}


async def test_live_interceptors_reach_a_routes_flows_in_flight_and_no_other(
    inside_proxy: Lab,
) -> None:
    lab, events = inside_proxy, EventLog()
    routes = Routes([Route("watched", port=9090), Route("other", port=9091)])
    async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
        proxy = await start_proxy(nursery, events, routes=routes)
        with trio.fail_after(10):
            pairs = []
            for port in (9090, 9091):
                listener = stack.enter_context(await listen(lab.server, SERVER_V4, port))
                client = stack.enter_context(await connect(lab.client, SERVER_V4, port))
                server = stack.enter_context((await listener.accept())[0])
                pairs.append((client, server))
            watched, other = pairs
            await round_trip(*watched)
            proxy.set_live_interceptors("watched", [label("live")])
            await round_trip(*watched, b"live\n")
            await round_trip(*other)
            infos = {info.route: info for info in proxy.flows()}
            assert infos["watched"].interceptors == ("add_label",)
            assert infos["other"].interceptors == ()
            # The flow is transparent, as the client and the server see it.
            assert infos["watched"].flow.client == watched[0].getsockname()
            assert infos["watched"].flow.server == (SERVER_V4, 9090)
            assert infos["watched"].bytes_client_to_server == 4 + 9
            proxy.set_live_interceptors("watched", [])
            await round_trip(*watched)
            assert proxy.flows()[0].interceptors == ()
        nursery.cancel_scope.cancel()
