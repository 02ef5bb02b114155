"""Faults inside the proxy or on one connection: each ends that flow only, with a reset and
one ``FlowClosed``, and the server goes on serving."""

from __future__ import annotations

import errno
import functools
import logging
import os
import socket
from collections.abc import AsyncIterator

import pytest
import trio
from cli_tools import PROXY_PORT
from lab_tools import (
    EventLog,
    connect,
    connect_expecting_reset,
    echo_server,
    listen,
    recv_exactly,
    recv_until_eof,
    roundtrip,
    run_library_proxy,
    send_all,
)

import uproxy_trio
import uproxy_trio._proxy
import uproxy_trio._transparent
from uproxy_netns import SERVER_V4, Lab
from uproxy_trio import Flow, FlowClosed, TransparencyUnavailable
from uproxy_trio._direction import Way
from uproxy_trio._transparent import open_outgoing


@pytest.fixture
async def echo(inside_proxy: Lab) -> AsyncIterator[None]:
    async with trio.open_nursery() as nursery:
        await nursery.start(echo_server, await listen(inside_proxy.server, SERVER_V4, 9090))
        yield
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    "code", [errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ENETDOWN, errno.EHOSTUNREACH]
)
async def test_an_accept_error_for_one_connection_is_logged_and_serving_goes_on(
    inside_proxy: Lab,
    echo: None,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    code: int,
) -> None:
    lab = inside_proxy
    real_accept = socket.socket.accept
    failures = [OSError(code, "injected")]

    def accept(self: socket.socket) -> tuple[socket.socket, object]:
        if failures and self.getsockname()[1] == PROXY_PORT:
            raise failures.pop()
        return real_accept(self)

    events = EventLog()
    async with trio.open_nursery() as nursery:
        await nursery.start(run_library_proxy, events, {})
        with trio.fail_after(10):
            before = await connect(lab.client, SERVER_V4, 9090)
            await roundtrip(before)
            monkeypatch.setattr(socket.socket, "accept", accept)
            after = await connect(lab.client, SERVER_V4, 9090)
            await roundtrip(after)  # the connection behind the error is served
            await roundtrip(before)  # and the flow in flight never noticed
            assert not failures
        nursery.cancel_scope.cancel()
    name = errno.errorcode[code]
    assert f"accept failed for one connection: {name}" in caplog.text


async def test_a_fault_before_connecting_out_resets_that_client_with_one_flow_closed(
    inside_proxy: Lab, echo: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    lab = inside_proxy
    calls = 0

    def faulty_open_outgoing(*args: object, **kwargs: bool) -> socket.socket:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise TransparencyUnavailable(errno.EPERM, "capability dropped behind our back")
        return open_outgoing(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(uproxy_trio._proxy, "open_outgoing", faulty_open_outgoing)
    events = EventLog()
    async with trio.open_nursery() as nursery:
        await nursery.start(run_library_proxy, events, {})
        with trio.fail_after(10):
            healthy = await connect(lab.client, SERVER_V4, 9090)
            await roundtrip(healthy)
            await connect_expecting_reset(lab.client, SERVER_V4, 9090)
            (closed,) = await events.wait_for(FlowClosed)
            await roundtrip(healthy)
        nursery.cancel_scope.cancel()
    assert (closed.flow.id, closed.reason) == (2, "proxy_error")


async def test_no_descriptor_to_check_for_a_self_loop_resets_that_client_with_one_flow_closed(
    inside_proxy: Lab, echo: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A listener on a wildcard address owns its port on every local address: a flow to that
    # port costs a probe socket, to learn whether its destination is local. With no descriptor
    # left for it, that flow is reset and reported once; the proxy goes on.
    lab = inside_proxy
    real_is_local = uproxy_trio._transparent._is_local_address
    calls = 0

    def out_of_descriptors(host: str) -> bool:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        return real_is_local(host)

    monkeypatch.setattr(uproxy_trio._transparent, "_is_local_address", out_of_descriptors)
    events = EventLog()
    async with trio.open_nursery() as nursery:
        await nursery.start(
            functools.partial(uproxy_trio.serve, [("0.0.0.0", PROXY_PORT)], on_event=events)
        )
        with trio.fail_after(10):
            # (port 9091 of the server: the listener's own port, on an address not local here)
            refused = await connect(lab.client, SERVER_V4, PROXY_PORT)
            with pytest.raises(ConnectionResetError):
                await recv_until_eof(refused)
            refused.close()
            await connect_expecting_reset(lab.client, SERVER_V4, PROXY_PORT)
            closed = await events.wait_for(FlowClosed, count=2)
            after = await connect(lab.client, SERVER_V4, 9090)
            await roundtrip(after)
            after.close()
        nursery.cancel_scope.cancel()
    assert calls == 2
    assert [(event.flow.id, event.reason) for event in closed] == [
        (1, "upstream_refused"),
        (2, "proxy_error"),
    ]


async def test_a_bug_in_a_relay_resets_both_sides_of_that_flow_only(
    inside_proxy: Lab, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    lab = inside_proxy
    real_copy = Way._copy

    def copy(self: Way) -> int:
        if self.source.getpeername()[1] == doomed_port:
            raise RuntimeError("a bug in the relay")
        return real_copy(self)

    monkeypatch.setattr(Way, "_copy", copy)
    events = EventLog()
    listener = await listen(lab.server, SERVER_V4, 9090)
    async with trio.open_nursery() as nursery:
        await nursery.start(run_library_proxy, events, {})
        with trio.fail_after(10), listener:
            doomed = await connect(lab.client, SERVER_V4, 9090)
            doomed_port = doomed.getsockname()[1]
            doomed_server, _ = await listener.accept()
            healthy = await connect(lab.client, SERVER_V4, 9090)
            healthy_server, _ = await listener.accept()
            await send_all(doomed, b"boom")
            for sock in (doomed, doomed_server):
                with pytest.raises(ConnectionResetError):
                    await sock.recv(10)
            await send_all(healthy, b"fine")
            assert await recv_exactly(healthy_server, 4) == b"fine"
            healthy.shutdown(socket.SHUT_WR)
            healthy_server.shutdown(socket.SHUT_WR)
            assert await healthy.recv(1) == b""
            await events.wait_for(FlowClosed, count=2)
        nursery.cancel_scope.cancel()
    reasons = {event.flow.id: event.reason for event in events.of_type(FlowClosed)}
    assert reasons == {1: "proxy_error", 2: "closed"}
    assert any(
        record.levelno == logging.ERROR and "flow 1 failed inside the proxy" in record.message
        for record in caplog.records
    )


async def test_a_flow_stopped_for_idleness_is_reset_and_relays_nothing_more(
    inside_proxy: Lab,
) -> None:
    # The client has half-closed (its FIN passed on); then the flow sits idle and is stopped.
    # From then on nothing is relayed: both ends see a reset, never the server's FIN, and
    # the flow is reported once, as idle_timeout.
    lab = inside_proxy
    events = EventLog()
    listener = await listen(lab.server, SERVER_V4, 9090)
    async with trio.open_nursery() as nursery:
        await nursery.start(run_library_proxy, events, {"idle_timeout": 0.3})
        with trio.fail_after(10), listener:
            client = await connect(lab.client, SERVER_V4, 9090)
            server, _ = await listener.accept()
            client.shutdown(socket.SHUT_WR)
            assert await server.recv(1) == b""
            (closed,) = await events.wait_for(FlowClosed)
            with pytest.raises(ConnectionResetError):
                await client.recv(100)
            # A RST in CLOSE_WAIT (the server had the client's FIN) reads as EPIPE; after a FIN
            # the send would go through.
            with pytest.raises(BrokenPipeError):
                await server.send(b"too late")
        nursery.cancel_scope.cancel()
    assert (closed.reason, closed.first_closed) == ("idle_timeout", "client")
    assert len(events.of_type(FlowClosed)) == 1


async def test_a_fault_while_choosing_a_route_resets_that_client_only(
    inside_proxy: Lab, echo: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    lab = inside_proxy
    real_plan = uproxy_trio._proxy.Proxy._plan

    def faulty_plan(self: uproxy_trio._proxy.Proxy, flow: Flow) -> object:
        if flow.id == 2:
            raise RuntimeError("a bug in route matching")
        return real_plan(self, flow)

    monkeypatch.setattr(uproxy_trio._proxy.Proxy, "_plan", faulty_plan)
    events = EventLog()
    async with trio.open_nursery() as nursery:
        await nursery.start(run_library_proxy, events, {})
        with trio.fail_after(10):
            healthy = await connect(lab.client, SERVER_V4, 9090)
            await roundtrip(healthy)
            await connect_expecting_reset(lab.client, SERVER_V4, 9090)
            (closed,) = await events.wait_for(FlowClosed)
            await roundtrip(healthy)
            after = await connect(lab.client, SERVER_V4, 9090)
            await roundtrip(after)
        nursery.cancel_scope.cancel()
    assert (closed.flow.id, closed.reason) == (2, "proxy_error")
