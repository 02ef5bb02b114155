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
from collections.abc import AsyncIterator, Iterator, Sequence
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
    HalfClosed,
    InterceptorFailed,
    UpstreamConnected,
    UpstreamFailed,
    log_event,
)
from ._flow import Direction, Flow
from ._interceptor import Interceptor, build_chain, chain_for
from ._transparent import (
    ConnectFailed,
    connect_transparent,
    open_transparent_listener,
    reset,
    set_nodelay,
)

# Errors accept(2) returns when the host is short of descriptors or memory: back off and
# retry, since the flows in flight will give some back.
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
ACCEPT_RETRY_S = 0.1

# One read per direction at most is held in memory. 64 KiB matches the default socket buffers
# well enough that a bulk transfer needs few reads.
READ_SIZE = 65536

DEFAULT_CONNECT_TIMEOUT_S = 10.0

LOGGER = logging.getLogger("uproxy_trio")


@dataclass(frozen=True, slots=True)
class _Settings:
    interceptors: tuple[Interceptor, ...]
    connect_timeout: float
    on_event: EventSink


@dataclass(slots=True)
class _Counts:
    """Bytes a direction delivered to its sink."""

    written: int = 0


@dataclass(slots=True)
class _SourceReader:
    """A socket as an async iterator of chunks, remembering whether it was reset.

    The memory matters because an interceptor sits between this reader and the relay and may
    swallow the exception; the relay must still reset the flow rather than pass on a FIN.
    """

    sock: trio.socket.SocketType
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
            yield data


async def serve(
    listen: Sequence[Address],
    *,
    interceptors: Sequence[Interceptor] = (),
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
    on_event: EventSink = log_event,
    task_status: trio.TaskStatus[list[Address]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a transparent proxy on ``listen`` until cancelled.

    ``interceptors`` form an onion around every flow (the first sits closest to the client).
    ``task_status.started`` receives the bound addresses once every listener is up, so
    ``await nursery.start(serve, ...)`` returns when the proxy is ready.
    """
    settings = _Settings(tuple(interceptors), connect_timeout, on_event)
    flow_ids = itertools.count(1)
    with ExitStack() as closing:
        # Held here so that a failure to bind the third listener closes the first two.
        listeners: list[trio.socket.SocketType] = []
        for address in listen:
            listener = await open_transparent_listener(address)
            closing.callback(listener.close)
            listeners.append(listener)
        bound = [from_sockaddr(sock.getsockname()) for sock in listeners]
        for address in bound:
            LOGGER.info("listening on %s", format_address(address))
        async with trio.open_nursery() as flows:
            for listener in listeners:
                flows.start_soon(_accept_loop, listener, flows, flow_ids, settings)
            task_status.started(bound)


async def _accept_loop(
    listener: trio.socket.SocketType,
    flows: trio.Nursery,
    flow_ids: Iterator[int],
    settings: _Settings,
) -> None:
    while True:
        try:
            client_sock, _ = await listener.accept()
        except OSError as exc:
            if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                raise
            LOGGER.error(
                "accept failed: %s; retrying in %ss", os.strerror(exc.errno), ACCEPT_RETRY_S
            )
            await trio.sleep(ACCEPT_RETRY_S)
            continue
        flows.start_soon(_run_flow, client_sock, next(flow_ids), settings)


async def _run_flow(client_sock: trio.socket.SocketType, flow_id: int, settings: _Settings) -> None:
    with client_sock:
        try:
            flow = Flow(
                flow_id,
                client=from_sockaddr(client_sock.getpeername()),
                server=from_sockaddr(client_sock.getsockname()),
            )
        except OSError:
            return  # the client reset before we looked: nothing to relay, nobody to tell
        emit = _safe_sink(settings.on_event)
        started = trio.current_time()
        emit(FlowOpened(flow))
        set_nodelay(client_sock)

        try:
            server_sock = await connect_transparent(
                flow.client, flow.server, settings.connect_timeout
            )
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
            counts = {direction: _Counts() for direction in Direction}
            try:
                async with trio.open_nursery() as directions:

                    async def run_direction(
                        direction: Direction,
                        source: trio.socket.SocketType,
                        sink: trio.socket.SocketType,
                    ) -> None:
                        chain = chain_for(settings.interceptors, direction)
                        end = await _relay(flow, direction, source, sink, chain, counts[direction])
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
            finally:
                # Both directions are over (or the flow was cancelled): the only question left
                # is FIN or RST, and FlowEnding answers it.
                if not ending.clean:
                    reset(client_sock)
                    reset(server_sock)
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


async def _relay(
    flow: Flow,
    direction: Direction,
    source: trio.socket.SocketType,
    sink: trio.socket.SocketType,
    chain: Sequence[Interceptor],
    counts: _Counts,
) -> DirectionEnd:
    """Move one direction until its source's EOF, then pass the EOF on as a FIN."""
    if chain:
        kind, error = await _copy_intercepted(flow, direction, source, sink, chain, counts)
    else:
        kind, error = await _copy(source, sink, counts), None
    if kind is EndKind.EOF:
        try:
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            kind = EndKind.SINK_RESET
    return DirectionEnd(direction, kind, error)


async def _copy(
    source: trio.socket.SocketType, sink: trio.socket.SocketType, counts: _Counts
) -> EndKind:
    while True:
        try:
            data = await source.recv(READ_SIZE)
        except OSError:
            return EndKind.SOURCE_RESET
        if not data:
            return EndKind.EOF
        if not await _send_all(sink, data, counts):
            return EndKind.SINK_RESET


async def _copy_intercepted(
    flow: Flow,
    direction: Direction,
    source: trio.socket.SocketType,
    sink: trio.socket.SocketType,
    chain: Sequence[Interceptor],
    counts: _Counts,
) -> tuple[EndKind, BaseException | None]:
    reader = _SourceReader(source)
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
