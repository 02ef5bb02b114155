"""One direction of a UDP session: datagrams from one connected socket to the other.

As for TCP (``_direction.Way``), a direction no interceptor touches is a ``Pump``: its task
hands it to the reactor, which runs it on each edge, so a datagram costs a ``recv_into`` and
no trip through Trio's scheduler; the datagrams one edge finds queued go on in runs of one
size, each run in one segmented ``send`` (``UDP_SEGMENT``), which the kernel routes, filters
and hands across as one packet, and cuts into datagrams as late as it can. A direction with
interceptors feeds them one datagram per chunk and sends each item they yield as one datagram.

A datagram's source is checked against the session's peer while a stray could still be
queued: between a socket's ``bind`` and its ``connect`` the kernel's socket lookup matches it
for any datagram to its address, and a socket-matching firewall rule then hands it another
client's (one looked up just before ``connect`` can be queued just after). A stray goes back
to the listener's path (``on_stray``), never into this session. A pump checks until it finds
its socket empty ``STRAY_WINDOW_S`` after connecting, then reads with ``recv_into``, which
builds no address per datagram; the intercepted path always checks.

UDP has no end of stream: a direction ends only when its source or sink reports its peer gone
(an ICMP error, ``ECONNREFUSED`` on the connected socket), or when its interceptor chain ends
or fails. Whichever direction ends first ends the session.
"""

from __future__ import annotations

import enum
import errno
import socket
import time
from collections import deque
from collections.abc import Callable, MutableMapping, Sequence

import trio

from ._address import Address, from_sockaddr
from ._datagram import (
    MAX_DATAGRAM,
    MAX_SEGMENTED_BYTES,
    MAX_SEGMENTS,
    PEER_GONE_ERRNOS,
    segment_limit,
    send_segmented,
)
from ._ending import CloseFlow, ResetFlow
from ._flow import Direction, Flow
from ._interceptor import Interceptor, run_chain
from ._live import FAIRNESS_READS, POKED_BITS, LiveSegment, until_readable
from ._readiness import READABLE, WRITABLE, Readiness, Side, Turn, bit

# Datagrams one pump moves per turn before the other sessions go (a 64-byte datagram costs
# about 4 us here, so a turn stays well under the reactor's round).
TURN_DATAGRAMS = 64
# The pumps' shared buffer: a run of datagrams to send segmented, and room for one more.
RUN_BUFFER = MAX_SEGMENTED_BYTES + MAX_DATAGRAM
# How long after a session's sockets are connected a datagram from someone else could still
# be queued for them (a lookup made just before connect() on another CPU, delivered just
# after it): microseconds in fact; the sources are checked for far longer.
STRAY_WINDOW_S = 0.05
# Datagrams for a session that reached the listener and wait for the session's direction:
# bounded, since a session whose server side is full must not hoard memory.
INBOX_DATAGRAMS = 256


class Drop(enum.Enum):
    """Why a datagram was dropped: a closed set, fit for a metrics label."""

    SESSION_LIMIT = "session_limit"
    """A new session's datagram, with ``max_udp_sessions`` sessions in flight."""
    NO_SOCKET = "no_socket"
    """The session's sockets could not be made (descriptors, memory, a local clash)."""
    SELF_LOOP = "self_loop"
    """Addressed to one of the proxy's own UDP listeners."""
    TOO_BIG = "too_big"
    """The kernel refused to send it whole (``EMSGSIZE``)."""
    SEND_FAILED = "send_failed"
    """The kernel refused to send it for another reason (a firewall, no route)."""
    QUEUE_FULL = "queue_full"
    """The session's queue of datagrams from the listener was full."""
    STRAY = "stray"
    """A server's datagram that reached a session socket but belongs to no session."""
    NOT_TPROXIED = "not_tproxied"
    """Sent to a listener's own address, without an original destination."""
    ROUTE_DISABLED = "route_disabled"
    """A new session's datagram on a route ``Proxy.set_enabled`` has disabled."""


class DatagramEnd(enum.Enum):
    """How a direction of a session ended."""

    SOURCE_GONE = "source_gone"
    """Its source socket reported an error from its peer's side (an ICMP message)."""
    SINK_GONE = "sink_gone"
    """Its sink socket did."""
    CHAIN_ENDED = "chain_ended"
    """Its interceptor chain stopped asking for datagrams."""
    INTERCEPTOR_FAILED = "interceptor_failed"
    """An interceptor raised."""
    INTERCEPTOR_CLOSED = "interceptor_closed"
    """An interceptor raised ``CloseFlow``."""
    INTERCEPTOR_RESET = "interceptor_reset"
    """An interceptor raised ``ResetFlow``."""


_BITS = {
    Direction.CLIENT_TO_SERVER: (bit(Side.CLIENT, READABLE), bit(Side.SERVER, WRITABLE)),
    Direction.SERVER_TO_CLIENT: (bit(Side.SERVER, READABLE), bit(Side.CLIENT, WRITABLE)),
}

_STUCK, _MORE, _DONE = Turn.STUCK, Turn.MORE, Turn.DONE
_SOURCE_GONE, _SINK_GONE = DatagramEnd.SOURCE_GONE, DatagramEnd.SINK_GONE


class DatagramWay:
    """One direction of a session with its two connected sockets.

    ``datagrams`` and ``read`` count what came from the source (the sweep reads them for
    progress), ``written`` the bytes handed to the sink; ``end`` and ``errno`` say how the
    direction ended.
    """

    __slots__ = (
        "_buffer",
        "_checking",
        "_drops",
        "_limit",
        "_peer",
        "_trusted_from",
        "datagrams",
        "direction",
        "end",
        "errno",
        "flow",
        "held",
        "held_segment",
        "inbox",
        "mask",
        "on_stray",
        "picked",
        "read",
        "readable",
        "readiness",
        "segment",
        "sink",
        "source",
        "switching",
        "writable",
        "written",
    )

    def __init__(
        self,
        direction: Direction,
        source: socket.socket,
        sink: socket.socket,
        readiness: Readiness,
        buffer: memoryview,
        drops: MutableMapping[Drop, int],
        flow: Flow,
        on_stray: Callable[[bytes, Address, Address], None] | None,
        *,
        runs: bool = True,
    ) -> None:
        self.direction = direction
        self.source = source
        self.sink = sink
        self.readiness = readiness
        self._buffer = buffer
        self._drops = drops
        self.on_stray = on_stray
        self.flow = flow
        # The source's peer, compared to each datagram's source (recvfrom's first two
        # fields): the flow's own tuple, so that a session holds no copy of it, once the
        # kernel has said it writes the address the same way.
        expected = flow.client if direction is Direction.CLIENT_TO_SERVER else flow.server
        peer = source.getpeername()[:2]
        self._peer = expected if peer == expected else peer
        self.readable, self.writable = _BITS[direction]
        self.mask = self.readable | self.writable
        # Made for the session's first datagram, dropped once empty: most sessions need it
        # for that one datagram only, and an empty deque costs 600 bytes.
        self.inbox: deque[bytes] | None = None
        # Read, but the sink's buffer was full: one datagram, or a run of ``held_segment``.
        self.held: bytes | None = None
        self.held_segment = 0
        self._limit = -1 if runs else 0  # ``_segment_limit``'s, once asked; 0: no runs
        self.datagrams = self.read = self.written = 0
        self.end: DatagramEnd | None = None
        self.errno = 0
        # A datagram can be queued for the socket before its connect() (see the module's
        # docstring), or by a softirq that looked it up just before: every source is checked
        # until the socket has been found empty some time after that.
        self._checking = True
        self._trusted_from = time.monotonic() + STRAY_WINDOW_S
        # Live interceptors (``_live``), as for TCP (``_direction.Way``).
        self.switching = False
        self.segment: LiveSegment | None = None
        self.picked: dict[int, bool] | None = None

    # -- datagrams that reached the listener instead -----------------------------------------

    def take(self, data: bytes) -> bool:
        """A datagram of this direction that reached the listener (the session's first, or
        one that was in flight while the session was set up): relayed as if read here, once
        whoever moves this direction looks again (``Reactor.kick`` with ``readable``); false
        if it was dropped instead."""
        self.datagrams += 1
        self.read += len(data)
        inbox = self.inbox
        if inbox is None:
            inbox = self.inbox = deque()
        elif len(inbox) >= INBOX_DATAGRAMS:
            self._drop(Drop.QUEUE_FULL)
            return False
        inbox.append(data)
        return True

    def _next_in_inbox(self) -> bytes:
        inbox = self.inbox
        assert inbox is not None
        datagram = inbox.popleft()
        if not inbox:
            self.inbox = None
        return datagram

    # -- the plain path: a pump for the reactor ----------------------------------------------

    def turn(self) -> Turn:
        """Move up to ``TURN_DATAGRAMS`` datagrams without blocking.

        What the source has queued is read back to back into the buffer, and a run of
        datagrams of one size (the last may be shorter) goes to the sink in one segmented
        send: a bulk stream then costs one ``send`` per run instead of one per datagram. A
        run is only what was queued already; nothing waits for more.
        """
        if self.switching:
            return _DONE  # (with no ``end``): the task takes the direction back
        if self.held is not None or self.inbox is not None:
            waiting = self._send_waiting()
            if waiting is not None:
                return waiting
        readiness, readable = self.readiness, self.readable
        source, buffer = self.source, self._buffer
        # The run read and not sent yet: buffer[:end], ``count`` datagrams of ``segment``
        # bytes, the last shorter if ``closed``.
        end = segment = count = 0
        closed = False
        outcome = _MORE
        for _ in range(TURN_DATAGRAMS):
            if not readiness.bits & readable:
                outcome = _STUCK
                break
            try:
                if self._checking:
                    size = self._receive_checked(buffer[end:])
                    if size < 0:
                        continue  # a stray, handed on
                else:
                    size = source.recv_into(buffer[end:])
            except BlockingIOError:
                readiness.clear(readable)
                if self._checking and time.monotonic() >= self._trusted_from:
                    self._checking = False
                outcome = _STUCK
                break
            except OSError as exc:
                if self._gone(exc, _SOURCE_GONE):
                    outcome = _DONE
                    break
                continue
            self.datagrams += 1
            self.read += size
            if count and (
                closed
                or not 0 < size <= segment
                or count == MAX_SEGMENTS
                or end + size > MAX_SEGMENTED_BYTES
                or segment > self._segment_limit()
            ):
                # It cannot join the run: the run goes, and it starts the next one.
                if not self._send(buffer[:end], segment if count > 1 else 0):
                    # Held (or over): it goes after the run, and after whatever of the run
                    # was queued, which is all the inbox holds now (it was empty at the
                    # turn's start, and only this turn has run since).
                    self._queue_last(bytes(buffer[end : end + size]))
                    return _DONE if self.end is not None else _STUCK
                buffer[:size] = buffer[end : end + size]
                end = count = 0
                closed = False
            if count:
                closed = size < segment
            else:
                segment = size
            end += size
            count += 1
        if count and not self._send(buffer[:end], segment if count > 1 else 0):
            return _DONE if self.end is not None else _STUCK
        return outcome

    def _segment_limit(self) -> int:
        """The largest datagram a run to the sink may be made of (0: none), asked once."""
        limit = self._limit
        if limit < 0:
            limit = self._limit = segment_limit(self.sink)
        return limit

    def _receive_checked(self, into: memoryview) -> int:
        """One datagram into ``into``, its source checked: its size, or -1 for a stray
        (handed on by ``_stray``)."""
        size, sender = self.source.recvfrom_into(into)
        peer = self._peer
        # An IPv4 sender is exactly the peer's pair; IPv6 adds flow info and scope.
        if sender != peer and sender[:2] != peer:
            self._stray(bytes(into[:size]), sender)
            return -1
        return size

    def _send_waiting(self) -> Turn | None:
        """Send what was held and what came through the listener; ``None`` once all is gone."""
        while self.held is not None or self.inbox is not None:
            if self.end is not None:
                return _DONE
            if not self.readiness.bits & self.writable:
                return _STUCK
            if self.held is not None:
                held, self.held = self.held, None
                self._send(held, self.held_segment)
            else:
                self._send(self._next_in_inbox())
        return _DONE if self.end is not None else None

    def _send(self, data: bytes | memoryview, segment: int = 0) -> bool:
        """Send one datagram, or with ``segment`` a run of datagrams of that size, or hold it
        (a copy) while the sink's buffer is full: whether the direction can go on (false once
        it holds something or is over; a datagram the kernel refused is dropped and counted)."""
        try:
            if segment:
                send_segmented(self.sink, data, segment)
            else:
                self.sink.send(data)
        except BlockingIOError:
            self.held, self.held_segment = bytes(data), segment
            self.readiness.clear(self.writable)
            return False
        except OSError as exc:
            if segment and exc.errno not in PEER_GONE_ERRNOS:
                return self._send_one_by_one(data, segment)
            return not self._gone(exc, _SINK_GONE, dropping=True)
        self.written += len(data)
        return True

    def _send_one_by_one(self, run: bytes | memoryview, segment: int) -> bool:
        """The kernel would not send ``run`` segmented (the path MTU went down, or the way
        has no checksum offload): its datagrams one at a time, and no more runs here."""
        self._limit = 0
        datagrams = [run[offset : offset + segment] for offset in range(0, len(run), segment)]
        for index, datagram in enumerate(datagrams):
            if not self._send(datagram):
                if self.end is None:
                    self._queue_first([bytes(later) for later in datagrams[index + 1 :]])
                return False
        return True

    def _queue_first(self, datagrams: list[bytes]) -> None:
        """Datagrams of a run whose first part is now held: sent next, before the inbox's."""
        if datagrams:
            if self.inbox is None:
                self.inbox = deque()
            self.inbox.extendleft(reversed(datagrams))

    def _queue_last(self, datagram: bytes) -> None:
        if self.inbox is None:
            self.inbox = deque()
        self.inbox.append(datagram)

    def _gone(self, exc: OSError, end: DatagramEnd, *, dropping: bool = False) -> bool:
        """Whether ``exc`` means the peer behind the failing socket is gone (the direction
        is then over); a failure to send only drops the datagram."""
        if exc.errno in PEER_GONE_ERRNOS:
            self.end, self.errno = end, exc.errno or 0
            return True
        if dropping:
            self._drop(Drop.TOO_BIG if exc.errno == errno.EMSGSIZE else Drop.SEND_FAILED)
        return False

    def _stray(self, data: bytes, sender: Address) -> None:
        """A datagram the source's peer did not send: handed back to the listener's path
        (``on_stray``), or dropped where there is none."""
        if self.on_stray is None:
            self._drop(Drop.STRAY)
        else:
            self.on_stray(data, from_sockaddr(sender), self.flow.server)

    def _drop(self, why: Drop) -> None:
        self._drops[why] += 1

    def detached(self) -> None:
        """The reactor lets this direction go: nothing is held outside the kernel anyway."""

    # -- the intercepted path ----------------------------------------------------------------

    async def relay_intercepted(
        self,
        flow: Flow,
        chain: Sequence[Interceptor],
        live: Callable[[], Sequence[Interceptor]],
        nursery: trio.Nursery,
    ) -> tuple[BaseException | None, bool]:
        """Move datagrams through the live interceptors (``live()`` says which, now; their
        tasks run in the session's ``nursery``) and ``chain`` until the direction ends: what
        the chain raised, if that was the end; and whether it stopped because nothing
        intercepts it any more (back to the plain path, at a datagram's boundary)."""
        if self.held is not None:
            held, self.held = self.held, None
            for datagram in _datagrams_of(held, self.held_segment):
                if not await self.send_one(datagram):
                    return None, False
        segment = LiveSegment(flow, _DatagramTap(self), self.direction, live, bool(chain), nursery)
        self.segment = segment
        try:
            # It returns early only when the sink's peer is gone, which ``end`` says already.
            await run_chain(flow, self.direction, chain, segment, self.send_one)
            if segment.switched:
                return None, True
            if self.end is None:
                self.end = DatagramEnd.CHAIN_ENDED
        except Exception as exc:  # noqa: BLE001 - whatever an interceptor raises ends its session only
            if self.end is not None:
                return None, False  # the source's error reached the chain: that ended it
            # CloseFlow and ResetFlow are asked for, not failures; a session has no FIN or
            # RST to choose between, so either just ends it.
            if isinstance(exc, CloseFlow):
                self.end = DatagramEnd.INTERCEPTOR_CLOSED
            elif isinstance(exc, ResetFlow):
                self.end = DatagramEnd.INTERCEPTOR_RESET
            else:
                self.end = DatagramEnd.INTERCEPTOR_FAILED
                return exc, False
        finally:
            self.segment = None
            segment.close()
        return None, False

    async def send_one(self, datagram: bytes) -> bool:
        """Send ``datagram`` as one datagram, waiting while the sink's buffer is full; false
        once the sink's peer is gone."""
        await trio.lowlevel.checkpoint_if_cancelled()
        readiness, writable = self.readiness, self.writable
        while True:
            try:
                self.sink.send(datagram)
            except BlockingIOError:
                readiness.clear(writable)
                await readiness.wait(writable)
                continue
            except OSError as exc:
                return not self._gone(exc, _SINK_GONE, dropping=True)
            self.written += len(datagram)
            return True


def _datagrams_of(held: bytes, segment: int) -> list[bytes]:
    """What a direction held: one datagram, or a run of ``segment``-byte ones."""
    if not segment:
        return [held]
    return [held[offset : offset + segment] for offset in range(0, len(held), segment)]


class _DatagramTap:
    """A direction's source for its interceptors: one datagram per read, from the session's
    peer only (a stray goes back to the listener's path), the ones that reached the listener
    first. UDP has no end of stream: a read never returns ``None``; a peer gone raises."""

    __slots__ = ("_poked", "_reads", "_way")

    def __init__(self, way: DatagramWay) -> None:
        self._way = way
        self._reads = 0
        self._poked = POKED_BITS[way.direction]

    async def read(self, interruptible: bool = False) -> bytes | None:
        way = self._way
        readiness, readable, source, peer = way.readiness, way.readable, way.source, way._peer
        poked = self._poked if interruptible else 0
        if self._reads >= FAIRNESS_READS:
            # (before reading, never after: a cancellation here loses nothing)
            await trio.lowlevel.checkpoint()
            self._reads = 0
        while True:
            if way.inbox is not None:
                return way._next_in_inbox()
            # (a datagram that reached the listener meanwhile wakes this wait too)
            if await until_readable(readiness, readable, poked):
                self._reads = 0
                continue
            try:
                data, sender = source.recvfrom(MAX_DATAGRAM)
            except BlockingIOError:
                readiness.clear(readable)
                continue
            except OSError as exc:
                if way._gone(exc, _SOURCE_GONE):
                    raise
                continue
            if sender != peer and sender[:2] != peer:
                way._stray(data, sender)
                continue
            way.datagrams += 1
            way.read += len(data)
            self._reads += 1
            return data


def both_ways(
    flow: Flow,
    client: socket.socket,
    server: socket.socket,
    readiness: Readiness,
    buffer: memoryview,
    drops: MutableMapping[Drop, int],
    on_stray: Callable[[bytes, Address, Address], None],
    *,
    runs: bool = True,
) -> tuple[DatagramWay, DatagramWay]:
    """A session's two directions, client to server first, on one ``readiness``.

    ``client`` is the socket facing the client (bound to the original destination),
    ``server`` the one facing the server (bound to the client's address). A stray on the
    client side goes to ``on_stray(data, its client, the session's server)``; one on the
    server side (a datagram to the client's address from anyone but the server) is nobody's,
    and is dropped. ``runs=False``: every datagram is sent on its own, never in a run.
    """
    return (
        DatagramWay(
            Direction.CLIENT_TO_SERVER,
            client,
            server,
            readiness,
            buffer,
            drops,
            flow,
            on_stray,
            runs=runs,
        ),
        DatagramWay(
            Direction.SERVER_TO_CLIENT,
            server,
            client,
            readiness,
            buffer,
            drops,
            flow,
            None,
            runs=runs,
        ),
    )
