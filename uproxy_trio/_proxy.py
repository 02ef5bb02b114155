"""The data path, top to bottom: accept → connect out → two relay directions → close.

Each accepted connection gets a nursery with one task per direction. A direction either copies
bytes straight through or runs them through its interceptor chain; when it ends it tells the
flow's ``FlowEnding``, which decides whether the other direction goes on (half-close) or the
whole flow is reset. Nothing here buffers more than one read per direction.
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
    set_nodelay,
)

# Errors accept(2) returns when the host is short of descriptors or memory: back off and
# retry, since the flows in flight will give some back.
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
ACCEPT_RETRY_S = 0.1

# One read per direction at most is held in memory. A read that fills all 64 KiB means bulk
# data, which then moves by splice(2) instead (see _copy).
READ_SIZE = 65536

# A splice burst smaller than this means the bulk is over: back to recv/send.
SPLICE_MIN_BURST = 16384

DEFAULT_CONNECT_TIMEOUT_S = 10.0

LOGGER = logging.getLogger("uproxy_trio")


@dataclass(slots=True)
class _Counts:
    """What one direction moved: bytes delivered to its sink, and when it last read any."""

    written: int = 0
    last_read: float = 0.0


@dataclass(slots=True)
class _SourceReader:
    """A socket as an async iterator of chunks, remembering whether it was reset.

    The memory matters because an interceptor sits between this reader and the relay and may
    swallow the exception; the relay must still reset the flow rather than pass on a FIN.
    """

    sock: trio.socket.SocketType
    counts: _Counts
    reset_error: OSError | None = field(default=None)

    async def chunks(self) -> AsyncIterator[bytes]:
        while True:
            try:
                data = await self.sock.recv(READ_SIZE)
            except OSError as exc:
                self.reset_error = exc
                raise
            if not data:
                return
            self.counts.last_read = trio.current_time()
            yield data


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
        self._interceptors = tuple(interceptors)
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
        self._closed_bytes = dict.fromkeys(Direction, 0)
        self._live_counts: list[dict[Direction, _Counts]] = []

    @property
    def active_flows(self) -> int:
        return self._active

    def bytes_moved(self) -> dict[Direction, int]:
        """Bytes delivered so far each way, by every flow, the ones in flight included.

        Computed when asked (for a metrics scrape, say), so the data path pays nothing.
        """
        totals = dict(self._closed_bytes)
        for counts in self._live_counts:
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
                listeners: list[trio.socket.SocketType] = []
                for address in listen:
                    listener = await open_transparent_listener(address, reuse_port=self._reuse_port)
                    listeners_open.callback(listener.close)
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

    async def _accept_loop(self, listener: trio.socket.SocketType, flows: trio.Nursery) -> None:
        while True:
            # Wait for a connection before taking a slot, so an idle listener never holds
            # capacity that a busy one needs; at the limit the kernel keeps the connections
            # in its backlog until a flow ends.
            await trio.lowlevel.wait_readable(listener)
            if self._slots is not None:
                await self._slots.acquire()
            try:
                client_sock, _ = await listener.accept()
            except OSError as exc:
                self._release_slot()
                if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                    raise
                LOGGER.error(
                    "accept failed: %s; retrying in %ss", os.strerror(exc.errno), ACCEPT_RETRY_S
                )
                await trio.sleep(ACCEPT_RETRY_S)
                continue
            except BaseException:
                self._release_slot()
                raise
            self._active += 1
            flows.start_soon(self._run_flow, client_sock, next(self._flow_ids))

    def _release_slot(self) -> None:
        if self._slots is not None:
            self._slots.release()

    async def _run_flow(self, client_sock: trio.socket.SocketType, flow_id: int) -> None:
        try:
            with client_sock:
                await self._relay_flow(client_sock, flow_id)
        except Exception:
            # A bug in one flow must not take the others down with the nursery.
            LOGGER.exception("flow %d failed inside the proxy", flow_id)
        finally:
            self._active -= 1
            self._release_slot()
            if self._draining and self._active == 0:
                self._drained.set()

    async def _relay_flow(self, client_sock: trio.socket.SocketType, flow_id: int) -> None:
        emit = self._emit
        try:
            flow = Flow(
                flow_id,
                client=from_sockaddr(client_sock.getpeername()),
                server=from_sockaddr(client_sock.getsockname()),
            )
        except OSError:
            reset(client_sock)
            return  # the client reset before we looked: nothing to relay, nobody to tell
        started = trio.current_time()
        emit(FlowOpened(flow))
        set_nodelay(client_sock)

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
        emit(UpstreamConnected(flow, _since(started)))

        with server_sock:
            ending = FlowEnding()
            counts = {direction: _Counts(last_read=started) for direction in Direction}
            self._live_counts.append(counts)
            try:
                async with trio.open_nursery() as directions:

                    async def run_direction(
                        direction: Direction,
                        source: trio.socket.SocketType,
                        sink: trio.socket.SocketType,
                    ) -> None:
                        chain = chain_for(self._interceptors, direction)
                        end = await _relay(
                            flow, direction, source, sink, chain, counts[direction], self._pipes
                        )
                        if end.kind is EndKind.EOF:
                            emit(HalfClosed(flow, direction.source))
                        elif end.kind is EndKind.INTERCEPTOR_FAILED and end.error is not None:
                            emit(InterceptorFailed(flow, direction, end.error))
                        if ending.record(end):
                            directions.cancel_scope.cancel()

                    directions.start_soon(
                        run_direction, Direction.CLIENT_TO_SERVER, client_sock, server_sock
                    )
                    directions.start_soon(
                        run_direction, Direction.SERVER_TO_CLIENT, server_sock, client_sock
                    )
                    if self._idle_timeout is not None:
                        directions.start_soon(
                            _watch_idle, self._idle_timeout, counts, ending, directions.cancel_scope
                        )
            finally:
                # Both directions are over (or the flow was cancelled): the only question left
                # is FIN or RST, and FlowEnding answers it.
                if not ending.clean:
                    reset(client_sock)
                    reset(server_sock)
                self._live_counts.remove(counts)
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
    """End the flow once neither direction has read a byte for ``timeout`` seconds."""
    while True:
        last = max(count.last_read for count in counts.values())
        if trio.current_time() - last >= timeout:
            ending.expire()
            directions.cancel()
            return
        await trio.sleep_until(last + timeout)


async def _relay(
    flow: Flow,
    direction: Direction,
    source: trio.socket.SocketType,
    sink: trio.socket.SocketType,
    chain: Sequence[Interceptor],
    counts: _Counts,
    pipes: PipePool | None,
) -> DirectionEnd:
    """Move one direction until its source's EOF, then pass the EOF on as a FIN."""
    if chain:
        kind, error = await _copy_intercepted(flow, direction, source, sink, chain, counts)
    else:
        kind, error = await _copy(source, sink, counts, pipes), None
    if kind is EndKind.EOF:
        try:
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            kind = EndKind.SINK_RESET
    return DirectionEnd(direction, kind, error)


async def _copy(
    source: trio.socket.SocketType,
    sink: trio.socket.SocketType,
    counts: _Counts,
    pipes: PipePool | None,
) -> EndKind:
    """Copy without interceptors, choosing the path per read like HAProxy's splice-auto.

    Small reads (requests, responses, keystrokes) go through recv/send: two system calls and
    no pipe. Once a read fills the whole buffer the flow is moving bulk data, and it switches
    to splice(2), where the bytes never enter Python; when a burst turns small again, it
    switches back.
    """
    splicing = False
    while True:
        if splicing and pipes is not None:
            await trio.lowlevel.wait_readable(source)
            try:
                pipe = pipes.take()
            except OSError:
                splicing = False  # no descriptor for a pipe right now: copy this read
                continue
            try:
                moved, eof = await splice_burst(source, sink, pipe)
            except SpliceFailed as failure:
                pipe.close()
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
            counts.written += moved
            if moved:
                counts.last_read = trio.current_time()
            if eof:
                return EndKind.EOF
            splicing = moved >= SPLICE_MIN_BURST
            continue
        try:
            data = await source.recv(READ_SIZE)
        except OSError:
            return EndKind.SOURCE_RESET
        if not data:
            return EndKind.EOF
        counts.last_read = trio.current_time()
        if not await _send_all(sink, data, counts):
            return EndKind.SINK_RESET
        splicing = len(data) == READ_SIZE


async def _copy_intercepted(
    flow: Flow,
    direction: Direction,
    source: trio.socket.SocketType,
    sink: trio.socket.SocketType,
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


async def _send_all(sink: trio.socket.SocketType, data: bytes, counts: _Counts) -> bool:
    """Write all of ``data``; false if the sink is gone (reset, or its read side shut)."""
    view = memoryview(data)
    while view:
        try:
            sent = await sink.send(view)
        except OSError:
            return False
        counts.written += sent
        view = view[sent:]
    return True


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
