"""One direction of a UDP session: datagrams from one connected socket to the other.

As for TCP (``_direction.Way``), a direction no interceptor touches is a ``Pump``: its task
hands it to the reactor, which runs it on each edge, so a datagram costs a ``recvfrom`` and a
``send`` and no trip through Trio's scheduler. A direction with interceptors feeds them one
datagram per chunk and sends each item they yield as one datagram.

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
from ._datagram import MAX_DATAGRAM, PEER_GONE_ERRNOS
from ._ending import CloseFlow, ResetFlow
from ._flow import Direction, Flow
from ._interceptor import Interceptor, run_chain
from ._live import POKED_BITS, LiveSegment, until_readable
from ._readiness import READABLE, WRITABLE, Readiness, Side, Turn, bit

# Datagrams one pump moves per turn before the other sessions go (a 64-byte datagram costs
# about 4 us here, so a turn stays well under the reactor's round).
TURN_DATAGRAMS = 64
# How long after a session's sockets are connected a datagram from someone else could still
# be queued for them (a lookup made just before connect() on another CPU, delivered just
# after it): microseconds in fact; the sources are checked for far longer.
STRAY_WINDOW_S = 0.05
# Datagrams an intercepted direction reads in a row before it lets other tasks run.
FAIRNESS_READS = 16
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
        "_peer",
        "_trusted_from",
        "datagrams",
        "direction",
        "end",
        "errno",
        "flow",
        "held",
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
        self.held: bytes | None = None  # read, but the sink's buffer was full
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

    def take(self, data: bytes) -> None:
        """A datagram of this direction that reached the listener (the session's first, or
        one that was in flight while the session was set up): relayed as if read here."""
        self.datagrams += 1
        self.read += len(data)
        inbox = self.inbox
        if inbox is None:
            inbox = self.inbox = deque()
        elif len(inbox) >= INBOX_DATAGRAMS:
            self._drop(Drop.QUEUE_FULL)
            return
        inbox.append(data)
        self._look_again()

    def _next_in_inbox(self) -> bytes:
        inbox = self.inbox
        assert inbox is not None
        datagram = inbox.popleft()
        if not inbox:
            self.inbox = None
        return datagram

    def _look_again(self) -> None:
        """Make whoever moves this direction look at it now, as an edge on its source would:
        the interceptors' reader is woken, the pump is given a turn here.

        If that turn leaves more to move, the pump keeps its place and gets its next turn
        with the session's next edge: the reactor's queue of carried-over pumps is its own.
        """
        readiness = self.readiness
        readiness.clear(self.readable)
        if readiness.notify(self.readable):
            readiness.run_pumps()
            readiness.queued = False

    # -- the plain path: a pump for the reactor ----------------------------------------------

    def turn(self) -> Turn:
        """Move up to ``TURN_DATAGRAMS`` datagrams without blocking."""
        if self.switching:
            return _DONE  # (with no ``end``): the task takes the direction back
        if self.held is not None or self.inbox is not None:
            waiting = self._send_waiting()
            if waiting is not None:
                return waiting
        readiness, readable, writable = self.readiness, self.readable, self.writable
        source, sink, buffer = self.source, self.sink, self._buffer
        for _ in range(TURN_DATAGRAMS):
            if not readiness.bits & readable:
                return _STUCK
            try:
                if self._checking:
                    size = self._receive_checked()
                    if size < 0:
                        continue  # a stray, handed on
                else:
                    size = source.recv_into(buffer)
            except BlockingIOError:
                readiness.clear(readable)
                if self._checking and time.monotonic() >= self._trusted_from:
                    self._checking = False
                return _STUCK
            except OSError as exc:
                if self._gone(exc, _SOURCE_GONE):
                    return _DONE
                continue
            self.datagrams += 1
            self.read += size
            try:
                sink.send(buffer[:size])
            except BlockingIOError:
                self.held = bytes(buffer[:size])
                readiness.clear(writable)
                return _STUCK
            except OSError as exc:
                if self._gone(exc, _SINK_GONE, dropping=True):
                    return _DONE
                continue
            self.written += size
        return _MORE

    def _receive_checked(self) -> int:
        """One datagram into the buffer, its source checked: its size, or -1 for a stray
        (handed on by ``_stray``)."""
        buffer = self._buffer
        size, sender = self.source.recvfrom_into(buffer)
        peer = self._peer
        # An IPv4 sender is exactly the peer's pair; IPv6 adds flow info and scope.
        if sender != peer and sender[:2] != peer:
            self._stray(bytes(buffer[:size]), sender)
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
                self._send(held)
            else:
                self._send(self._next_in_inbox())
        return _DONE if self.end is not None else None

    def _send(self, datagram: bytes | memoryview) -> None:
        """Send one datagram, or hold it (a copy) while the sink's buffer is full."""
        try:
            self.sink.send(datagram)
        except BlockingIOError:
            self.held = bytes(datagram)
            self.readiness.clear(self.writable)
            return
        except OSError as exc:
            self._gone(exc, _SINK_GONE, dropping=True)
            return
        self.written += len(datagram)

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
            if not await self.send_one(held):
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
) -> tuple[DatagramWay, DatagramWay]:
    """A session's two directions, client to server first, on one ``readiness``.

    ``client`` is the socket facing the client (bound to the original destination),
    ``server`` the one facing the server (bound to the client's address). A stray on the
    client side goes to ``on_stray(data, its client, the session's server)``; one on the
    server side (a datagram to the client's address from anyone but the server) is nobody's,
    and is dropped.
    """
    return (
        DatagramWay(
            Direction.CLIENT_TO_SERVER, client, server, readiness, buffer, drops, flow, on_stray
        ),
        DatagramWay(
            Direction.SERVER_TO_CLIENT, server, client, readiness, buffer, drops, flow, None
        ),
    )
