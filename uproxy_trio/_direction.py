"""One direction of a flow: how it reads, writes, splices, holds what the sink would not take,
and how it ends.

``DirectionState`` holds the decisions and no sockets, so each can be tested exactly: which
step comes next, when a direction switches between copying and splicing, what it holds, how
it ended. ``Way`` adds the sockets and moves the bytes, on one of two paths:

* **plain** (no interceptor): ``Way`` is a ``Pump``. Its task hands it to the reactor
  (``Readiness.pump``), which runs it on each edge and wakes the task once, when the direction
  is over (``end`` then says how). Small reads (requests, responses, keystrokes) go through
  ``recv_into``/``send`` on one buffer shared by every flow, two system calls and no
  allocation; once a read fills that buffer the direction is moving bulk and switches to
  splice(2) through a pipe, where the bytes never enter Python; when a splice comes back
  small it switches back (HAProxy's splice-auto).
* **intercepted**: the direction's task reads chunks for the interceptor chain (``_Tap``,
  through the live interceptors' ``LiveSegment``) and writes what the chain yields
  (``Way.send_all``), waiting on the same readiness.

A direction moves between the two paths while it runs when its route's live interceptors
change (``_live.changed``): the reactor lets its pump go (bytes it holds are delivered first on
the other path), or its live segment ends at a chunk boundary.

Nothing awaits between reading into the shared buffer and writing it out, so one buffer is
enough. What the sink does not take at once stays with the direction (a copy of at most one
read, or the bytes already in its pipe) and the direction reads nothing more until that is
written: every flow holds a bounded amount.
"""

from __future__ import annotations

import enum
import errno
import fcntl
import os
import socket
import struct
import termios
from collections.abc import Callable, Sequence

import trio

from ._ending import CloseFlow, EndKind, ResetFlow
from ._flow import Direction, Flow
from ._interceptor import Interceptor, run_chain
from ._live import FAIRNESS_READS, POKED_BITS, LiveSegment, until_readable
from ._readiness import PEER_CLOSED, READABLE, WRITABLE, Readiness, Side, Turn, bit
from ._splice import SPLICE_FLAGS, Pipe, PipePool

# The shared buffer for plain reads. A read that fills it means bulk data, which then moves
# by splice(2) instead.
READ_SIZE = 65536

# A splice that moves less than this means the bulk is over: back to recv/send.
SPLICE_MIN_BURST = 16384

# A pump's turn ends once it has delivered this much, so that one bulk flow cannot keep the
# reactor from the others (a turn of 1 MiB is about half a millisecond here).
TURN_BYTES = 1 << 20


# Interceptors get chunks of up to INTERCEPT_READ_SIZE: large reads, fewer chunks, less
# overhead each (512 KiB moved about 12% more than 256 KiB through an identity interceptor).
# A read starts at INTERCEPT_FIRST_READ and grows while reads fill it, so a small message
# does not pay for allocating half a megabyte.
INTERCEPT_FIRST_READ = 65536
INTERCEPT_READ_SIZE = 524288

# Bytes in a socket's send queue, not yet acknowledged by the peer (<linux/sockios.h>).
SIOCOUTQ = getattr(termios, "TIOCOUTQ", 0x5411)
_INT = struct.Struct("i")

_EMPTY = memoryview(b"")


class Step(enum.Enum):
    """What a direction does next."""

    COPY = "copy"
    """Read into the shared buffer and send it on."""
    SPLICE = "splice"
    """Splice a burst from the source into the pipe, and on to the sink."""
    FLUSH = "flush"
    """Write what is held (in the backlog or the pipe)."""
    WAIT_READABLE = "wait_readable"
    """Nothing held and the source has nothing: wait for its next edge."""
    WAIT_WRITABLE = "wait_writable"
    """Bytes held and the sink is full: wait for it to take more."""
    YIELD = "yield"
    """This turn's bytes are used up: let the other flows go first."""
    END = "end"
    """The direction is over (``end`` says how)."""


_COPY, _SPLICE, _FLUSH, _YIELD, _END = Step.COPY, Step.SPLICE, Step.FLUSH, Step.YIELD, Step.END
_EOF, _SOURCE_RESET, _SINK_RESET = EndKind.EOF, EndKind.SOURCE_RESET, EndKind.SINK_RESET


class DirectionState:
    """A direction's decisions, with no sockets in them.

    ``held`` counts bytes read but not yet delivered, wherever they wait; ``read`` and
    ``written`` count bytes taken from the source and handed to the sink's kernel.
    """

    __slots__ = ("can_splice", "end", "held", "read", "splicing", "written")

    def __init__(self, can_splice: bool) -> None:
        self.can_splice = can_splice
        self.splicing = False
        self.held = 0
        self.read = 0
        self.written = 0
        self.end: EndKind | None = None

    def next_step(self, readable: int, writable: int, moved: int) -> Step:
        """The next step, from whether the source may be read and the sink written, and how
        much this turn has moved already.

        Held bytes go out before anything more is read, and the EOF is only taken once they
        have: every byte read before a FIN is delivered before the FIN is passed on.
        """
        if self.end is not None:
            return _END
        if self.held:
            return _FLUSH if writable else Step.WAIT_WRITABLE
        if not readable:
            return Step.WAIT_READABLE
        if moved >= TURN_BYTES:
            return _YIELD
        return _SPLICE if self.splicing else _COPY

    def copied(self, size: int, capacity: int) -> None:
        """A read into the shared buffer returned ``size`` bytes (0: the source's EOF).

        A read that fills the buffer means bulk: splice from now on, if these sockets can.
        """
        if size == 0:
            self.end = _EOF
            return
        self.read += size
        self.held += size
        if size == capacity and self.can_splice:
            self.splicing = True

    def spliced(self, size: int) -> None:
        """A splice into the pipe moved ``size`` bytes (0: the source's EOF).

        A small burst means the bulk is over: back to copying, which costs less per message.
        """
        if size == 0:
            self.end = _EOF
            return
        self.read += size
        self.held += size
        if size < SPLICE_MIN_BURST:
            self.splicing = False

    def delivered(self, size: int) -> None:
        """The sink took ``size`` of the held bytes."""
        self.written += size
        self.held -= size

    def splice_refused(self) -> None:
        """The kernel cannot splice these sockets: copy for the rest of the flow."""
        self.can_splice = self.splicing = False

    @staticmethod
    def drains_to_eof(size: int, capacity: int, peer_closed: int) -> bool:
        """Whether a read of ``size`` bytes, ``capacity`` asked, took the last bytes before
        the source's EOF: it came back short after the peer's FIN had arrived.

        Those bytes are sent to go out with the FIN. Sent at once, they would reach the other
        side a scheduling round before the FIN (which the direction's task passes on), and a
        client that closes as soon as it has a response would close first: the TIME_WAIT, and
        its hunt for a free port, would move from the proxy to the client.
        """
        return size < capacity and bool(peer_closed)

    @staticmethod
    def emptied(size: int, capacity: int, peer_closed: int) -> bool:
        """Whether a read of ``size`` bytes, ``capacity`` asked, emptied the socket.

        A short read did, so the direction can wait for the next edge rather than pay a failing
        read (and its exception) per message; unless the peer has closed: the kernel reported
        that edge already, and the EOF is still to be read.
        """
        return size < capacity and not peer_closed


class SharedBuffers:
    """The copying machinery one proxy shares between its flows: the read buffer and the
    pipe pool. Used only from the proxy's Trio thread."""

    def __init__(self, pipes: PipePool | None) -> None:
        self.buffer = memoryview(bytearray(READ_SIZE))
        self.pipes = pipes

    @property
    def can_splice(self) -> bool:
        return self.pipes is not None


# A direction's readiness bits (source readable, source closed, sink writable).
_BITS = {
    Direction.CLIENT_TO_SERVER: (
        bit(Side.CLIENT, READABLE),
        bit(Side.CLIENT, PEER_CLOSED),
        bit(Side.SERVER, WRITABLE),
    ),
    Direction.SERVER_TO_CLIENT: (
        bit(Side.SERVER, READABLE),
        bit(Side.SERVER, PEER_CLOSED),
        bit(Side.CLIENT, WRITABLE),
    ),
}


class Way(DirectionState):
    """One direction of a flow with its sockets: a pump for the reactor when no interceptor
    touches it, the source and sink of an interceptor chain when one does."""

    __slots__ = (
        "_shared",
        "backlog",
        "closed",
        "direction",
        "mask",
        "picked",
        "pipe",
        "readable",
        "readiness",
        "segment",
        "sink",
        "source",
        "switching",
        "writable",
    )

    def __init__(
        self,
        direction: Direction,
        source: socket.socket,
        sink: socket.socket,
        readiness: Readiness,
        shared: SharedBuffers,
    ) -> None:
        super().__init__(shared.can_splice)
        self.direction = direction
        self.source = source
        self.sink = sink
        self.readiness = readiness
        self._shared = shared
        self.readable, self.closed, self.writable = _BITS[direction]
        self.mask = self.readable | self.writable
        self.backlog = _EMPTY
        self.pipe: Pipe | None = None
        # Live interceptors (``_live``): a change asks the direction to look again
        # (``switching``); ``segment`` is set while it runs them; ``picked`` remembers which
        # of those that pick their flows (``for_flows``) picked this one.
        self.switching = False
        self.segment: LiveSegment | None = None
        self.picked: dict[int, bool] | None = None

    # -- the plain path ---------------------------------------------------------------------

    def turn(self) -> Turn:
        """Move what can be moved now, up to ``TURN_BYTES``, without blocking."""
        if self.switching:
            return Turn.DONE  # (with no ``end``): the task takes the direction back
        readiness, readable, writable = self.readiness, self.readable, self.writable
        moved = 0
        while True:
            bits = readiness.bits
            step = self.next_step(bits & readable, bits & writable, moved)
            if step is _COPY:
                moved += self._copy()
            elif step is _FLUSH:
                moved += self._flush()
            elif step is _SPLICE:
                moved += self._splice()
            elif step is _END:
                return Turn.DONE
            elif step is _YIELD:
                return Turn.MORE
            else:
                return Turn.STUCK

    def _copy(self) -> int:
        buffer = self._shared.buffer
        try:
            size = self.source.recv_into(buffer)
        except BlockingIOError:
            self.readiness.clear(self.readable)
            return 0
        except OSError:
            self.end = _SOURCE_RESET
            return 0
        capacity = len(buffer)
        self.copied(size, capacity)
        if not size:
            return 0
        peer_closed = self.readiness.bits & self.closed
        try:
            if self.drains_to_eof(size, capacity, peer_closed):
                # The source's FIN is next: let these bytes leave with it, when the task passes
                # the FIN on (shutdown and close push them out), as the server sent them.
                sent = self.sink.send(buffer[:size], socket.MSG_MORE)
            else:
                sent = self.sink.send(buffer[:size])
        except BlockingIOError:
            sent = 0
        except OSError:
            self.end = _SINK_RESET
            return 0
        self.delivered(sent)
        if self.held:
            # The sink is full: keep the rest out of the shared buffer until it is writable.
            self.backlog = memoryview(bytes(buffer[sent:size]))
            self.readiness.clear(self.writable)
        if self.emptied(size, capacity, peer_closed):
            self.readiness.clear(self.readable)
        return sent

    def _splice(self) -> int:
        pipe = self.pipe
        if pipe is None:
            pipes = self._shared.pipes
            assert pipes is not None  # splicing is only chosen when there are pipes
            try:
                pipe = self.pipe = pipes.take()
            except OSError:
                self.splicing = False  # no descriptor for a pipe right now: copy instead
                return 0
        try:
            size = os.splice(self.source.fileno(), pipe.write_fd, pipe.size, flags=SPLICE_FLAGS)
        except BlockingIOError:
            # The bulk has paused: the pipe goes back to the pool until bytes move again.
            self.readiness.clear(self.readable)
            self.release()
            return 0
        except OSError as exc:
            self.release()
            if exc.errno in (errno.EINVAL, errno.ENOSYS):
                self.splice_refused()
            else:
                self.end = _SOURCE_RESET
            return 0
        # No emptied-socket guess here: a splice can stop short when the pipe runs out of
        # slots, with bytes still waiting in the socket.
        self.spliced(size)
        return self._flush() if size else 0

    def _flush(self) -> int:
        """Write what is held (backlog or pipe) until it is gone or the sink is full; returns
        the bytes delivered."""
        held, delivered, sink = self.held, 0, self.sink
        backlog = self.backlog
        try:
            if backlog:
                while delivered < held:
                    delivered += sink.send(backlog[delivered:])
            else:
                assert self.pipe is not None
                read_fd, sink_fd = self.pipe.read_fd, sink.fileno()
                while delivered < held:
                    sent = os.splice(read_fd, sink_fd, held - delivered, flags=SPLICE_FLAGS)
                    if not sent:
                        raise BlockingIOError
                    delivered += sent
        except BlockingIOError:
            self.readiness.clear(self.writable)
        except OSError:
            self.end = _SINK_RESET
        self.delivered(delivered)
        if backlog:
            self.backlog = backlog[delivered:] if self.held else _EMPTY
        if not self.held and not self.splicing:
            self.release()
        return delivered

    def detached(self) -> None:
        """The reactor has let this direction go (it is over, its task was cancelled, or it
        moves to the interceptor path). Bytes held in the pipe stay, for that path to deliver
        first; the task releases the pipe when the direction is over."""
        if not self.held:
            self.release()

    def release(self) -> None:
        """Give the pipe back to the pool, or close it if it still holds bytes."""
        pipe, self.pipe = self.pipe, None
        if pipe is None:
            return
        pipes = self._shared.pipes
        if (self.held and not self.backlog) or pipes is None:
            pipe.close()
        else:
            pipes.give_back(pipe)

    # -- the intercepted path ---------------------------------------------------------------

    async def relay_intercepted(
        self,
        flow: Flow,
        chain: Sequence[Interceptor],
        live: Callable[[], Sequence[Interceptor]],
        nursery: trio.Nursery,
    ) -> tuple[EndKind, BaseException | None] | None:
        """Move this direction through its live interceptors (``live()`` says which, now;
        their tasks run in the flow's ``nursery``) and ``chain`` until it ends: how it ended,
        and what an interceptor raised if that was the end; ``None`` if it ended because
        nothing intercepts it any more (back to the plain path, at a chunk boundary: nothing
        read is left behind)."""
        if self.held and not await self._deliver_held():
            return _SINK_RESET, None
        segment = LiveSegment(flow, _Tap(self), self.direction, live, bool(chain), nursery)
        self.segment = segment
        try:
            delivered = await run_chain(flow, self.direction, chain, segment, self.send_all)
        except Exception as exc:  # noqa: BLE001 - whatever an interceptor raises ends its flow only
            # The source's reset reached the chain as an exception, which an interceptor may
            # even have swallowed: the reset is what ended the direction, not the interceptor.
            if self.end is _SOURCE_RESET:
                return _SOURCE_RESET, None
            if isinstance(exc, CloseFlow):
                return EndKind.INTERCEPTOR_CLOSED, None
            if isinstance(exc, ResetFlow):
                return EndKind.INTERCEPTOR_RESET, None
            return EndKind.INTERCEPTOR_FAILED, exc
        finally:
            self.segment = None
            segment.close()
        if self.end is _SOURCE_RESET:
            return _SOURCE_RESET, None
        if not delivered:
            return _SINK_RESET, None  # (live stages left, if any, go with the flow's reset)
        if segment.switched:
            return None
        return _EOF, None

    async def _deliver_held(self) -> bool:
        """Deliver what the plain path read and the sink has not taken yet (in the backlog or
        the pipe) before anything else; false if the sink is gone."""
        while self.held and self.end is None:
            self._flush()
            if self.held and self.end is None:
                await self.readiness.wait(self.writable)
        self.release()
        return self.end is None

    async def send_all(self, data: bytes) -> bool:
        """Write all of ``data``, waiting while the sink is full; false if the sink is gone.

        A flow being reset sends nothing more: the cancellation that stops it is taken here,
        before the first byte, even when this task was already woken.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        readiness, writable, sink = self.readiness, self.writable, self.sink
        view = memoryview(data)
        while view:
            try:
                sent = sink.send(view)
            except BlockingIOError:
                readiness.clear(writable)
                await readiness.wait(writable)
                continue
            except OSError:
                return False
            self.written += sent
            view = view[sent:]
        return True

    # -- progress ---------------------------------------------------------------------------

    def acknowledged(self) -> int:
        """Bytes the sink's peer has acknowledged: delivered to the kernel, less what still
        waits in its send queue. A slow reader draining a full send buffer makes progress
        here while nothing is read or written."""
        try:
            queued: int = _INT.unpack(fcntl.ioctl(self.sink.fileno(), SIOCOUTQ, b"\0" * 4))[0]
        except OSError:
            queued = 0
        return self.written - queued


class _Tap:
    """A direction's source, read in chunks for its interceptors.

    A reset raises, and is remembered in the direction's ``end``, since an interceptor between
    this reader and the relay may swallow the exception; the relay must still reset the flow
    rather than pass on a FIN. Waiting loses nothing if cancelled (a live interceptor coming or
    going interrupts it).
    """

    __slots__ = ("_poked", "_reads", "_size", "_way")

    def __init__(self, way: Way) -> None:
        self._way = way
        self._reads = 0
        self._size = INTERCEPT_FIRST_READ
        self._poked = POKED_BITS[way.direction]

    async def read(self, interruptible: bool = False) -> bytes | None:
        """The next chunk, ``None`` at the EOF. ``interruptible``: raise ``Interrupted`` when
        ``_live.changed`` pokes, rather than go on waiting (the direction's own task reads the
        source directly, with no live interceptor between)."""
        way = self._way
        readiness, readable, source, size = way.readiness, way.readable, way.source, self._size
        poked = self._poked if interruptible else 0
        if self._reads >= FAIRNESS_READS:
            # (before reading, never after: a cancellation here loses nothing)
            await trio.lowlevel.checkpoint()
            self._reads = 0
        while True:
            if await until_readable(readiness, readable, poked):
                self._reads = 0
            try:
                data = source.recv(size)
            except BlockingIOError:
                readiness.clear(readable)
                continue
            except OSError:
                way.end = _SOURCE_RESET
                raise
            if not data:
                return None
            way.read += len(data)
            if way.emptied(len(data), size, readiness.bits & way.closed):
                readiness.clear(readable)
            self._size = (
                min(size * 4, INTERCEPT_READ_SIZE) if len(data) == size else INTERCEPT_FIRST_READ
            )
            self._reads += 1
            return data


def both_ways(
    client: socket.socket, server: socket.socket, readiness: Readiness, shared: SharedBuffers
) -> tuple[Way, Way]:
    """A connected flow's two directions, client to server first, on one ``readiness``."""
    return (
        Way(Direction.CLIENT_TO_SERVER, client, server, readiness, shared),
        Way(Direction.SERVER_TO_CLIENT, server, client, readiness, shared),
    )
