"""Relaying what no interceptor touches: both directions of a plain flow, moved by the reactor
as its sockets' edges come in (``Relay.run``), or one direction of an intercepted flow, in a
task of its own (``Relay.run_direction``).

Each direction (a ``Way``) moves what its source has whenever the flow's ``Readiness`` says
it may, choosing the path per read like HAProxy's splice-auto: small reads (requests,
responses, keystrokes) go through ``recv_into``/``send`` on one buffer shared by every flow,
two system calls and no allocation; once a read fills that buffer the direction is moving
bulk data and switches to splice(2) through a pipe, where the bytes never enter Python; when a
splice comes back small it switches back.

Nothing awaits between reading into the shared buffer and writing it out, so one buffer is
enough. What the sink does not take at once stays with the direction (a copy of at most one
read, or the bytes already in its pipe) and the direction reads nothing more until that is
written: every flow holds a bounded amount.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass

import trio

from ._ending import EndKind
from ._flow import Direction
from ._readiness import FINISHED, PEER_CLOSED, READABLE, WRITABLE, Readiness, Side, bit
from ._splice import SPLICE_FLAGS, Pipe, PipePool

# The shared buffer for plain reads. A read that fills it means bulk data, which then moves
# by splice(2) instead.
READ_SIZE = 65536

# A splice that moves less than this means the bulk is over: back to recv/send.
SPLICE_MIN_BURST = 16384

# A flow whose bytes never run out (its sockets always ready) yields to the other tasks after
# this many rounds or this many bytes, as Trio's fairness asks.
FAIRNESS_ROUNDS = 16
FAIRNESS_BYTES = 4 << 20


# A direction's readiness bits (source readable, source closed, sink writable), for
# client-to-server (True) and server-to-client (False).
_BITS = {
    True: (
        bit(Side.CLIENT, READABLE),
        bit(Side.CLIENT, PEER_CLOSED),
        bit(Side.SERVER, WRITABLE),
    ),
    False: (
        bit(Side.SERVER, READABLE),
        bit(Side.SERVER, PEER_CLOSED),
        bit(Side.CLIENT, WRITABLE),
    ),
}


@dataclass(slots=True)
class Counts:
    """What one direction moved: bytes read from its source and delivered to its sink."""

    read: int = 0
    written: int = 0


class Way:
    """One direction of a flow between two wake-ups: where it reads and writes, what it has
    read but not yet written, and how it ended (``end``, None while it goes on)."""

    __slots__ = (
        "backlog",
        "can_splice",
        "closed",
        "counts",
        "direction",
        "end",
        "in_pipe",
        "pipe",
        "readable",
        "sink",
        "source",
        "splicing",
        "writable",
    )

    def __init__(
        self, direction: Direction, source: socket.socket, sink: socket.socket, can_splice: bool
    ) -> None:
        self.direction = direction
        self.source = source
        self.sink = sink
        self.counts = Counts()
        self.readable, self.closed, self.writable = _BITS[direction is Direction.CLIENT_TO_SERVER]
        self.can_splice = can_splice
        self.splicing = False
        self.backlog = memoryview(b"")
        self.pipe: Pipe | None = None
        self.in_pipe = 0
        self.end: EndKind | None = None


class Relay:
    """The copying machinery one proxy shares between its flows: the read buffer and the
    pipe pool. Owned by one proxy and used only from its Trio thread."""

    def __init__(self, pipes: PipePool | None) -> None:
        self._buffer = memoryview(bytearray(READ_SIZE))
        self._pipes = pipes

    @property
    def can_splice(self) -> bool:
        return self._pipes is not None

    async def run(
        self,
        ways: tuple[Way, Way],
        readiness: Readiness,
        ended: Callable[[Way], bool],
    ) -> None:
        """Move both directions until both have ended, or until ``ended`` (told of each
        direction's end, once) says the flow must stop.

        The reactor does the moving, as the sockets' edges come in (see ``Readiness.driver``):
        this task only starts it and sleeps until the flow is over, so a request and its
        response cost no trip through the scheduler.
        """
        drive = _Drive(self, ways, readiness, ended)
        readiness.driver = drive.advance
        try:
            while drive.advance():
                await trio.lowlevel.checkpoint()
            await readiness.wait(FINISHED)
            if drive.error is not None:
                raise drive.error
        finally:
            readiness.driver = None
            for way in ways:
                self._release_pipe(way)

    async def run_direction(self, way: Way, readiness: Readiness) -> None:
        """Move one direction until it ends, in the calling task: for a direction that no
        interceptor touches when the other one has interceptors, and so a task of its own.
        Splices its bulk just the same."""
        moved = rounds = 0
        try:
            while way.end is None:
                delivered = self._pump(way, readiness)
                if delivered or way.end is not None:
                    moved += delivered
                    rounds += 1
                    if rounds >= FAIRNESS_ROUNDS or moved >= FAIRNESS_BYTES:
                        await trio.lowlevel.checkpoint()
                        moved = rounds = 0
                else:
                    # Stuck on its sink while it holds bytes, on its source otherwise.
                    held = way.in_pipe or way.backlog
                    await readiness.wait(way.writable if held else way.readable)
                    moved = rounds = 0
        finally:
            self._release_pipe(way)

    def _pump(self, way: Way, readiness: Readiness) -> int:
        """Move what can be moved now without waiting; returns the bytes delivered."""
        delivered = 0
        if way.in_pipe or way.backlog:
            if not readiness.bits & way.writable:
                return 0
            delivered = self._flush(way, readiness)
            if way.in_pipe or way.backlog or way.end is not None:
                return delivered
        if not readiness.bits & way.readable:
            return delivered
        if way.splicing:
            return delivered + self._splice(way, readiness)
        return delivered + self._copy(way, readiness)

    def _copy(self, way: Way, readiness: Readiness) -> int:
        buffer = self._buffer
        try:
            size = way.source.recv_into(buffer)
        except BlockingIOError:
            readiness.bits &= ~way.readable
            return 0
        except OSError:
            way.end = EndKind.SOURCE_RESET
            return 0
        if size == 0:
            way.end = EndKind.EOF
            return 0
        way.counts.read += size
        try:
            sent = way.sink.send(buffer[:size])
        except BlockingIOError:
            sent = 0
        except OSError:
            way.end = EndKind.SINK_RESET
            return 0
        way.counts.written += sent
        if sent < size:
            # The sink is full: keep the rest out of the shared buffer until it is writable.
            way.backlog = memoryview(bytes(buffer[sent:size]))
            readiness.bits &= ~way.writable
        if size == len(buffer):
            way.splicing = way.can_splice
        elif not readiness.bits & way.closed:
            # A read that returned less than the buffer emptied the socket: wait for its next
            # edge rather than pay a failing recv (and its exception) per message. Unless the
            # peer has closed: the kernel reported that edge already, and the EOF is still
            # to be read.
            readiness.bits &= ~way.readable
        return sent

    def _splice(self, way: Way, readiness: Readiness) -> int:
        pipe = way.pipe
        if pipe is None:
            assert self._pipes is not None  # splicing is only set when there are pipes
            try:
                pipe = way.pipe = self._pipes.take()
            except OSError:
                way.splicing = False  # no descriptor for a pipe right now: copy instead
                return 0
        try:
            size = os.splice(way.source.fileno(), pipe.write_fd, pipe.size, flags=SPLICE_FLAGS)
        except BlockingIOError:
            # The bulk has paused: the pipe goes back to the pool until bytes move again.
            readiness.bits &= ~way.readable
            self._release_pipe(way)
            return 0
        except OSError as exc:
            self._release_pipe(way)
            if exc.errno in (errno.EINVAL, errno.ENOSYS):
                way.can_splice = way.splicing = False  # not on these sockets: copy instead
            else:
                way.end = EndKind.SOURCE_RESET
            return 0
        if size == 0:
            way.end = EndKind.EOF
            return 0
        way.counts.read += size
        way.in_pipe = size
        # No emptied-socket guess here: a splice can stop short when the pipe runs out of
        # slots, with bytes still waiting in the socket.
        if size < SPLICE_MIN_BURST:
            way.splicing = False
        return self._flush(way, readiness)

    def _flush(self, way: Way, readiness: Readiness) -> int:
        """Write what the direction holds (pipe, then backlog) until it is gone or the sink
        is full; returns the bytes delivered."""
        delivered = 0
        sink = way.sink
        try:
            while way.in_pipe:
                assert way.pipe is not None
                sent = os.splice(way.pipe.read_fd, sink.fileno(), way.in_pipe, flags=SPLICE_FLAGS)
                way.in_pipe -= sent
                delivered += sent
            while way.backlog:
                sent = sink.send(way.backlog)
                way.backlog = way.backlog[sent:]
                delivered += sent
        except BlockingIOError:
            readiness.bits &= ~way.writable
        except OSError:
            way.end = EndKind.SINK_RESET
        way.counts.written += delivered
        if not way.in_pipe and not way.splicing:
            self._release_pipe(way)
        return delivered

    def _release_pipe(self, way: Way) -> None:
        """Give the pipe back if it is empty; close it if it still holds bytes."""
        pipe, way.pipe = way.pipe, None
        if pipe is None:
            return
        if way.in_pipe or self._pipes is None:
            pipe.close()
        else:
            self._pipes.give_back(pipe)


class _Drive:
    """One flow relayed by the reactor: ``advance`` runs each time one of its sockets has an
    edge, moves what can be moved, and tells the flow's task when the flow is over."""

    __slots__ = ("_ended", "_open", "_readiness", "_relay", "error")

    def __init__(
        self,
        relay: Relay,
        ways: tuple[Way, Way],
        readiness: Readiness,
        ended: Callable[[Way], bool],
    ) -> None:
        self._relay = relay
        self._open = list(ways)
        self._readiness = readiness
        self._ended = ended
        self.error: Exception | None = None

    def advance(self) -> bool:
        """Move until both directions are stuck; true if there is more to move but this
        flow's turn is over (it is called again after the others have had theirs)."""
        if not self._open:
            return False
        open_ways, readiness, pump = self._open, self._readiness, self._relay._pump
        rounds = moved = 0
        try:
            while True:
                progressed = False
                for way in open_ways:
                    delivered = pump(way, readiness)
                    moved += delivered
                    progressed = progressed or delivered > 0 or way.end is not None
                if open_ways[0].end is not None or open_ways[-1].end is not None:
                    for way in tuple(open_ways):
                        if way.end is not None:
                            open_ways.remove(way)
                            self._relay._release_pipe(way)
                            if self._ended(way):
                                open_ways.clear()
                    if not open_ways:
                        readiness.finish()
                        return False
                if not progressed:
                    return False
                rounds += 1
                if rounds >= FAIRNESS_ROUNDS or moved >= FAIRNESS_BYTES:
                    return True
        except Exception as exc:  # noqa: BLE001 - a bug here must end this flow, not the reactor
            self.error = exc
            open_ways.clear()
            readiness.finish()
            return False
