"""Interceptors on UDP sessions: each chunk is one datagram, each item yielded is one datagram."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio
from udp_tools import UDP_PORT, UdpSocket, echo_server, exchange, udp_proxy, udp_socket

from uproxy_netns import Lab
from uproxy_trio import (
    Direction,
    Flow,
    FlowClosed,
    Interceptor,
    InterceptorFailed,
    Route,
    Routes,
    UdpDrop,
    directions,
)
from uproxy_trio.interceptors import delay, hexdump, label, regex_replace, replace, throttle
from uproxy_trio.toxics import slicer, slow_close

pytestmark = [pytest.mark.lab]

SERVER = ("198.51.100.2", UDP_PORT)
SERVER_V6 = ("2001:db8:2::2", UDP_PORT)


@directions("client_to_server")
async def shape(
    flow: Flow, direction: Direction, chunks: AsyncIterator[bytes]
) -> AsyncIterator[bytes]:
    """Drops ``drop``, splits ``split`` in two, puts ``injected`` before ``inject``."""
    async for datagram in chunks:
        if datagram == b"drop":
            continue
        if datagram == b"split":
            yield b"sp"
            yield b"lit"
            continue
        if datagram == b"inject":
            yield b"injected"
        yield datagram


async def _receive(server: UdpSocket, count: int) -> list[bytes]:
    received = []
    with trio.fail_after(5):
        for _ in range(count):
            data, _peer = await server.recvfrom(1 << 16)
            received.append(data)
    return received


@pytest.mark.parametrize("server_address", [SERVER, SERVER_V6], ids=["ipv4", "ipv6"])
async def test_interceptors_drop_split_and_inject_datagrams(
    inside_proxy: Lab, server_address: tuple[str, int]
) -> None:
    lab = inside_proxy
    client_ip = "192.0.2.2" if ":" not in server_address[0] else "2001:db8:1::2"
    async with udp_proxy({"interceptors": [shape]}) as (_proxy, events):
        with (
            udp_socket(lab.server, server_address[0], UDP_PORT) as server,
            udp_socket(lab.client, client_ip) as client,
        ):
            for datagram in (b"one", b"drop", b"split", b"inject", b"last"):
                await client.sendto(datagram, server_address)
            received = await _receive(server, 6)
            assert received == [b"one", b"sp", b"lit", b"injected", b"inject", b"last"]
            # The other way no interceptor touches: relayed as it is.
            await server.sendto(b"answer", (client_ip, client.getsockname()[1]))
            with trio.fail_after(5):
                assert (await client.recvfrom(100))[0] == b"answer"
    (closed,) = events.of_type(FlowClosed)
    assert closed.intercepted
    assert closed.bytes_client_to_server == len(b"onesplitinjectedinjectlast")


async def test_built_ins_work_per_datagram_and_never_hold_bytes_back(inside_proxy: Lab) -> None:
    """``replace`` would hold ``ab`` back on TCP (the next read could complete ``abc``); on
    UDP it is sent at once. ``throttle`` never cuts a datagram into its slices."""
    lab = inside_proxy
    interceptors = [
        throttle(20_000),  # 1,000-byte slices on TCP
        replace(b"abc", b"X"),
        regex_replace(rb"a+b", b"Y"),
        label("L"),
        hexdump(64),
        delay(0.01),
    ]
    async with udp_proxy({"interceptors": interceptors}):
        with (
            udp_socket(lab.server, SERVER[0], UDP_PORT) as server,
            udp_socket(lab.client, "192.0.2.2") as client,
        ):
            await client.sendto(b"xxab", SERVER)
            assert await _receive(server, 1) == [b"xxYL\n"]  # "ab" not held for a "c"
            await client.sendto(b"c abc aab", SERVER)
            assert await _receive(server, 1) == [b"c X YL\n"]
            big = b"z" * 3000
            await client.sendto(big, SERVER)
            assert await _receive(server, 1) == [big + b"L\n"]
            # Server to client the onion is crossed the other way: label, then the rest.
            await server.sendto(b"abc", client.getsockname())
            with trio.fail_after(5):
                assert (await client.recvfrom(100))[0] == b"YcL\n"


async def failing(
    flow: Flow, direction: Direction, chunks: AsyncIterator[bytes]
) -> AsyncIterator[bytes]:
    async for datagram in chunks:
        if datagram == b"boom":
            raise RuntimeError("boom")
        yield datagram


async def test_a_failing_interceptor_ends_its_session_only(inside_proxy: Lab) -> None:
    lab = inside_proxy
    async with (
        udp_proxy({"interceptors": [failing]}) as (_proxy, events),
        echo_server(lab, SERVER[0]),
    ):
        with (
            udp_socket(lab.client, "192.0.2.2") as doomed,
            udp_socket(lab.client, "192.0.2.2") as other,
        ):
            assert (await exchange(doomed, b"hi", SERVER))[0] == b"hi"
            assert (await exchange(other, b"hi", SERVER))[0] == b"hi"
            await doomed.sendto(b"boom", SERVER)
            (closed,) = await events.wait_for(FlowClosed)
            assert closed.reason == "interceptor_failed"
            assert closed.flow.client == doomed.getsockname()
            assert (await exchange(other, b"still", SERVER))[0] == b"still"


async def test_routes_take_udp_sessions_and_the_controls_reach_them(inside_proxy: Lab) -> None:
    """A route for ``transport = "udp"`` gives UDP sessions their interceptors (and TCP
    flows none); ``flows()`` lists the sessions, ``reset_flow`` ends one, ``set_enabled``
    ends a route's sessions and drops its new ones until enabled again, and live interceptors
    reach the sessions in flight and those that start after them."""
    lab = inside_proxy
    routes = Routes([Route("dns", transport="udp", port=UDP_PORT, interceptors=[label("R")])])
    async with udp_proxy({"routes": routes}) as (proxy, events), echo_server(lab, SERVER[0]):
        with udp_socket(lab.client, "192.0.2.2") as client:
            assert (await exchange(client, b"q", SERVER))[0] == b"qR\nR\n"  # out and back
            (info,) = proxy.flows()
            assert (info.flow.transport, info.route, info.interceptors) == (
                "udp",
                "dns",
                ("add_label",),
            )
            assert info.bytes_client_to_server == len(b"qR\n")
            assert proxy.reset_flow(info.flow.id)
            (closed,) = await events.wait_for(FlowClosed)
            assert closed.reason == "reset_requested"
            assert closed.route == "dns"
            assert (await exchange(client, b"again", SERVER))[0] == b"againR\nR\n"
            proxy.set_enabled("dns", False)
            closed = (await events.wait_for(FlowClosed, 2))[1]
            assert closed.reason == "route_disabled"
            with pytest.raises(trio.TooSlowError):
                await exchange(client, b"off", SERVER, timeout=0.3)
            assert proxy.udp.dropped[UdpDrop.ROUTE_DISABLED] == 1
            proxy.set_enabled("dns", True)
            assert (await exchange(client, b"on", SERVER))[0] == b"onR\nR\n"
            # Live interceptors reach the sessions in flight (at their next datagram) and the
            # ones that start after them, nearest the source, before the route's own; and
            # leave them again.
            proxy.set_live_interceptors("dns", [label("L")])
            assert (await exchange(client, b"old", SERVER))[0] == b"oldL\nR\nL\nR\n"
            with udp_socket(lab.client, "192.0.2.2") as newcomer:
                assert (await exchange(newcomer, b"new", SERVER))[0] == b"newL\nR\nL\nR\n"
            proxy.set_live_interceptors("dns", [])
            assert (await exchange(client, b"back", SERVER))[0] == b"backR\nR\n"


@pytest.mark.parametrize(
    "toxic", [slicer(average_size=10), slow_close(delay=10)], ids=["slicer", "slow_close"]
)
async def test_stream_toxics_refuse_udp_sessions_with_a_clear_error(
    inside_proxy: Lab, toxic: Interceptor
) -> None:
    """``slicer`` would cut datagrams, ``slow_close`` has no close to delay: on a UDP session
    each ends the session with an error that says so, and passes nothing."""
    lab = inside_proxy
    async with (
        udp_proxy({"interceptors": [toxic]}) as (_proxy, events),
        echo_server(lab, SERVER[0]),
    ):
        with udp_socket(lab.client, "192.0.2.2") as client:
            await client.sendto(b"x" * 40, SERVER)
            failed = (await events.wait_for(InterceptorFailed))[0]  # one a direction
            (closed,) = await events.wait_for(FlowClosed)
    assert "toxic is for TCP: on UDP session" in str(failed.error)
    assert closed.reason == "interceptor_failed"
    assert closed.bytes_client_to_server == 0


async def test_a_session_in_flight_moves_on_and_off_the_interceptor_path(
    inside_proxy: Lab,
) -> None:
    """A plain session (no route, no interceptor) takes live interceptors and lets them go
    again, two hundred times, at a datagram's boundary: the next datagram after each change
    goes the new way, and none is lost or reordered."""
    lab = inside_proxy
    async with udp_proxy({}) as (proxy, events), echo_server(lab, SERVER[0]):
        with udp_socket(lab.client, "192.0.2.2") as client:
            for number in range(200):
                tagged = number % 2 == 1
                proxy.set_live_interceptors(None, [label("L")] if tagged else [])
                sent = b"%d" % number
                expected = sent + b"L\nL\n" if tagged else sent
                assert (await exchange(client, sent, SERVER))[0] == expected
            (info,) = proxy.flows()
            assert info.interceptors == ("add_label",)
            proxy.set_live_interceptors(None, [])
            assert (await exchange(client, b"plain", SERVER))[0] == b"plain"
            assert proxy.flows()[0].interceptors == ()
    (closed,) = events.of_type(FlowClosed)
    assert closed.intercepted
