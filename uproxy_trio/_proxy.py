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
from ._readiness import READABLE, WRITABLE, Reactor, Readiness, Side, TimedOut, bit
from ._relay import FAIRNESS_ROUNDS, Relay, Way
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

# Interceptors get chunks of up to INTERCEPT_READ_SIZE: large reads, fewer chunks, less
# overhead each (512 KiB moved about 12% more than 256 KiB through an identity interceptor).
# A read starts at INTERCEPT_FIRST_READ and grows while reads fill it, so a small message
# does not pay for allocating half a megabyte.
INTERCEPT_FIRST_READ = 65536
INTERCEPT_READ_SIZE = 524288

# A fresh client socket can take bytes, and has most likely sent its first ones already.
_CLIENT_READY = bit(Side.CLIENT, READABLE) | bit(Side.CLIENT, WRITABLE)

DEFAULT_CONNECT_TIMEOUT_S = 10.0

LOGGER = logging.getLogger("uproxy_trio")


class _LiveFlow:
    """A flow in flight, as the metrics and the timeout sweep see it."""

    __slots__ = ("ending", "readiness", "scope", "started", "ways")

    def __init__(self, readiness: Readiness, started: float) -> None:
        self.readiness = readiness
        self.started = started
        self.ending = FlowEnding()
        self.ways: tuple[Way, Way] | None = None  # None while connecting
        self.scope: trio.CancelScope | None = None  # the interceptor tasks' scope, if any

    def bytes_read(self) -> int:
        return sum(way.counts.read for way in self.ways) if self.ways else 0

    def stop(self) -> None:
        """End the flow now, wherever it waits."""
        if self.scope is not None:
            self.scope.cancel()  # interceptors may catch exceptions: cancel their tasks
        else:
            self.readiness.time_out()


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
        if connect_timeout <= 0 or (idle_timeout is not None and idle_timeout <= 0):
            raise ValueError("connect_timeout and idle_timeout must be positive")
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
        # How often the sweep looks for flows out of time: a timeout fires up to a quarter late.
        self._sweep_period = min(connect_timeout, idle_timeout or connect_timeout) / 4

    @property
    def active_flows(self) -> int:
        return self._active

    def bytes_moved(self) -> dict[Direction, int]:
        """Bytes delivered so far each way, by every flow, the ones in flight included.

        Computed when asked (for a metrics scrape, say), so the data path pays nothing.
        """
        totals = dict(self._closed_bytes)
        for live in self._live.values():
            for way in live.ways or ():
                totals[way.direction] += way.counts.written
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
                    services.start_soon(self._sweep)
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

        live = self._live[flow.id] = _LiveFlow(readiness, started)
        try:
            await self._connect_and_relay(reactor, flow, client_sock, live)
        finally:
            del self._live[flow.id]

    async def _connect_and_relay(
        self, reactor: Reactor, flow: Flow, client_sock: socket.socket, live: _LiveFlow
    ) -> None:
        emit, readiness, started = self._emit, live.readiness, live.started
        try:
            server_sock = open_outgoing(flow.client, client_sock.family)
        except ConnectFailed as failure:
            self._upstream_failed(flow, client_sock, failure, started)
            return
        with server_sock, reactor.watch(server_sock, readiness, Side.SERVER):
            try:
                await connect_out(server_sock, flow.server, readiness)
            except ConnectFailed as failure:
                self._upstream_failed(flow, client_sock, failure, started)
                return
            except BaseException:
                reset(client_sock)  # cancelled while connecting (the proxy is stopping): no FIN
                emit(FlowClosed(flow, "cancelled", None, 0, 0, _since(started)))
                raise
            emit(UpstreamConnected(flow, _since(started)))

            ending = live.ending
            ways = live.ways = (
                Way(Direction.CLIENT_TO_SERVER, client_sock, server_sock, self._relay.can_splice),
                Way(Direction.SERVER_TO_CLIENT, server_sock, client_sock, self._relay.can_splice),
            )
            try:
                if self._intercepted:
                    await self._relay_intercepted(flow, live)
                else:
                    await self._relay.run(
                        ways, readiness, lambda way: self._direction_ended(flow, way, ending)
                    )
            except TimedOut:
                pass  # the sweep found the flow idle: ending says so, and the flow is reset
            finally:
                # Both directions are over (or the flow was stopped): the only question left
                # is FIN or RST, and FlowEnding answers it.
                if not ending.clean:
                    reset(client_sock)
                    reset(server_sock)
                to_server, to_client = (way.counts.written for way in ways)
                self._closed_bytes[Direction.CLIENT_TO_SERVER] += to_server
                self._closed_bytes[Direction.SERVER_TO_CLIENT] += to_client
                emit(
                    FlowClosed(
                        flow,
                        ending.reason,
                        ending.first_closed,
                        to_server,
                        to_client,
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
        if kind is EndKind.EOF and ending.fin_needs_shutdown:
            try:
                way.sink.shutdown(socket.SHUT_WR)
            except OSError:
                kind = EndKind.SINK_RESET
        if kind is EndKind.EOF:
            self._emit(HalfClosed(flow, way.direction.source))
        elif kind is EndKind.INTERCEPTOR_FAILED and error is not None:
            self._emit(InterceptorFailed(flow, way.direction, error))
        return ending.record(DirectionEnd(way.direction, kind, error))

    async def _relay_intercepted(self, flow: Flow, live: _LiveFlow) -> None:
        """Each direction in a task of its own: one runs its interceptor chain, and one that no
        interceptor wants relays as a plain flow would."""
        assert live.ways is not None
        async with trio.open_nursery() as directions:
            live.scope = directions.cancel_scope
            for way in live.ways:
                directions.start_soon(self._intercept_direction, flow, way, live)

    async def _intercept_direction(self, flow: Flow, way: Way, live: _LiveFlow) -> None:
        chain = self._chains[way.direction]
        error = None
        if chain:
            way.end, error = await _copy_intercepted(flow, way, live.readiness, chain)
        else:
            await self._relay.run_direction(way, live.readiness)
        if self._direction_ended(flow, way, live.ending, error) and live.scope is not None:
            live.scope.cancel()

    async def _sweep(self) -> None:
        """Stop the flows that are out of time: still connecting after the connect timeout,
        or (with an idle timeout) not having read a byte either way for that long.

        One sweep per ``_sweep_period`` looks at every flow, rather than each flow paying for a
        deadline of its own and every read noting the time: a flow is stopped between its
        timeout and one period later (a quarter of the shorter timeout). An idle flow is
        noticed by its byte counts not moving between sweeps.
        """
        connect_timeout, idle_timeout = self._connect_timeout, self._idle_timeout
        seen: dict[int, tuple[int, float]] = {}
        while True:
            await trio.sleep(self._sweep_period)
            now = trio.current_time()
            still: dict[int, tuple[int, float]] = {}
            for flow_id, live in self._live.items():
                if live.ways is None:
                    if now - live.started >= connect_timeout:
                        live.stop()  # connect_out turns this into ConnectFailed("timeout")
                    continue
                if idle_timeout is None:
                    continue
                read = live.bytes_read()
                last_read, since = seen.get(flow_id, (-1, now))
                if read != last_read:
                    still[flow_id] = (read, now)
                elif now - since >= idle_timeout:
                    live.ending.expire()
                    live.stop()
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
        reads, size = 0, INTERCEPT_FIRST_READ
        while True:
            if not readiness.bits & way.readable:
                await readiness.wait(way.readable)
                reads = 0
            try:
                data = way.source.recv(size)
            except BlockingIOError:
                readiness.bits &= ~way.readable
                continue
            except OSError as exc:
                self.reset_error = exc
                raise
            if not data:
                return
            way.counts.read += len(data)
            if len(data) == size:
                size = min(size * 4, INTERCEPT_READ_SIZE)
            else:
                size = INTERCEPT_FIRST_READ
                if not readiness.bits & way.closed:
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
