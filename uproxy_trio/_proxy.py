"""The data path, top to bottom: accept → connect out → two relay directions → close.

Each accepted connection gets one task. Its sockets are registered once with the proxy's
``Reactor`` (an edge-triggered epoll), which tells the flow's ``Readiness`` when either can be
read or written. A flow that no interceptor touches then relays both directions from that one
task (``Relay``: recv/send for small reads, splice(2) for bulk); a flow with interceptors runs
each direction's chain in a task of its own. When a direction ends, the flow's ``FlowEnding``
decides whether the other goes on (half-close) or the whole flow is reset.

Sockets are plain non-blocking sockets: a read or write is tried at once and the task only
waits when the kernel says it would block, so a request and its response cost the relay four
system calls and no trip through the scheduler.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import socket
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, ExitStack
from dataclasses import dataclass, field

import trio

from ._address import Address, format_address, from_sockaddr
from ._ending import DirectionEnd, EndKind, FlowEnding
from ._events import (
    EventSink,
    FlowClosed,
    FlowEvent,
    FlowOpened,
    FlowRefused,
    HalfClosed,
    InterceptorFailed,
    UpstreamConnected,
    UpstreamFailed,
    log_event,
)
from ._flow import Direction, Flow
from ._interceptor import Interceptor, build_chain, chain_for
from ._readiness import READABLE, WRITABLE, Reactor, Readiness, Side, bit
from ._relay import FAIRNESS_ROUNDS, Counts, Relay, Way
from ._splice import SPLICE_AVAILABLE, PipePool
from ._transparent import (
    ConnectFailed,
    connect_out,
    is_own_listener,
    open_outgoing,
    open_transparent_listener,
    reset,
)

# Errors accept(2) returns when the host is short of descriptors or memory: back off and
# retry, since the flows in flight will give some back.
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
ACCEPT_RETRY_S = 0.1
# Connections taken per wake-up of an accept loop before it yields to the flows.
ACCEPT_BATCH = 64

# Interceptors get chunks of up to this much: large reads, fewer chunks, less overhead each.
INTERCEPT_READ_SIZE = 262144

# A fresh client socket can take bytes, and has most likely sent its first ones already.
_CLIENT_READY = bit(Side.CLIENT, READABLE) | bit(Side.CLIENT, WRITABLE)

DEFAULT_CONNECT_TIMEOUT_S = 10.0

LOGGER = logging.getLogger("uproxy_trio")


@dataclass(slots=True)
class _LiveFlow:
    """A flow in flight, as the metrics and the idle sweep see it."""

    counts: dict[Direction, Counts]
    ending: FlowEnding
    scope: trio.CancelScope

    def bytes_read(self) -> int:
        return sum(count.read for count in self.counts.values())


class Proxy:
    """A transparent proxy: its options, its listeners, and the flows it has in flight.

    ``serve`` runs it; ``drain`` stops it gently (no new flows, a grace period for the ones in
    flight, then a reset for the rest). A ``Proxy`` serves once.
    """

    def __init__(
        self,
        *,
        interceptors: Sequence[Interceptor] = (),
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
        idle_timeout: float | None = None,
        max_flows: int | None = None,
        reuse_port: bool = False,
        on_event: EventSink = log_event,
    ) -> None:
        if max_flows is not None and max_flows < 1:
            raise ValueError("max_flows must be at least 1")
        # Each direction's chain is the same for every flow: worked out once, here.
        self._chains = {direction: chain_for(interceptors, direction) for direction in Direction}
        self._intercepted = any(self._chains.values())
        self._connect_timeout = connect_timeout
        self._idle_timeout = idle_timeout
        self._reuse_port = reuse_port
        self._slots = trio.Semaphore(max_flows) if max_flows is not None else None
        self._emit = _safe_sink(on_event)
        self._flow_ids = itertools.count(1)
        self._listening: list[Address] = []
        self._accepting = trio.CancelScope()
        self._flows_scope: trio.CancelScope | None = None
        self._active = 0
        self._draining = False
        self._drained = trio.Event()
        self._started = False
        self._pipes = PipePool() if SPLICE_AVAILABLE else None
        self._relay = Relay(self._pipes)
        self._closed_bytes = dict.fromkeys(Direction, 0)
        self._live: dict[int, _LiveFlow] = {}

    @property
    def active_flows(self) -> int:
        return self._active

    def bytes_moved(self) -> dict[Direction, int]:
        """Bytes delivered so far each way, by every flow, the ones in flight included.

        Computed when asked (for a metrics scrape, say), so the data path pays nothing.
        """
        totals = dict(self._closed_bytes)
        for live in self._live.values():
            for direction, count in live.counts.items():
                totals[direction] += count.written
        return totals

    @property
    def addresses(self) -> list[Address]:
        """The bound listener addresses (empty until ``serve`` has started)."""
        return list(self._listening)

    async def serve(
        self,
        listen: Sequence[Address],
        *,
        task_status: trio.TaskStatus[list[Address]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on ``listen`` and relay flows until cancelled or drained.

        ``task_status.started`` receives the bound addresses once every listener is up, so
        ``await nursery.start(proxy.serve, ...)`` returns when the proxy is ready.
        """
        if self._started:
            raise RuntimeError("a Proxy serves once; make a new one")
        self._started = True
        try:
            with ExitStack() as listeners_open, Reactor() as reactor:
                # Held here so that a failure to bind the third listener closes the first two.
                listeners: list[socket.socket] = []
                for address in listen:
                    listener = open_transparent_listener(address, reuse_port=self._reuse_port)
                    listeners_open.callback(_close, listener)
                    listeners.append(listener)
                self._listening = [from_sockaddr(sock.getsockname()) for sock in listeners]
                for address in self._listening:
                    LOGGER.info("listening on %s", format_address(address))
                # The services outlive every flow, since the flows wait on the reactor.
                async with trio.open_nursery() as services:
                    services.start_soon(reactor.run)
                    if self._idle_timeout is not None:
                        services.start_soon(self._expire_idle, self._idle_timeout)
                    async with trio.open_nursery() as flows:
                        self._flows_scope = flows.cancel_scope
                        with self._accepting:
                            async with trio.open_nursery() as acceptors:
                                for listener in listeners:
                                    acceptors.start_soon(
                                        self._accept_loop, listener, reactor, flows
                                    )
                                task_status.started(self.addresses)
                        # Draining: close the listeners at once, so new flows are no longer
                        # taken (the kernel refuses them), while the flows in flight go on.
                        listeners_open.close()
                    services.cancel_scope.cancel()
        finally:
            if self._pipes is not None:
                self._pipes.close()

    async def drain(self, grace: float) -> int:
        """Stop taking flows, give those in flight ``grace`` seconds, then reset the rest.

        Returns how many flows had to be reset (0: everything finished by itself).
        """
        self._draining = True
        self._accepting.cancel()
        if self._active == 0:
            self._drained.set()
        with trio.move_on_after(grace):
            await self._drained.wait()
        remaining = self._active
        if remaining and self._flows_scope is not None:
            LOGGER.warning("grace period over: resetting %d flows", remaining)
            self._flows_scope.cancel()
        return remaining

    async def _accept_loop(
        self, listener: socket.socket, reactor: Reactor, flows: trio.Nursery
    ) -> None:
        while True:
            # Wait for a connection before taking a slot, so an idle listener never holds
            # capacity that a busy one needs; at the limit the kernel keeps the connections
            # in its backlog until a flow ends.
            await trio.lowlevel.wait_readable(listener)
            # Take every connection that is waiting, not one per wake-up: each wait costs
            # Trio two epoll_ctl calls.
            for _ in range(ACCEPT_BATCH):
                if self._slots is not None and not _try_acquire(self._slots):
                    await self._slots.acquire()
                try:
                    client_sock, client_address = listener.accept()
                    client_sock.setblocking(False)
                except BlockingIOError:
                    self._release_slot()  # none left (or another worker took it)
                    break
                except OSError as exc:
                    self._release_slot()
                    if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                        raise
                    LOGGER.error(
                        "accept failed: %s; retrying in %ss",
                        os.strerror(exc.errno),
                        ACCEPT_RETRY_S,
                    )
                    await trio.sleep(ACCEPT_RETRY_S)
                    break
                self._active += 1
                flows.start_soon(
                    self._run_flow, reactor, client_sock, client_address, next(self._flow_ids)
                )

    def _release_slot(self) -> None:
        if self._slots is not None:
            self._slots.release()

    async def _run_flow(
        self,
        reactor: Reactor,
        client_sock: socket.socket,
        client_address: tuple[object, ...],
        flow_id: int,
    ) -> None:
        try:
            readiness = Readiness(_CLIENT_READY)
            with client_sock, reactor.watch(client_sock, readiness, Side.CLIENT):
                await self._relay_flow(reactor, readiness, client_sock, client_address, flow_id)
        except Exception:
            # A bug in one flow must not take the others down with the nursery.
            LOGGER.exception("flow %d failed inside the proxy", flow_id)
        finally:
            self._active -= 1
            self._release_slot()
            if self._draining and self._active == 0:
                self._drained.set()

    async def _relay_flow(
        self,
        reactor: Reactor,
        readiness: Readiness,
        client_sock: socket.socket,
        client_address: tuple[object, ...],
        flow_id: int,
    ) -> None:
        emit = self._emit
        try:
            flow = Flow(
                flow_id,
                client=from_sockaddr(client_address),
                server=from_sockaddr(client_sock.getsockname()),
            )
        except OSError:
            reset(client_sock)
            return  # the client reset before we looked: nothing to relay, nobody to tell
        started = trio.current_time()
        emit(FlowOpened(flow))

        if is_own_listener(flow.server, self._listening):
            # Connecting out would reach our own listener, which would connect out again...
            reset(client_sock)
            emit(FlowRefused(flow, "self_loop"))
            emit(FlowClosed(flow, "refused_self_loop", None, 0, 0, _since(started)))
            return

        try:
            server_sock = open_outgoing(flow.client)
        except ConnectFailed as failure:
            self._upstream_failed(flow, client_sock, failure, started)
            return
        with server_sock, reactor.watch(server_sock, readiness, Side.SERVER):
            try:
                await connect_out(server_sock, flow.server, self._connect_timeout, readiness)
            except ConnectFailed as failure:
                self._upstream_failed(flow, client_sock, failure, started)
                return
            except BaseException:
                reset(client_sock)  # cancelled while connecting (the proxy is stopping): no FIN
                raise
            emit(UpstreamConnected(flow, _since(started)))

            ending = FlowEnding()
            counts = {direction: Counts() for direction in Direction}
            ways = (
                self._way(Direction.CLIENT_TO_SERVER, client_sock, server_sock, counts),
                self._way(Direction.SERVER_TO_CLIENT, server_sock, client_sock, counts),
            )
            live = self._live[flow.id] = _LiveFlow(counts, ending, trio.CancelScope())
            try:
                with live.scope:
                    if self._intercepted:
                        await self._relay_intercepted(flow, ways, readiness, ending)
                    else:
                        await self._relay.run(
                            ways, readiness, lambda way: self._direction_ended(flow, way, ending)
                        )
            finally:
                # Both directions are over (or the flow was cancelled): the only question left
                # is FIN or RST, and FlowEnding answers it.
                if not ending.clean:
                    reset(client_sock)
                    reset(server_sock)
                del self._live[flow.id]
                for direction, count in counts.items():
                    self._closed_bytes[direction] += count.written
                emit(
                    FlowClosed(
                        flow,
                        ending.reason,
                        ending.first_closed,
                        counts[Direction.CLIENT_TO_SERVER].written,
                        counts[Direction.SERVER_TO_CLIENT].written,
                        _since(started),
                    )
                )

    def _upstream_failed(
        self, flow: Flow, client_sock: socket.socket, failure: ConnectFailed, started: float
    ) -> None:
        # Without the proxy the client would have been refused (or given up): a reset is the
        # closest we can come now that its handshake with us has completed.
        reset(client_sock)
        self._emit(UpstreamFailed(flow, failure.reason))
        self._emit(FlowClosed(flow, f"upstream_{failure.reason}", None, 0, 0, _since(started)))

    def _way(
        self,
        direction: Direction,
        source: socket.socket,
        sink: socket.socket,
        counts: dict[Direction, Counts],
    ) -> Way:
        return Way(direction, source, sink, counts[direction], can_splice=self._relay.can_splice)

    def _direction_ended(
        self,
        flow: Flow,
        way: Way,
        ending: FlowEnding,
        error: BaseException | None = None,
    ) -> bool:
        """Pass a direction's EOF on as a FIN and tell the flow how the direction ended; true
        when the whole flow must now be reset."""
        kind = way.end
        assert kind is not None
        if kind is EndKind.EOF:
            try:
                way.sink.shutdown(socket.SHUT_WR)
            except OSError:
                kind = EndKind.SINK_RESET
        if kind is EndKind.EOF:
            self._emit(HalfClosed(flow, way.direction.source))
        elif kind is EndKind.INTERCEPTOR_FAILED and error is not None:
            self._emit(InterceptorFailed(flow, way.direction, error))
        return ending.record(DirectionEnd(way.direction, kind, error))

    async def _relay_intercepted(
        self, flow: Flow, ways: tuple[Way, Way], readiness: Readiness, ending: FlowEnding
    ) -> None:
        """Each direction in a task of its own, running its interceptor chain (an empty one for
        a direction that no interceptor wants)."""
        async with trio.open_nursery() as directions:
            for way in ways:
                directions.start_soon(
                    self._intercept_direction, flow, way, readiness, ending, directions.cancel_scope
                )

    async def _intercept_direction(
        self,
        flow: Flow,
        way: Way,
        readiness: Readiness,
        ending: FlowEnding,
        flow_scope: trio.CancelScope,
    ) -> None:
        chain = self._chains[way.direction]
        way.end, error = await _copy_intercepted(flow, way, readiness, chain)
        if self._direction_ended(flow, way, ending, error):
            flow_scope.cancel()

    async def _expire_idle(self, timeout: float) -> None:
        """End the flows that have not read a byte either way for ``timeout`` seconds.

        One sweep four times per timeout looks whether each flow's byte counts moved, rather
        than have every read note the time: an idle flow ends between ``timeout`` and 1.25
        times that after its last byte.
        """
        seen: dict[int, tuple[int, float]] = {}
        while True:
            await trio.sleep(timeout / 4)
            now = trio.current_time()
            still: dict[int, tuple[int, float]] = {}
            for flow_id, live in self._live.items():
                read = live.bytes_read()
                last_read, since = seen.get(flow_id, (-1, now))
                if read != last_read:
                    still[flow_id] = (read, now)
                elif now - since >= timeout:
                    live.ending.expire()
                    live.scope.cancel()
                else:
                    still[flow_id] = (read, since)
            seen = still


async def serve(
    listen: Sequence[Address],
    *,
    interceptors: Sequence[Interceptor] = (),
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
    idle_timeout: float | None = None,
    max_flows: int | None = None,
    on_event: EventSink = log_event,
    task_status: trio.TaskStatus[list[Address]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a transparent proxy on ``listen`` until cancelled: ``Proxy(...).serve(listen)``.

    ``interceptors`` form an onion around every flow (the first sits closest to the client).
    """
    proxy = Proxy(
        interceptors=interceptors,
        connect_timeout=connect_timeout,
        idle_timeout=idle_timeout,
        max_flows=max_flows,
        on_event=on_event,
    )
    await proxy.serve(listen, task_status=task_status)


@dataclass(slots=True)
class _SourceReader:
    """A direction's source as an async iterator of chunks, remembering whether it was reset.

    The memory matters because an interceptor sits between this reader and the relay and may
    swallow the exception; the relay must still reset the flow rather than pass on a FIN.
    """

    way: Way
    readiness: Readiness
    reset_error: OSError | None = field(default=None)

    async def chunks(self) -> AsyncIterator[bytes]:
        way, readiness = self.way, self.readiness
        reads = 0
        while True:
            if not readiness.bits & way.readable:
                await readiness.wait(way.readable)
                reads = 0
            try:
                data = way.source.recv(INTERCEPT_READ_SIZE)
            except BlockingIOError:
                readiness.bits &= ~way.readable
                continue
            except OSError as exc:
                self.reset_error = exc
                raise
            if not data:
                return
            way.counts.read += len(data)
            if len(data) < INTERCEPT_READ_SIZE and not readiness.bits & way.closed:
                readiness.bits &= ~way.readable  # emptied it (see Relay._copy)
            reads += 1
            if reads >= FAIRNESS_ROUNDS:
                await trio.lowlevel.checkpoint()
                reads = 0
            yield data


async def _copy_intercepted(
    flow: Flow, way: Way, readiness: Readiness, chain: Sequence[Interceptor]
) -> tuple[EndKind, BaseException | None]:
    reader = _SourceReader(way, readiness)
    try:
        async with AsyncExitStack() as generators:
            chunks = await build_chain(generators, flow, way.direction, chain, reader.chunks())
            async for chunk in chunks:
                if chunk and not await _send_all(way, readiness, chunk):
                    return EndKind.SINK_RESET, None
    except Exception as exc:  # noqa: BLE001 - whatever an interceptor raises resets its flow only
        if reader.reset_error is not None:
            return EndKind.SOURCE_RESET, None
        return EndKind.INTERCEPTOR_FAILED, exc
    if reader.reset_error is not None:
        return EndKind.SOURCE_RESET, None
    return EndKind.EOF, None


async def _send_all(way: Way, readiness: Readiness, data: bytes) -> bool:
    """Write all of ``data``, waiting while the sink is full; false if the sink is gone."""
    view = memoryview(data)
    while view:
        try:
            sent = way.sink.send(view)
        except BlockingIOError:
            readiness.bits &= ~way.writable
            await readiness.wait(way.writable)
            continue
        except OSError:
            return False
        way.counts.written += sent
        view = view[sent:]
    return True


def _try_acquire(slots: trio.Semaphore) -> bool:
    try:
        slots.acquire_nowait()
    except trio.WouldBlock:
        return False
    return True


def _close(sock: socket.socket) -> None:
    trio.lowlevel.notify_closing(sock)
    sock.close()


def _safe_sink(on_event: EventSink) -> EventSink:
    """A faulty event sink must not break the flow it reports on."""

    def emit(event: FlowEvent) -> None:
        try:
            on_event(event)
        except Exception:  # logged; the flow goes on
            LOGGER.exception("event sink failed on %s", type(event).__name__)

    return emit


def _since(started: float) -> float:
    return trio.current_time() - started
