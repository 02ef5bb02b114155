"""A flow's relay over loopback TCP, built from the proxy's own pieces: no root, no lab.

The proxy's part that is not here is accepting and connecting out transparently; from the
moment both sockets are connected, ``relayed`` runs exactly what the proxy runs: a reactor, a
nursery whose cancel scope tears the flow down, one ``relay_direction`` task per direction,
then ``close_flow``. Loopback TCP gives the real FIN, RST and splice paths.
"""

from __future__ import annotations

import gc
import heapq
import socket
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import ExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Self

import trio

from uproxy_trio import Direction, Flow, FlowEvent, Interceptor
from uproxy_trio._direction import SharedBuffers, Way, both_ways
from uproxy_trio._ending import FlowEnding
from uproxy_trio._live import changed
from uproxy_trio._proxy import (
    DEFAULT_CONNECT_TIMEOUT_S,
    _LiveFlow,
    _Plan,
    close_flow,
    relay_direction,
)
from uproxy_trio._readiness import READABLE, WRITABLE, Reactor, Readiness, Side, bit
from uproxy_trio._splice import SPLICE_AVAILABLE, PipePool

FLOW = Flow(1, client=("127.0.0.1", 1), server=("127.0.0.1", 2))
_CLIENT_READY = bit(Side.CLIENT, READABLE) | bit(Side.CLIENT, WRITABLE)


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Two ends of one loopback TCP connection, both non-blocking."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        outer = socket.create_connection(listener.getsockname())
        inner, _ = listener.accept()
    for sock in (outer, inner):
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return outer, inner


@dataclass
class LoopbackFlow:
    """The test holds ``client`` and ``server``; the relay holds the two inner ends."""

    client: socket.socket
    client_inner: socket.socket
    server_inner: socket.socket
    server: socket.socket
    readiness: Readiness = field(default_factory=lambda: Readiness(_CLIENT_READY))
    ending: FlowEnding = field(default_factory=FlowEnding)
    events: list[FlowEvent] = field(default_factory=list)
    ways: tuple[Way, Way] | None = None
    live: _LiveFlow | None = None
    """The flow as ``Proxy`` holds it while it relays (``stop`` it as the sweep would)."""
    done: trio.Event = field(default_factory=trio.Event)

    def changed(self) -> None:
        """Tell both directions their live interceptors changed, as ``Proxy`` does."""
        assert self.ways is not None
        for way in self.ways:
            changed(way)

    @property
    def written(self) -> tuple[int, int]:
        assert self.ways is not None
        return (self.ways[0].written, self.ways[1].written)


@contextmanager
def loopback_flows(count: int) -> Iterator[list[LoopbackFlow]]:
    with ExitStack() as stack:
        flows = []
        for _ in range(count):
            client, client_inner = tcp_pair()
            server_inner, server = tcp_pair()
            for sock in (client, client_inner, server_inner, server):
                stack.enter_context(sock)
            flows.append(LoopbackFlow(client, client_inner, server_inner, server))
        yield flows


async def relay_one(
    reactor: Reactor,
    shared: SharedBuffers,
    flow: LoopbackFlow,
    chains: dict[Direction, Sequence[Interceptor]],
    live_chains: Mapping[str | None, Sequence[Interceptor]],
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """What ``Proxy._run_flow`` does once the flow is connected."""
    readiness = flow.readiness
    with (
        reactor.watch(flow.client_inner, readiness, Side.CLIENT),
        reactor.watch(flow.server_inner, readiness, Side.SERVER),
    ):
        try:
            async with trio.open_nursery() as nursery:
                plan = _Plan(None, (), DEFAULT_CONNECT_TIMEOUT_S, None)  # its chains: below
                live = flow.live = _LiveFlow(FLOW, 0.0, nursery, flow.ending, plan)
                flow.ways = live.ways = both_ways(
                    flow.client_inner, flow.server_inner, readiness, shared
                )
                for way in live.ways:
                    nursery.start_soon(
                        relay_direction,
                        FLOW,
                        way,
                        live,
                        chains.get(way.direction, ()),
                        flow.events.append,
                        live_chains,
                    )
                task_status.started()
        finally:
            close_flow(flow.ending, flow.client_inner, flow.server_inner)
            flow.done.set()


@asynccontextmanager
async def relayed(
    *flows: LoopbackFlow,
    chains: dict[Direction, Sequence[Interceptor]] | None = None,
    live_chains: Mapping[str | None, Sequence[Interceptor]] | None = None,
) -> AsyncIterator[Reactor]:
    """Relay each flow as the proxy would, with a running reactor, for the block's length.

    ``live_chains`` is read as ``Proxy`` reads its live interceptors (the flows here take no
    route: key ``None``); after changing it, call ``LoopbackFlow.changed``.
    """
    pipes = PipePool() if SPLICE_AVAILABLE else None
    shared = SharedBuffers(pipes)
    try:
        with Reactor() as reactor:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(reactor.run)
                async with trio.open_nursery() as relays:
                    for flow in flows:
                        await relays.start(
                            relay_one,
                            reactor,
                            shared,
                            flow,
                            chains or {},
                            {} if live_chains is None else live_chains,
                        )
                    yield reactor
                    relays.cancel_scope.cancel()
                nursery.cancel_scope.cancel()
    finally:
        if pipes is not None:
            pipes.close()


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


async def write_all(sock: socket.socket, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view) :]
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)


def pattern(size: int, seed: int = 0) -> bytes:
    """Bytes that reveal a lost, repeated or reordered slice."""
    block = bytes((seed + i * 7) % 251 for i in range(251))
    return (block * (size // 251 + 1))[:size]


def all_tasks() -> Iterator[trio.lowlevel.Task]:
    """Every task of this run, parents before their children."""
    stack = [trio.lowlevel.current_root_task()]
    while stack:
        task = stack.pop()
        if task is None:
            continue
        yield task
        stack.extend(child for nursery in task.child_nurseries for child in nursery.child_tasks)


def relay_task(way: Way) -> trio.lowlevel.Task:
    """The ``relay_direction`` task that moves ``way``."""
    for task in all_tasks():
        coro = task.coro
        if getattr(coro, "cr_code", None) is relay_direction.__code__:
            frame = getattr(coro, "cr_frame", None)
            if frame is not None and frame.f_locals.get("way") is way:
                return task
    raise LookupError(f"no relay task for {way.direction}")


class LongestStep(trio.abc.Instrument):
    """The longest task steps: how long the loop went without running anyone else.

    Counted in this thread's CPU time, so that other processes on a busy host (the load
    generators, other test runs) do not count as the loop's stall; and with the garbage
    collector off while it is installed, since a collection in the test process walks all of
    pytest's heap (``uproxy serve`` freezes its start-up objects out of the collector's way).
    Even so a single step can be stretched by the host (network softirq work the kernel
    charges to whichever thread is running), so tests that count on many steps look at the
    ``nth_longest`` few rather than at one outlier: a loop that really stalls does so again
    and again.
    """

    KEPT = 3

    def __init__(self) -> None:
        self._top: list[float] = []  # a min-heap of the KEPT longest steps
        self._started = 0.0

    @property
    def longest(self) -> float:
        return self.nth_longest(1)

    def nth_longest(self, n: int) -> float:
        assert 1 <= n <= self.KEPT
        top = sorted(self._top, reverse=True)
        return top[n - 1] if len(top) >= n else 0.0

    def __enter__(self) -> Self:
        gc.disable()
        trio.lowlevel.add_instrument(self)
        return self

    def __exit__(self, *exc_info: object) -> None:
        trio.lowlevel.remove_instrument(self)
        gc.enable()

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._started = time.thread_time()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if self._started:  # (the step that added this instrument had no start)
            took = time.thread_time() - self._started
            if len(self._top) < self.KEPT:
                heapq.heappush(self._top, took)
            elif took > self._top[0]:
                heapq.heapreplace(self._top, took)
