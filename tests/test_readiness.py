"""The reactor and a flow's readiness: who is woken by an edge, who may wait, and how the
reactor shares its time between pumps."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, asynccontextmanager, contextmanager

import pytest
import trio
import trio.lowlevel
import trio.testing
from lab_tools import eventually
from relay_tools import LongestStep, read_to_eof, tcp_pair, write_all

from uproxy_trio import Direction
from uproxy_trio._direction import SharedBuffers, Way
from uproxy_trio._readiness import (
    PEER_CLOSED,
    READABLE,
    WRITABLE,
    Reactor,
    Readiness,
    Side,
    Turn,
    bit,
)

CLIENT_READABLE = bit(Side.CLIENT, READABLE)


@contextmanager
def pairs(count: int) -> Iterator[list[tuple[socket.socket, socket.socket]]]:
    with ExitStack() as stack:
        made = [tcp_pair() for _ in range(count)]
        for pair in made:
            for sock in pair:
                stack.enter_context(sock)
        yield made


@asynccontextmanager
async def reactor_running() -> AsyncIterator[Reactor]:
    with Reactor() as reactor:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reactor.run)
            yield reactor
            nursery.cancel_scope.cancel()


async def test_an_edge_wakes_the_task_waiting_for_it() -> None:
    with pairs(1) as [(outer, inner)]:
        readiness = Readiness()
        async with reactor_running() as reactor:
            with reactor.watch(inner, readiness, Side.CLIENT), trio.fail_after(5):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(readiness.wait, CLIENT_READABLE)
                    await trio.testing.wait_all_tasks_blocked()
                    assert not readiness.bits & CLIENT_READABLE
                    outer.send(b"x")
        assert readiness.bits & CLIENT_READABLE


async def test_a_second_waiter_on_the_same_bits_is_refused() -> None:
    readiness = Readiness()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(readiness.wait, CLIENT_READABLE | bit(Side.SERVER, WRITABLE))
        await trio.testing.wait_all_tasks_blocked()
        # Refused at once: a second waiter let in would park here for good.
        with trio.fail_after(5), pytest.raises(trio.BusyResourceError):
            await readiness.wait(CLIENT_READABLE)
        # Other bits of the same flow are another task's to wait on.
        with trio.move_on_after(0.01):
            await readiness.wait(bit(Side.SERVER, READABLE))
        nursery.cancel_scope.cancel()


async def test_a_cancelled_pump_is_detached_at_once_and_moves_nothing_more() -> None:
    with pairs(2) as [(client, client_inner), (server_inner, server)]:
        readiness = Readiness()
        way = Way(
            Direction.CLIENT_TO_SERVER, client_inner, server_inner, readiness, SharedBuffers(None)
        )
        async with reactor_running() as reactor:
            with (
                reactor.watch(client_inner, readiness, Side.CLIENT),
                reactor.watch(server_inner, readiness, Side.SERVER),
                trio.fail_after(5),
            ):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(readiness.pump, way)
                    await write_all(client, b"before")
                    await eventually(lambda: way.written == 6)
                    nursery.cancel_scope.cancel()
                await write_all(client, b"after")
                client.shutdown(socket.SHUT_WR)
                # The reactor has had the edges for "after" and the FIN (the FIN's came last).
                await readiness.wait(bit(Side.CLIENT, PEER_CLOSED))
                assert (way.read, way.written, way.end) == (6, 6, None)
                server_inner.close()
                assert await read_to_eof(server) == b"before"


class RecordingPump:
    """Notes which task turned it; waits for its source's next edge after each turn."""

    mask = CLIENT_READABLE

    def __init__(self, readiness: Readiness) -> None:
        self.readiness = readiness
        self.turned_in: list[trio.lowlevel.Task] = []
        self.turned = trio.Event()

    def turn(self) -> Turn:
        self.turned_in.append(trio.lowlevel.current_task())
        self.turned.set()
        self.readiness.clear(CLIENT_READABLE)
        return Turn.STUCK

    def detached(self) -> None:
        pass


async def test_a_kick_runs_the_pump_in_the_reactors_next_round_waking_it() -> None:
    """News from elsewhere than the flow's sockets (a datagram the UDP listener hands over)
    is an edge like any other: the pump runs in the reactor's task, never the caller's,
    and a reactor asleep on its epoll wakes for it."""
    readiness = Readiness()
    pump = RecordingPump(readiness)
    async with reactor_running() as reactor, trio.open_nursery() as nursery:
        nursery.start_soon(readiness.pump, pump)
        await trio.testing.wait_all_tasks_blocked()  # parked, and the reactor asleep
        [pump_task] = pump.turned_in  # its first turn is its own task's
        for _ in range(3):
            turns, pump.turned = len(pump.turned_in), trio.Event()
            reactor.kick(readiness, CLIENT_READABLE)
            assert len(pump.turned_in) == turns, "not in the caller's task"
            with trio.fail_after(5):  # a reactor left asleep would never turn it
                await pump.turned.wait()
            turned_in = pump.turned_in[-1]
            assert turned_in not in (pump_task, trio.lowlevel.current_task())
            assert turned_in.name.endswith("Reactor.run"), turned_in.name
            await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()


class BusyPump:
    """Always has more to move, and takes ``turn_s`` of CPU per turn."""

    mask = CLIENT_READABLE

    def __init__(self, turn_s: float, turns: int) -> None:
        self.turn_s = turn_s
        self.left = turns
        self.turns = 0

    def turn(self) -> Turn:
        end = time.thread_time() + self.turn_s
        while time.thread_time() < end:
            pass
        self.turns += 1
        self.left -= 1
        return Turn.DONE if self.left <= 0 else Turn.MORE

    def detached(self) -> None:
        pass


async def test_a_reactor_round_is_bounded_and_a_fresh_edge_goes_first() -> None:
    # 40 pumps that always have more, each turn costing 1 ms, would hold the loop for 40 ms
    # per round if a round ran them all; a pump woken by a fresh edge must not wait for them.
    busy_count, turn_s = 40, 0.001
    with pairs(busy_count + 1) as made:
        readinesses = [Readiness() for _ in made]
        busy = [BusyPump(turn_s, turns=10_000) for _ in range(busy_count)]
        fresh = BusyPump(0, turns=1)
        with LongestStep() as steps:
            async with reactor_running() as reactor, trio.open_nursery() as nursery:
                with ExitStack() as watching:
                    for (_, inner), readiness in zip(made, readinesses, strict=True):
                        watching.enter_context(reactor.watch(inner, readiness, Side.CLIENT))
                    for readiness, pump in zip(readinesses, busy, strict=False):
                        await nursery.start(_pump_after_first_turn, readiness, pump)
                    for outer, _ in made[:busy_count]:
                        outer.send(b"x")  # each busy pump's first edge
                    # Every busy pump has had a turn: all of them are in the reactor's queue.
                    await eventually(lambda: all(pump.turns for pump in busy))
                    with trio.fail_after(5):
                        await nursery.start(_pump_after_first_turn, readinesses[-1], fresh)
                        before = sum(pump.turns for pump in busy)
                        made[-1][0].send(b"x")
                        while not fresh.turns:
                            await trio.lowlevel.checkpoint()
                    # Served within about one round, not after every busy pump's next turn.
                    assert sum(pump.turns for pump in busy) - before < busy_count
                    assert all(pump.left for pump in busy), "the busy pumps were still busy"
                    nursery.cancel_scope.cancel()
    # A round stops once ROUND_S (1 ms) has passed, a turn over: well under 20 ms.
    assert steps.longest < 0.02


async def _pump_after_first_turn(
    readiness: Readiness, pump: BusyPump, task_status: trio.TaskStatus[None]
) -> None:
    """Hand ``pump`` to the reactor before its first edge (its first turn is the reactor's);
    started once its task is parked."""
    real_turn = pump.turn
    first = True

    def turn() -> Turn:
        nonlocal first
        if first:
            first = False
            task_status.started()  # the task parks right after this turn, with no await
            return Turn.STUCK
        return real_turn()

    pump.turn = turn  # type: ignore[method-assign]
    await readiness.pump(pump)


def test_the_package_imports_where_there_is_no_epoll() -> None:
    # Serving needs Linux, but writing and unit-testing an interceptor should not.
    code = (
        "import select\n"
        "for name in [n for n in dir(select) if n.startswith('EPOLL')] + ['epoll']:\n"
        "    delattr(select, name)\n"
        "import uproxy_trio, uproxy_trio.interceptors\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")
