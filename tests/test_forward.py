"""Forward listeners (no root, no TPROXY: Toxiproxy's model) and what a running proxy lets you
do to its flows: list them, reset one, change their interceptors, disable their route."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
from lab_tools import EventLog, echo_server

from uproxy_trio import (
    Address,
    Direction,
    Flow,
    FlowClosed,
    FlowRefused,
    Forward,
    Proxy,
)


async def shout(
    flow: Flow, direction: Direction, chunks: AsyncIterator[bytes]
) -> AsyncIterator[bytes]:
    async for chunk in chunks:
        yield chunk.upper()


@asynccontextmanager
async def upstream_and_proxy(
    events: EventLog, *forwards_named: str
) -> AsyncIterator[tuple[Proxy, dict[str, Address], Address]]:
    """An echo server on loopback, and a proxy forwarding to it under each name."""
    async with trio.open_nursery() as nursery:
        listener = trio.socket.socket()
        await listener.bind(("127.0.0.1", 0))
        listener.listen()
        upstream = listener.getsockname()
        await nursery.start(echo_server, listener)
        forwards = [Forward(name, ("127.0.0.1", 0), upstream) for name in forwards_named]
        proxy = Proxy(forwards=forwards, on_event=events)
        await nursery.start(proxy.serve, [])
        bound = {name: address for name, (_, address) in proxy.forwards.items()}
        yield proxy, bound, upstream
        nursery.cancel_scope.cancel()


async def echo(stream: trio.SocketStream, data: bytes) -> bytes:
    await stream.send_all(data)
    got = b""
    while len(got) < len(data):
        chunk = await stream.receive_some()
        assert chunk
        got += chunk
    return got


async def test_a_forward_relays_to_its_upstream_and_names_its_flows() -> None:
    events = EventLog()
    with trio.fail_after(10):
        async with upstream_and_proxy(events, "db") as (proxy, bound, upstream):
            started = trio.current_time()
            stream = await trio.open_tcp_stream(*bound["db"])
            assert await echo(stream, b"hello") == b"hello"
            (info,) = proxy.flows()
            asked = trio.current_time()
            assert info.route == "db"
            assert info.flow.server == upstream
            assert info.flow.transport == "tcp"
            assert (info.bytes_client_to_server, info.bytes_server_to_client) == (5, 5)
            # The flow began within the test's span: after it started to connect, before it asked.
            assert 0 < info.age_s <= asked - started
            await stream.aclose()
            (closed,) = await events.wait_for(FlowClosed)
    assert closed.route == "db"


async def test_live_interceptors_reach_an_open_forward_flow_and_leave_it() -> None:
    events = EventLog()
    with trio.fail_after(10):
        async with upstream_and_proxy(events, "db", "other") as (proxy, bound, _):
            stream = await trio.open_tcp_stream(*bound["db"])
            other = await trio.open_tcp_stream(*bound["other"])
            assert await echo(stream, b"quiet") == b"quiet"
            proxy.set_live_interceptors("db", [shout])
            # Both ways: upper on the way up, and again (a no-op) on the way down.
            assert await echo(stream, b"loud") == b"LOUD"
            assert [info.interceptors for info in proxy.flows()] == [("shout",), ()]
            assert await echo(other, b"calm") == b"calm"  # another route: untouched
            proxy.set_live_interceptors("db", [])
            assert await echo(stream, b"quiet again") == b"quiet again"
            assert proxy.flows()[0].interceptors == ()


async def test_reset_flow_resets_that_flow_only() -> None:
    events = EventLog()
    with trio.fail_after(10):
        async with upstream_and_proxy(events, "db") as (proxy, bound, _):
            doomed = await trio.open_tcp_stream(*bound["db"])
            calm = await trio.open_tcp_stream(*bound["db"])
            assert await echo(doomed, b"a") == b"a"
            assert await echo(calm, b"b") == b"b"
            first = min(info.flow.id for info in proxy.flows())
            assert proxy.reset_flow(first)
            assert not proxy.reset_flow(10_000)
            with pytest.raises(trio.BrokenResourceError):
                await doomed.receive_some()
            assert await echo(calm, b"still") == b"still"
            (closed,) = await events.wait_for(FlowClosed)
    assert closed.reason == "reset_requested"


async def test_a_disabled_route_resets_its_flows_and_refuses_new_ones_until_enabled() -> None:
    events = EventLog()
    with trio.fail_after(10):
        async with upstream_and_proxy(events, "db") as (proxy, bound, _):
            stream = await trio.open_tcp_stream(*bound["db"])
            assert await echo(stream, b"a") == b"a"
            proxy.set_enabled("db", False)
            with pytest.raises(trio.BrokenResourceError):
                await stream.receive_some()
            refused = await trio.open_tcp_stream(*bound["db"])
            with pytest.raises(trio.BrokenResourceError):
                await refused.receive_some()
            (refusal,) = await events.wait_for(FlowRefused)
            assert refusal.reason == "route_disabled"
            proxy.set_enabled("db", True)
            again = await trio.open_tcp_stream(*bound["db"])
            assert await echo(again, b"back") == b"back"
    closed = events.of_type(FlowClosed)
    assert closed[0].reason == "route_disabled"


async def test_forwards_come_and_go_while_the_proxy_runs() -> None:
    events = EventLog()
    with trio.fail_after(10):
        async with upstream_and_proxy(events) as (proxy, _, upstream):
            address = await proxy.add_forward(Forward("late", ("127.0.0.1", 0), upstream))
            with pytest.raises(ValueError, match="taken"):
                await proxy.add_forward(Forward("late", ("127.0.0.1", 0), upstream))
            stream = await trio.open_tcp_stream(*address)
            assert await echo(stream, b"hi") == b"hi"
            await proxy.remove_forward("late")
            with pytest.raises(trio.BrokenResourceError):
                await stream.receive_some()
            with pytest.raises(OSError, match="failed"):
                await trio.open_tcp_stream(*address)
            assert proxy.forwards == {}
