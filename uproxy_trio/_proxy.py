"""The data path, top to bottom: accept → connect out → two relay directions → close.

Each accepted connection gets a task and a nursery: the task relays client-to-server itself
and a child task relays server-to-client. A direction either copies bytes straight through
(recv/send for small reads, splice(2) for bulk) or runs them through its interceptor chain;
when it ends it tells the flow's ``FlowEnding``, which decides whether the other direction goes
on (half-close) or the whole flow is reset.

Sockets are plain non-blocking sockets: a read or write is tried at once and the task only
waits (``trio.lowlevel.wait_readable``/``wait_writable``) when the kernel says it would block,
so a request and its response cost the relay four system calls and no trip through the
scheduler. Because nothing awaits between reading into the shared buffer and writing it out,
one buffer serves every flow; the rare write that would block takes a copy first.
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
from ._splice import SPLICE_AVAILABLE, PipePool, SourceGone, SpliceFailed, splice_burst
from ._transparent import (
    ConnectFailed,
    connect_transparent,
    is_own_listener,
    open_transparent_listener,
    reset,
)

# Errors accept(2) returns when the host is short of descriptors or memory: back off and
# retry, since the flows in flight will give some back.
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
ACCEPT_RETRY_S = 0.1
# Connections taken per wake-up of an accept loop before it yields to the flows.
ACCEPT_BATCH = 64

# The shared buffer for plain reads. A read that fills it means bulk data, which then moves
# by splice(2) instead (see _copy).
READ_SIZE = 65536

# Interceptors get chunks of up to this much: large reads, fewer chunks, less overhead each.
INTERCEPT_READ_SIZE = 262144

# A splice burst smaller than this means the bulk is over: back to recv/send.
SPLICE_MIN_BURST = 16384

# A direction that never has to wait (data always there, sink always writable) yields to the
# other tasks after this many reads, as Trio's fairness asks.
FAIRNESS_READS = 16

DEFAULT_CONNECT_TIMEOUT_S = 10.0

LOGGER = logging.getLogger("uproxy_trio")


@dataclass(slots=True)
class _Counts:
    """What one direction moved: bytes read from its source and delivered to its sink."""

    read: int = 0
    written: int = 0


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
        self._buffer = memoryview(bytearray(READ_SIZE))
        self._closed_bytes = dict.fromkeys(Direction, 0)
        self._live_counts: dict[int, dict[Direction, _Counts]] = {}

    @property
    def active_flows(self) -> int:
        return self._active

    def bytes_moved(self) -> dict[Direction, int]:
        """Bytes delivered so far each way, by every flow, the ones in flight included.

        Computed when asked (for a metrics scrape, say), so the data path pays nothing.
        """
        totals = dict(self._closed_bytes)
        for counts in self._live_counts.values():
            for direction, count in counts.items():
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
            with ExitStack() as listeners_open:
                # Held here so that a failure to bind the third listener closes the first two.
                listeners: list[socket.socket] = []
                for address in listen:
                    listener = open_transparent_listener(address, reuse_port=self._reuse_port)
                    listeners_open.callback(_close, listener)
                    listeners.append(listener)
                self._listening = [from_sockaddr(sock.getsockname()) for sock in listeners]
                for address in self._listening:
                    LOGGER.info("listening on %s", format_address(address))
                async with trio.open_nursery() as flows:
                    self._flows_scope = flows.cancel_scope
                    with self._accepting:
                        async with trio.open_nursery() as acceptors:
                            for listener in listeners:
                                acceptors.start_soon(self._accept_loop, listener, flows)
                            task_status.started(self.addresses)
                    # Draining: close the listeners at once, so new flows are no longer taken
                    # (the kernel refuses them), while the flows in flight go on.
                    listeners_open.close()
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

    async def _accept_loop(self, listener: socket.socket, flows: trio.Nursery) -> None:
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
                flows.start_soon(self._run_flow, client_sock, client_address, next(self._flow_ids))

    def _release_slot(self) -> None:
        if self._slots is not None:
            self._slots.release()

    async def _run_flow(
        self, client_sock: socket.socket, client_address: tuple[object, ...], flow_id: int
    ) -> None:
        try:
            with client_sock:
                await self._relay_flow(client_sock, client_address, flow_id)
        except Exception:
            # A bug in one flow must not take the others down with the nursery.
            LOGGER.exception("flow %d failed inside the proxy", flow_id)
        finally:
            self._active -= 1
            self._release_slot()
            if self._draining and self._active == 0:
                self._drained.set()

    async def _relay_flow(
        self, client_sock: socket.socket, client_address: tuple[object, ...], flow_id: int
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
            server_sock = await connect_transparent(flow.client, flow.server, self._connect_timeout)
        except ConnectFailed as failure:
            # Without the proxy the client would have been refused (or given up): a reset is
            # the closest we can come now that its handshake with us has completed.
            reset(client_sock)
            emit(UpstreamFailed(flow, failure.reason))
            emit(FlowClosed(flow, f"upstream_{failure.reason}", None, 0, 0, _since(started)))
            return
        except BaseException:
            reset(client_sock)  # cancelled while connecting (the proxy is stopping): no FIN
            raise
        emit(UpstreamConnected(flow, _since(started)))

        with server_sock:
            ending = FlowEnding()
            counts = {direction: _Counts() for direction in Direction}
            self._live_counts[flow.id] = counts
            try:
                async with trio.open_nursery() as directions:
                    scope = directions.cancel_scope
                    if self._idle_timeout is not None:
                        directions.start_soon(
                            _watch_idle, self._idle_timeout, counts, ending, scope
                        )
                    directions.start_soon(
                        self._relay_direction,
                        flow,
                        Direction.SERVER_TO_CLIENT,
                        server_sock,
                        client_sock,
                        counts[Direction.SERVER_TO_CLIENT],
                        ending,
                        scope,
                    )
                    await self._relay_direction(
                        flow,
                        Direction.CLIENT_TO_SERVER,
                        client_sock,
                        server_sock,
                        counts[Direction.CLIENT_TO_SERVER],
                        ending,
                        scope,
                    )
            finally:
                # Both directions are over (or the flow was cancelled): the only question left
                # is FIN or RST, and FlowEnding answers it.
                if not ending.clean:
                    reset(client_sock)
                    reset(server_sock)
                del self._live_counts[flow.id]
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

    async def _relay_direction(
        self,
        flow: Flow,
        direction: Direction,
        source: socket.socket,
        sink: socket.socket,
        counts: _Counts,
        ending: FlowEnding,
        flow_scope: trio.CancelScope,
    ) -> None:
        """Move one direction until its source's EOF, pass the EOF on as a FIN, and tell the
        flow how this direction ended."""
        chain = self._chains[direction]
        error: BaseException | None = None
        if chain:
            kind, error = await _copy_intercepted(flow, direction, source, sink, chain, counts)
        else:
            # A server rarely speaks before it has heard the client: wait before reading.
            wait_first = direction is Direction.SERVER_TO_CLIENT
            kind = await _copy(source, sink, counts, self._buffer, self._pipes, wait_first)
        if kind is EndKind.EOF:
            try:
                sink.shutdown(socket.SHUT_WR)
            except OSError:
                kind = EndKind.SINK_RESET
        if kind is EndKind.EOF:
            self._emit(HalfClosed(flow, direction.source))
        elif kind is EndKind.INTERCEPTOR_FAILED and error is not None:
            self._emit(InterceptorFailed(flow, direction, error))
        if ending.record(DirectionEnd(direction, kind, error)):
            flow_scope.cancel()


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


async def _watch_idle(
    timeout: float,
    counts: dict[Direction, _Counts],
    ending: FlowEnding,
    directions: trio.CancelScope,
) -> None:
    """End the flow once neither direction has read a byte for ``timeout`` seconds.

    It looks four times per timeout whether the byte counts moved, rather than have every
    read note the time: an idle flow ends between ``timeout`` and 1.25 times that.
    """
    last_change, last_seen = trio.current_time(), -1
    while True:
        seen = sum(count.read for count in counts.values())
        now = trio.current_time()
        if seen != last_seen:
            last_change, last_seen = now, seen
        elif now - last_change >= timeout:
            ending.expire()
            directions.cancel()
            return
        await trio.sleep(timeout / 4)


async def _copy(
    source: socket.socket,
    sink: socket.socket,
    counts: _Counts,
    buffer: memoryview,
    pipes: PipePool | None,
    wait_first: bool = False,
) -> EndKind:
    """Copy without interceptors, choosing the path per read like HAProxy's splice-auto.

    Small reads (requests, responses, keystrokes) go through recv_into/send on the shared
    buffer: two system calls, no pipe, no allocation. Once a read fills the whole buffer the
    flow is moving bulk data, and it switches to splice(2), where the bytes never enter
    Python; when a burst turns small again, it switches back.
    """
    splicing = False
    # A read that returned less than the buffer most likely emptied the socket: wait for more
    # before trying again, rather than pay a failing recv (and its exception) per message.
    drained = wait_first
    reads = 0
    while True:
        if drained:
            await trio.lowlevel.wait_readable(source)
            drained = False
            reads = 0
        if splicing and pipes is not None:
            try:
                pipe = pipes.take()
            except OSError:
                splicing = False  # no descriptor for a pipe right now: copy instead
                continue
            try:
                moved, eof = await splice_burst(source, sink, pipe)
            except SpliceFailed as failure:
                pipe.close()
                counts.read += failure.moved
                counts.written += failure.moved
                if failure.unsupported:
                    pipes = None
                    continue
                return (
                    EndKind.SOURCE_RESET if isinstance(failure, SourceGone) else EndKind.SINK_RESET
                )
            except BaseException:
                pipe.close()  # cancelled mid-burst: the pipe may still hold bytes
                raise
            pipes.give_back(pipe)
            counts.read += moved
            counts.written += moved
            if eof:
                return EndKind.EOF
            if moved == 0:
                await trio.lowlevel.wait_readable(source)
            elif moved < SPLICE_MIN_BURST:
                splicing = False
            else:
                # A burst stops at BURST_LIMIT so that a flow whose bytes never run out still
                # lets the others have their turn.
                await trio.lowlevel.checkpoint()
            continue
        try:
            size = source.recv_into(buffer)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(source)
            reads = 0
            continue
        except OSError:
            return EndKind.SOURCE_RESET
        if size == 0:
            return EndKind.EOF
        counts.read += size
        try:
            sent = sink.send(buffer[:size])
        except BlockingIOError:
            sent = 0
        except OSError:
            return EndKind.SINK_RESET
        counts.written += sent
        if sent < size:
            # The sink is full: take the rest out of the shared buffer before waiting.
            if not await _send_all(sink, bytes(buffer[sent:size]), counts):
                return EndKind.SINK_RESET
            reads = 0
        splicing = size == len(buffer)
        drained = not splicing
        reads += 1
        if reads >= FAIRNESS_READS:
            await trio.lowlevel.checkpoint()
            reads = 0


@dataclass(slots=True)
class _SourceReader:
    """A socket as an async iterator of chunks, remembering whether it was reset.

    The memory matters because an interceptor sits between this reader and the relay and may
    swallow the exception; the relay must still reset the flow rather than pass on a FIN.
    """

    sock: socket.socket
    counts: _Counts
    reset_error: OSError | None = field(default=None)

    async def chunks(self) -> AsyncIterator[bytes]:
        reads = 0
        while True:
            try:
                data = self.sock.recv(INTERCEPT_READ_SIZE)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.sock)
                reads = 0
                continue
            except OSError as exc:
                self.reset_error = exc
                raise
            if not data:
                return
            self.counts.read += len(data)
            reads += 1
            if reads >= FAIRNESS_READS:
                await trio.lowlevel.checkpoint()
                reads = 0
            yield data


async def _copy_intercepted(
    flow: Flow,
    direction: Direction,
    source: socket.socket,
    sink: socket.socket,
    chain: Sequence[Interceptor],
    counts: _Counts,
) -> tuple[EndKind, BaseException | None]:
    reader = _SourceReader(source, counts)
    try:
        async with AsyncExitStack() as generators:
            chunks = await build_chain(generators, flow, direction, chain, reader.chunks())
            async for chunk in chunks:
                if chunk and not await _send_all(sink, chunk, counts):
                    return EndKind.SINK_RESET, None
    except Exception as exc:  # noqa: BLE001 - whatever an interceptor raises resets its flow only
        if reader.reset_error is not None:
            return EndKind.SOURCE_RESET, None
        return EndKind.INTERCEPTOR_FAILED, exc
    if reader.reset_error is not None:
        return EndKind.SOURCE_RESET, None
    return EndKind.EOF, None


async def _send_all(sink: socket.socket, data: bytes, counts: _Counts) -> bool:
    """Write all of ``data``, waiting while the sink is full; false if the sink is gone."""
    view = memoryview(data)
    while view:
        try:
            sent = sink.send(view)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sink)
            continue
        except OSError:
            return False
        counts.written += sent
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
