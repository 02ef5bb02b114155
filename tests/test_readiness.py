"""The reactor, readiness bits and the one-task relay, over socket pairs (no lab needed).

Edge-triggered epoll reports a change once; these tests pin the cases where a missed edge
would hang a flow for good.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import ExitStack, asynccontextmanager, contextmanager

import pytest
import trio

from uproxy_trio import Direction
from uproxy_trio._ending import EndKind
from uproxy_trio._readiness import FINISHED, READABLE, Reactor, Readiness, Side, TimedOut, bit
from uproxy_trio._relay import Relay, Way
from uproxy_trio._splice import PipePool


class Pair:
    """One relayed flow between two socket pairs: the test holds the outer ends."""

    def __init__(self, stack: ExitStack) -> None:
        self.client, client_inner = socket.socketpair()
        server_inner, self.server = socket.socketpair()
        for sock in (self.client, client_inner, server_inner, self.server):
            stack.enter_context(sock)
            sock.setblocking(False)
        self.ways = (
            Way(Direction.CLIENT_TO_SERVER, client_inner, server_inner, can_splice=True),
            Way(Direction.SERVER_TO_CLIENT, server_inner, client_inner, can_splice=True),
        )
        self.ends: list[tuple[Direction, EndKind | None]] = []

    def watch(self, reactor: Reactor, readiness: Readiness, stack: ExitStack) -> None:
        stack.enter_context(reactor.watch(self.ways[0].source, readiness, Side.CLIENT))
        stack.enter_context(reactor.watch(self.ways[1].source, readiness, Side.SERVER))

    def ended(self, way: Way) -> bool:
        """What the proxy does: pass an EOF on as a FIN; anything else stops the flow."""
        self.ends.append((way.direction, way.end))
        if way.end is EndKind.EOF:
            way.sink.shutdown(socket.SHUT_WR)
            return False
        return True


@contextmanager
def pairs(count: int) -> Iterator[list[Pair]]:
    with ExitStack() as stack:
        yield [Pair(stack) for _ in range(count)]


@asynccontextmanager
async def watched(*flows: Pair) -> AsyncIterator[list[Readiness]]:
    """A running reactor watching each pair's inner sockets; one ``Readiness`` per pair."""
    with Reactor() as reactor, ExitStack() as stack:
        readinesses = [Readiness() for _ in flows]
        for pair, readiness in zip(flows, readinesses, strict=True):
            pair.watch(reactor, readiness, stack)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reactor.run)
            yield readinesses
            nursery.cancel_scope.cancel()


async def read_to_eof(sock: socket.socket) -> bytes:
    received = bytearray()
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)
            continue
        if not chunk:
            return bytes(received)
        received += chunk


async def write_all(sock: socket.socket, data: bytes, then: Callable[[], None]) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view) :]
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)
    then()


async def test_an_edge_wakes_the_task_waiting_for_it() -> None:
    with pairs(1) as (pair,):
        async with watched(pair) as (readiness,):
            with trio.fail_after(5):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(readiness.wait, bit(Side.CLIENT, READABLE))
                    await trio.testing.wait_all_tasks_blocked()
                    pair.client.send(b"x")
            assert readiness.bits & bit(Side.CLIENT, READABLE)


async def test_bytes_and_a_fin_reported_by_one_edge_are_both_relayed() -> None:
    # Both arrive before the socket is even watched, so the kernel reports them as a single
    # edge. The short read that takes the bytes must not be taken for "the socket is empty":
    # the EOF is still to be read, and no further edge would ever say so.
    with pairs(1) as (pair,):
        pair.client.send(b"request")
        pair.client.shutdown(socket.SHUT_WR)
        async with watched(pair) as (readiness,):
            with trio.fail_after(5):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(Relay(PipePool()).run, pair.ways, readiness, pair.ended)
                    assert await read_to_eof(pair.server) == b"request"
                    pair.server.shutdown(socket.SHUT_WR)
                    assert await read_to_eof(pair.client) == b""
    assert pair.ends == [
        (Direction.CLIENT_TO_SERVER, EndKind.EOF),
        (Direction.SERVER_TO_CLIENT, EndKind.EOF),
    ]


@pytest.mark.parametrize("size", [1, 65536, 3 << 20])
async def test_both_directions_at_once_are_byte_exact(size: int) -> None:
    # Small reads, a read that exactly fills the shared buffer, and bulk through the pipes,
    # with both sinks kept full so that bytes wait in the backlog and in the pipe.
    upload, download = os.urandom(size), os.urandom(size)
    with pairs(1) as (pair,):
        async with watched(pair) as (readiness,):
            with trio.fail_after(20):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(Relay(PipePool()).run, pair.ways, readiness, pair.ended)
                    client, server = pair.client, pair.server
                    nursery.start_soon(write_all, client, upload, lambda: client.shutdown(1))
                    nursery.start_soon(write_all, server, download, lambda: server.shutdown(1))
                    assert await read_to_eof(server) == upload
                    assert await read_to_eof(client) == download


async def test_a_fault_in_one_flows_relay_ends_that_flow_and_no_other() -> None:
    relay = Relay(PipePool())
    with pairs(2) as (faulty, healthy):
        async with watched(faulty, healthy) as (faulty_readiness, healthy_readiness):

            def broken(way: Way) -> bool:
                raise RuntimeError("a bug in the proxy")

            with trio.fail_after(5):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(relay.run, healthy.ways, healthy_readiness, healthy.ended)
                    faulty.client.shutdown(socket.SHUT_WR)  # its end is what trips the bug
                    with pytest.raises(RuntimeError, match="a bug in the proxy"):
                        await relay.run(faulty.ways, faulty_readiness, broken)
                    # The reactor is still there for the other flow.
                    healthy.client.send(b"still here")
                    healthy.client.shutdown(socket.SHUT_WR)
                    assert await read_to_eof(healthy.server) == b"still here"
                    healthy.server.shutdown(socket.SHUT_WR)


async def test_time_out_ends_the_wait_now_and_every_wait_after() -> None:
    readiness = Readiness()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:

            async def wait_finished() -> None:
                with pytest.raises(TimedOut):
                    await readiness.wait(FINISHED)

            nursery.start_soon(wait_finished)
            await trio.testing.wait_all_tasks_blocked()
            readiness.time_out()
    with pytest.raises(TimedOut):
        await readiness.wait(FINISHED)


def test_the_package_imports_where_there_is_no_epoll() -> None:
    # Serving needs Linux, but writing and unit-testing an interceptor should not.
    code = (
        "import select\n"
        "for name in [n for n in dir(select) if n.startswith('EPOLL')] + ['epoll']:\n"
        "    delattr(select, name)\n"
        "import uproxy_trio, uproxy_trio.interceptors\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")
