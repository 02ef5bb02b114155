"""One direction of a flow: its decisions without sockets, then the real relay over loopback
TCP, where FIN, RST and splice are the kernel's own."""

from __future__ import annotations

import socket
import struct
from collections.abc import AsyncIterator, Sequence

import pytest
import trio
import trio.testing
from relay_tools import loopback_flows, pattern, read_to_eof, relay_task, relayed, write_all

from uproxy_trio import Direction, Flow, FlowEvent, HalfClosed, Interceptor, InterceptorFailed
from uproxy_trio._direction import (
    READ_SIZE,
    SPLICE_MIN_BURST,
    TURN_BYTES,
    DirectionState,
    Step,
)
from uproxy_trio._ending import EndKind, Stop
from uproxy_trio._proxy import _LiveFlow

# -- the decisions ----------------------------------------------------------------------------


def test_held_bytes_go_out_before_anything_more_is_read() -> None:
    state = DirectionState(can_splice=True)
    state.copied(100, READ_SIZE)
    state.delivered(40)
    assert state.held == 60
    assert state.next_step(readable=1, writable=0, moved=0) is Step.WAIT_WRITABLE
    assert state.next_step(readable=1, writable=1, moved=0) is Step.FLUSH
    state.delivered(60)
    assert state.next_step(readable=1, writable=1, moved=0) is Step.COPY
    assert state.next_step(readable=0, writable=1, moved=0) is Step.WAIT_READABLE


def test_a_full_read_switches_to_splice_and_a_small_burst_switches_back() -> None:
    state = DirectionState(can_splice=True)
    state.copied(READ_SIZE, READ_SIZE)
    assert state.splicing
    state.delivered(READ_SIZE)
    assert state.next_step(1, 1, 0) is Step.SPLICE
    state.spliced(SPLICE_MIN_BURST)
    assert state.splicing
    state.spliced(SPLICE_MIN_BURST - 1)
    assert not state.splicing


def test_a_direction_that_cannot_splice_keeps_copying() -> None:
    state = DirectionState(can_splice=False)
    state.copied(READ_SIZE, READ_SIZE)
    assert not state.splicing
    spliced = DirectionState(can_splice=True)
    spliced.copied(READ_SIZE, READ_SIZE)
    spliced.splice_refused()
    assert (spliced.splicing, spliced.can_splice) == (False, False)


def test_eof_ends_the_direction_and_a_turn_ends_after_its_bytes() -> None:
    state = DirectionState(can_splice=True)
    assert state.next_step(1, 1, TURN_BYTES) is Step.YIELD
    state.copied(0, READ_SIZE)
    assert (state.end, state.next_step(1, 1, 0)) == (EndKind.EOF, Step.END)


def test_a_short_read_empties_the_socket_unless_the_peer_has_closed() -> None:
    assert DirectionState.emptied(10, READ_SIZE, peer_closed=0)
    assert not DirectionState.emptied(10, READ_SIZE, peer_closed=4)
    assert not DirectionState.emptied(READ_SIZE, READ_SIZE, peer_closed=0)


def test_counts_follow_reads_and_deliveries() -> None:
    state = DirectionState(can_splice=True)
    state.copied(10, READ_SIZE)
    state.delivered(10)
    state.spliced(SPLICE_MIN_BURST)
    state.delivered(SPLICE_MIN_BURST)
    assert (state.read, state.written, state.held) == (10 + SPLICE_MIN_BURST,) * 2 + (0,)


# -- the relay over loopback TCP --------------------------------------------------------------


async def test_bytes_and_a_fin_reported_by_one_edge_are_both_relayed() -> None:
    with loopback_flows(1) as (flow,):
        async with relayed(flow):
            with trio.fail_after(5):
                await write_all(flow.client, b"last words")
                flow.client.shutdown(socket.SHUT_WR)
                assert await read_to_eof(flow.server) == b"last words"
                await write_all(flow.server, b"reply")
                flow.server.shutdown(socket.SHUT_WR)
                assert await read_to_eof(flow.client) == b"reply"
                await flow.done.wait()
    assert flow.ending.reason == "closed"
    assert [type(event) for event in flow.events] == [HalfClosed, HalfClosed]


@pytest.mark.parametrize("size", [1, READ_SIZE, 3 << 20])
async def test_both_directions_at_once_are_byte_exact(size: int) -> None:
    with loopback_flows(1) as (flow,):
        async with relayed(flow):
            with trio.fail_after(20):
                got: dict[str, bytes] = {}

                async def send_then_close(sock: socket.socket, data: bytes) -> None:
                    await write_all(sock, data)
                    sock.shutdown(socket.SHUT_WR)

                async def read(name: str, sock: socket.socket) -> None:
                    got[name] = await read_to_eof(sock)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(send_then_close, flow.client, pattern(size, 1))
                    nursery.start_soon(send_then_close, flow.server, pattern(size, 2))
                    nursery.start_soon(read, "server", flow.server)
                    nursery.start_soon(read, "client", flow.client)
                await flow.done.wait()
    assert got == {"server": pattern(size, 1), "client": pattern(size, 2)}
    assert flow.written == (size, size)


def abort(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@pytest.mark.parametrize("resetting", ["client", "server"])
async def test_a_reset_reaches_the_other_side_as_a_reset(resetting: str) -> None:
    with loopback_flows(1) as (flow,):
        async with relayed(flow):
            with trio.fail_after(5):
                await write_all(flow.client, b"x")
                assert await _recv(flow.server) == b"x"
                aborting, survivor = (
                    (flow.client, flow.server)
                    if resetting == "client"
                    else (flow.server, flow.client)
                )
                abort(aborting)
                with pytest.raises(ConnectionResetError):
                    await read_to_eof(survivor)
                await flow.done.wait()
    assert flow.ending.reason == f"{resetting}_reset"


async def test_after_the_decision_to_reset_no_fin_goes_out() -> None:
    # The client half-closes (its FIN is passed on), then the server resets while the client
    # still has bytes on the way: the client must see a RST, never a second clean FIN.
    with loopback_flows(1) as (flow,):
        async with relayed(flow):
            with trio.fail_after(5):
                flow.client.shutdown(socket.SHUT_WR)
                assert await read_to_eof(flow.server) == b""
                abort(flow.server)
                with pytest.raises(ConnectionResetError):
                    await read_to_eof(flow.client)
                await flow.done.wait()
    assert flow.ending.reason == "server_reset"


class StepsOf(trio.abc.Instrument):
    """Counts the steps ``tasks`` take: each is one trip through Trio's scheduler."""

    def __init__(self, tasks: Sequence[trio.lowlevel.Task]) -> None:
        self.steps = dict.fromkeys(tasks, 0)

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task in self.steps:
            self.steps[task] += 1


async def test_a_plain_directions_task_sleeps_while_the_reactor_relays_and_wakes_once() -> None:
    # 100 request-response round trips, then a FIN each way: each direction's task takes one
    # step for all of it (woken at its end, it passes the FIN on and returns), not one a message.
    with loopback_flows(1) as (flow,):
        async with relayed(flow):
            with trio.fail_after(10):
                await write_all(flow.client, b"x")
                assert await _recv(flow.server) == b"x"
                await trio.testing.wait_all_tasks_blocked()
                assert flow.ways is not None
                counted = StepsOf([relay_task(way) for way in flow.ways])
                trio.lowlevel.add_instrument(counted)
                try:
                    for _ in range(100):
                        await write_all(flow.client, b"ping")
                        assert await _recv(flow.server) == b"ping"
                        await write_all(flow.server, b"pong")
                        assert await _recv(flow.client) == b"pong"
                    flow.client.shutdown(socket.SHUT_WR)
                    assert await read_to_eof(flow.server) == b""
                    flow.server.shutdown(socket.SHUT_WR)
                    assert await read_to_eof(flow.client) == b""
                    await flow.done.wait()
                finally:
                    trio.lowlevel.remove_instrument(counted)
    assert flow.ending.reason == "closed"
    assert list(counted.steps.values()) == [1, 1]


async def test_the_reactor_runs_no_event_sink_and_no_interceptor() -> None:
    # The end-of-direction work (FIN or RST, events) and every interceptor run in the
    # direction's own task, whatever path it takes: the reactor only moves bytes and wakes tasks.
    ran_in: list[tuple[str, trio.lowlevel.Task]] = []

    async def noting(
        flow: Flow, direction: Direction, chunks: AsyncIterator[bytes]
    ) -> AsyncIterator[bytes]:
        async for chunk in chunks:
            ran_in.append(("interceptor", trio.lowlevel.current_task()))
            yield chunk

    class NotingEvents(list[FlowEvent]):
        def append(self, event: FlowEvent) -> None:
            ran_in.append((type(event).__name__, trio.lowlevel.current_task()))
            super().append(event)

    with loopback_flows(1) as (flow,):
        flow.events = NotingEvents()
        async with relayed(flow, chains={Direction.CLIENT_TO_SERVER: (noting,)}):
            with trio.fail_after(5):
                await write_all(flow.client, b"ping")
                assert await _recv(flow.server) == b"ping"
                await write_all(flow.server, b"pong")
                assert await _recv(flow.client) == b"pong"
                assert flow.ways is not None
                relays = {way.direction: relay_task(way) for way in flow.ways}
                flow.client.shutdown(socket.SHUT_WR)
                assert await read_to_eof(flow.server) == b""
                flow.server.shutdown(socket.SHUT_WR)
                assert await read_to_eof(flow.client) == b""
                await flow.done.wait()
    to_server, to_client = relays[Direction.CLIENT_TO_SERVER], relays[Direction.SERVER_TO_CLIENT]
    assert ran_in == [
        ("interceptor", to_server),
        ("HalfClosed", to_server),
        ("HalfClosed", to_client),
    ]


class StopOnceWoken(trio.abc.Instrument):
    """Stops a flow right after the task step that wakes ``task`` (the reactor's), before
    ``task`` has run again: the reset is decided while that task holds a wake-up it has not
    yet acted on."""

    def __init__(self, task: trio.lowlevel.Task, live: _LiveFlow) -> None:
        self.task = task
        self.live = live
        self.woken = False
        self.stopped = False  # by this instrument: the flow was not over yet

    def task_scheduled(self, task: trio.lowlevel.Task) -> None:
        if task is self.task:
            self.woken = True

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if self.woken and task is not self.task:
            self.woken = False
            self.live.stop(Stop.RESET_REQUESTED)
            self.stopped = self.live.ending.stopped is Stop.RESET_REQUESTED


async def identity(
    flow: Flow, direction: Direction, chunks: AsyncIterator[bytes]
) -> AsyncIterator[bytes]:
    async for chunk in chunks:
        yield chunk


@pytest.mark.parametrize(
    ("intercepted", "last"),
    [(False, "fin"), (True, "fin"), (True, "bytes")],
    ids=["plain-fin", "intercepted-fin", "intercepted-bytes"],
)
async def test_a_direction_woken_before_the_reset_decision_moves_nothing_after_it(
    intercepted: bool, last: str
) -> None:
    # The reactor sees the client's FIN (or bytes) and wakes the direction's task; before that
    # task runs, the flow is stopped. The task must not act on what it was woken for: the
    # server sees the reset alone, no FIN and no byte before it.
    chains: dict[Direction, Sequence[Interceptor]] = (
        {Direction.CLIENT_TO_SERVER: (identity,)} if intercepted else {}
    )
    with loopback_flows(1) as (flow,):
        async with relayed(flow, chains=chains):
            with trio.fail_after(5):
                await write_all(flow.client, b"x")
                assert await _recv(flow.server) == b"x"
                await trio.testing.wait_all_tasks_blocked()
                assert flow.ways is not None
                assert flow.live is not None
                stopper = StopOnceWoken(relay_task(flow.ways[0]), flow.live)
                trio.lowlevel.add_instrument(stopper)
                try:
                    if last == "fin":
                        flow.client.shutdown(socket.SHUT_WR)
                    else:
                        await write_all(flow.client, b"too late")
                    assert await _what_arrives(flow.server) == (b"", "reset")
                finally:
                    trio.lowlevel.remove_instrument(stopper)
                await flow.done.wait()
    assert stopper.stopped
    assert flow.ending.reason == "reset_requested"
    assert not flow.events  # no HalfClosed


async def test_a_slow_reader_gets_every_byte_the_relay_held_for_it() -> None:
    # The sink's buffers are small and its reader slow, so the relay holds bytes (a backlog
    # or a pipe) and waits for the sink over and over.
    size = 4 << 20
    with loopback_flows(1) as (flow,):
        flow.server_inner.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
        flow.server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        async with relayed(flow):
            with trio.fail_after(30):
                async with trio.open_nursery() as nursery:

                    async def send() -> None:
                        await write_all(flow.client, pattern(size))
                        flow.client.shutdown(socket.SHUT_WR)

                    nursery.start_soon(send)
                    received = bytearray()
                    while len(received) < size:
                        await trio.sleep(0.001)  # a reader slower than the writer
                        try:
                            received += flow.server.recv(65536)
                        except BlockingIOError:
                            pass
                assert bytes(received) == pattern(size)


async def test_an_interceptor_that_fails_resets_its_flow_and_says_why() -> None:
    async def explode(
        flow: Flow, direction: Direction, chunks: AsyncIterator[bytes]
    ) -> AsyncIterator[bytes]:
        async for chunk in chunks:
            if chunk:
                raise ValueError("no")
            yield chunk

    with loopback_flows(1) as (flow,):
        async with relayed(flow, chains={Direction.CLIENT_TO_SERVER: (explode,)}):
            with trio.fail_after(5):
                await write_all(flow.client, b"x")
                with pytest.raises(ConnectionResetError):
                    await read_to_eof(flow.server)
                await flow.done.wait()
    assert flow.ending.reason == "interceptor_failed"
    assert [type(event) for event in flow.events] == [InterceptorFailed]


async def _what_arrives(sock: socket.socket) -> tuple[bytes, str]:
    """What ``sock`` reads until its peer's FIN (``"fin"``) or reset (``"reset"``)."""
    received = bytearray()
    try:
        while chunk := await _recv(sock):
            received += chunk
    except ConnectionResetError:
        return bytes(received), "reset"
    return bytes(received), "fin"


async def _recv(sock: socket.socket) -> bytes:
    while True:
        try:
            return sock.recv(65536)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)
