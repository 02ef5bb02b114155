"""Live interceptors: taken on and let go by flows in flight, at a chunk boundary, without
losing or reordering a byte (issue 12: toxics apply to flows already open)."""

from __future__ import annotations

import random
import socket
from collections.abc import AsyncIterator, Sequence

import pytest
import trio
import trio.testing
from relay_tools import loopback_flows, pattern, relayed, write_all

from uproxy_trio import Direction, Flow, Interceptor, ResetFlow, for_flows, in_own_task
from uproxy_trio._ending import EndKind


class Counting:
    """An identity interceptor that counts what it sees and how often it was started."""

    def __init__(self) -> None:
        self.bytes = 0
        self.starts = 0
        self.starts_up = 0

    async def __call__(
        self, flow: Flow, direction: Direction, chunks: AsyncIterator[bytes]
    ) -> AsyncIterator[bytes]:
        self.starts += 1
        self.starts_up += direction is Direction.CLIENT_TO_SERVER
        async for chunk in chunks:
            self.bytes += len(chunk)
            yield chunk


async def tag(
    flow: Flow, direction: Direction, chunks: AsyncIterator[bytes]
) -> AsyncIterator[bytes]:
    async for chunk in chunks:
        yield chunk.upper()


class HoldEverything:
    """Holds what it reads until its chunks end: taken away, it must flush. ``holding`` is
    set once it holds a byte."""

    def __init__(self) -> None:
        self.holding = trio.Event()

    async def __call__(
        self, flow: Flow, direction: Direction, chunks: AsyncIterator[bytes]
    ) -> AsyncIterator[bytes]:
        held = b""
        async for chunk in chunks:
            held += chunk
            self.holding.set()
        yield held


async def recv_some(sock: socket.socket, size: int) -> bytes:
    received = b""
    while len(received) < size:
        try:
            chunk = sock.recv(size - len(received))
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)
            continue
        assert chunk, "EOF too early"
        received += chunk
    return received


async def test_a_thousand_moves_on_and_off_the_interceptor_path_mid_stream() -> None:
    # Both ways at once, bulk (spliced when plain) and every byte checked, while the live
    # chain changes a thousand times under the flow; the streams go on until it is done.
    blocks = {"up": pattern(251 * 1024, 1), "down": pattern(251 * 1024, 2)}
    counting = Counting()
    live: dict[str | None, tuple[Interceptor, ...]] = {}
    rng = random.Random(12)
    sent = dict.fromkeys(blocks, 0)
    received: dict[str, bytes] = {}
    switching = True
    with loopback_flows(1) as (flow,), trio.fail_after(120):
        # Small buffers at the receiving ends: the sinks fill often, so a change often finds
        # the plain path holding bytes.
        for sock in (flow.client, flow.server):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
        for sock in (flow.client_inner, flow.server_inner):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 16)
        async with relayed(flow, live_chains=live), trio.open_nursery() as nursery:

            async def send(name: str, sending: socket.socket) -> None:
                while switching:
                    await write_all(sending, blocks[name])
                    sent[name] += 1
                sending.shutdown(socket.SHUT_WR)

            async def drain(name: str, receiving: socket.socket) -> None:
                # A reader that stops now and then, so that the sink fills and the plain
                # path holds bytes (in its pipe, or its backlog) when a change comes.
                got = bytearray()
                while True:
                    try:
                        chunk = receiving.recv(1 << 18)
                    except BlockingIOError:
                        await trio.lowlevel.wait_readable(receiving)
                        continue
                    if not chunk:
                        break
                    got += chunk
                    if rng.random() < 0.3:
                        await trio.sleep(0.001)
                received[name] = bytes(got)

            nursery.start_soon(send, "up", flow.client)
            nursery.start_soon(send, "down", flow.server)
            nursery.start_soon(drain, "up", flow.server)
            nursery.start_soon(drain, "down", flow.client)
            for _ in range(1000):
                if live:
                    live.clear()
                else:
                    live[None] = (counting,)
                flow.changed()
                await trio.sleep(rng.choice((0, 0, 0.0005, 0.001)))
            switching = False
    total = 0
    for name, block in blocks.items():
        assert sent[name] > 10
        assert received[name] == block * sent[name], f"{name}: bytes lost or reordered"
        total += len(received[name])
    # Both paths carried bytes: the interceptor saw some, not all.
    assert 0 < counting.bytes < total
    assert counting.starts > 10


async def test_a_live_interceptor_reaches_an_open_flow_and_leaves_it() -> None:
    live: dict[str | None, tuple[Interceptor, ...]] = {}
    with loopback_flows(1) as (flow,), trio.fail_after(10):
        async with relayed(flow, live_chains=live):
            await write_all(flow.client, b"before")
            assert await recv_some(flow.server, 6) == b"before"
            live[None] = (tag,)
            flow.changed()
            await write_all(flow.client, b"during")
            assert await recv_some(flow.server, 6) == b"DURING"
            await write_all(flow.server, b"back")
            assert await recv_some(flow.client, 4) == b"BACK"
            live.clear()
            flow.changed()
            await write_all(flow.client, b"after")
            assert await recv_some(flow.server, 5) == b"after"


async def test_a_live_interceptor_taken_away_flushes_what_it_holds_in_order() -> None:
    hold_everything = HoldEverything()
    live: dict[str | None, tuple[Interceptor, ...]] = {None: (hold_everything,)}
    with loopback_flows(1) as (flow,), trio.fail_after(10):
        async with relayed(flow, live_chains=live):
            flow.changed()
            await write_all(flow.client, b"held ")
            await hold_everything.holding.wait()
            live.clear()
            flow.changed()
            await write_all(flow.client, b"then live")
            assert await recv_some(flow.server, 14) == b"held then live"


async def test_a_running_live_interceptor_keeps_its_state_when_others_come_and_go() -> None:
    first, second = Counting(), Counting()
    live: dict[str | None, tuple[Interceptor, ...]] = {None: (first,)}
    with loopback_flows(1) as (flow,), trio.fail_after(10):
        async with relayed(flow, live_chains=live):
            flow.changed()
            await write_all(flow.client, b"one")
            assert await recv_some(flow.server, 3) == b"one"
            for _ in range(5):
                live[None] = (first, second)
                flow.changed()
                await write_all(flow.client, b"two")
                assert await recv_some(flow.server, 3) == b"two"
                live[None] = (first,)
                flow.changed()
                await write_all(flow.client, b"one")
                assert await recv_some(flow.server, 3) == b"one"
    # Started once, and never again as the other came and went; a chunk sent just after a
    # change goes the new way.
    assert (first.starts_up, second.starts_up) == (1, 5)
    assert first.bytes == 3 + 5 * 6
    assert second.bytes == 5 * 3


@in_own_task
async def reset_after_a_while(
    flow: Flow, direction: Direction, chunks: AsyncIterator[bytes]
) -> AsyncIterator[bytes]:
    with trio.move_on_after(0.3):
        async for chunk in chunks:
            yield chunk
        return
    raise ConnectionAbortedError("the timer fired")


async def test_a_live_interceptor_with_a_timer_taken_away_in_time_does_nothing() -> None:
    live: dict[str | None, tuple[Interceptor, ...]] = {None: (reset_after_a_while,)}
    with loopback_flows(1) as (flow,), trio.fail_after(10):
        async with relayed(flow, live_chains=live):
            flow.changed()
            await write_all(flow.client, b"x")
            assert await recv_some(flow.server, 1) == b"x"
            live.clear()
            flow.changed()
            await trio.sleep(0.5)  # past its timer
            await write_all(flow.client, b"still here")
            assert await recv_some(flow.server, 10) == b"still here"
    assert not flow.ending.ends


async def test_for_flows_on_a_live_interceptor_is_asked_once_per_flow_and_direction() -> None:
    asked: list[int] = []

    def once(flow: Flow) -> bool:
        asked.append(flow.id)
        return False

    picky = for_flows(once)(Counting())
    live: dict[str | None, tuple[Interceptor, ...]] = {None: (picky,)}
    with loopback_flows(1) as (flow,), trio.fail_after(10):
        async with relayed(flow, live_chains=live):
            for _ in range(5):
                flow.changed()
                await write_all(flow.client, b"x")
                assert await recv_some(flow.server, 1) == b"x"
    assert len(asked) == 2


async def reset_on_x(
    flow: Flow, direction: Direction, chunks: AsyncIterator[bytes]
) -> AsyncIterator[bytes]:
    async for chunk in chunks:
        if b"x" in chunk:
            raise ResetFlow
        yield chunk


async def fail_on_x(
    flow: Flow, direction: Direction, chunks: AsyncIterator[bytes]
) -> AsyncIterator[bytes]:
    async for chunk in chunks:
        if b"x" in chunk:
            raise ValueError("x marks the spot")
        yield chunk


@pytest.mark.parametrize(
    ("interceptor", "kind"),
    [(reset_on_x, EndKind.INTERCEPTOR_RESET), (fail_on_x, EndKind.INTERCEPTOR_FAILED)],
)
async def test_a_live_interceptor_ends_its_flow_as_a_static_one_would(
    interceptor: Interceptor, kind: EndKind
) -> None:
    live: dict[str | None, tuple[Interceptor, ...]] = {None: (interceptor,)}
    with loopback_flows(1) as (flow,), trio.fail_after(10):
        async with relayed(flow, live_chains=live):
            flow.changed()
            await write_all(flow.client, b"fine")
            assert await recv_some(flow.server, 4) == b"fine"
            await write_all(flow.client, b"x")
            await flow.done.wait()
    (end,) = flow.ending.ends
    assert end.kind is kind
    if kind is EndKind.INTERCEPTOR_FAILED:
        # The interceptor's own exception, not the task group around the live stage.
        assert isinstance(end.error, ValueError)


async def exclaim(
    flow: Flow, direction: Direction, chunks: AsyncIterator[bytes]
) -> AsyncIterator[bytes]:
    async for chunk in chunks:
        yield chunk + b"!"


async def test_live_interceptors_join_a_routes_own_on_a_flow_waiting_for_bytes() -> None:
    # The route's own interceptor reads the source directly while nothing is live; a change
    # must interrupt that wait, so the next chunk goes the new way.
    live: dict[str | None, tuple[Interceptor, ...]] = {}
    own: dict[Direction, Sequence[Interceptor]] = {Direction.CLIENT_TO_SERVER: [exclaim]}
    with loopback_flows(1) as (flow,), trio.fail_after(10):
        async with relayed(flow, chains=own, live_chains=live):
            await write_all(flow.client, b"a")
            assert await recv_some(flow.server, 2) == b"a!"
            await trio.testing.wait_all_tasks_blocked()  # waiting for bytes, on the route's path
            live[None] = (tag,)
            flow.changed()
            await write_all(flow.client, b"b")
            assert await recv_some(flow.server, 2) == b"B!"
            live.clear()
            flow.changed()
            await write_all(flow.client, b"c")
            assert await recv_some(flow.server, 2) == b"c!"
