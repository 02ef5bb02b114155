"""What one edge-triggered epoll has seen of a flow's sockets, and who is waiting on it.

``trio.lowlevel.wait_readable`` arms a one-shot registration in Trio's epoll for every wait and
disarms it after the wake-up: two or three ``epoll_ctl`` calls per wait, about six per short
flow. Here each socket is registered once, for reading and writing, edge-triggered, and one
``Reactor`` task turns the kernel's edges into bits on the flow's ``Readiness``. A short flow
then costs two ``epoll_ctl`` calls.

Two kinds of waiter park on a ``Readiness``:

* a task waiting for some bits (``Readiness.wait``), woken by the edge that sets one of them:
  a connect, or a direction that runs interceptors;
* a task that has handed the reactor a ``Pump`` (``Readiness.pump``): the reactor runs the pump
  itself on each edge, so a direction that no interceptor touches costs no trip through Trio's
  scheduler per message, and wakes the task once, when the pump reports its direction over.

Edge-triggered means the kernel reports a change once, so the bits are "may be ready": whoever
reads or writes clears a bit when the socket says it would block (``Readiness.clear``), and
waits only on cleared bits. Any data arriving after that is a new edge, so nothing is missed;
a stale bit costs at most one read that finds nothing.

Only the reactor sets a socket's bits and runs pumps: from its epoll, or from
``Reactor.kick``, for news about a flow that came another way (a datagram the UDP listener
hands to its session), which wakes a sleeping reactor and is handled in its next round like
any edge. ``Readiness.poke`` sets the other bits, ones no socket has, to wake a task that
waits on something else as well (a direction's live interceptors changing).

The reactor is fair: one round runs pumps for at most ``ROUND_S`` and a pump moves at most a
turn's worth of bytes (the pump's own bound) before the next one goes; what is left over is
carried to the next round, after Trio has run every other task and polled its own I/O. Pumps
woken by a fresh edge go before the ones carried over, so a new or interactive flow is not
queued behind every bulk flow.
"""

from __future__ import annotations

import enum
import os
import select
import socket
import time
from collections import deque
from types import TracebackType
from typing import Protocol, Self

import outcome
import trio
from trio.lowlevel import Abort, RaiseCancelT

# Edges per reactor wake-up at most; more wait for the next round.
MAX_EVENTS = 1024

# How long one reactor round may run pumps before it lets Trio run everything else (accepts,
# timers, interceptor tasks, signals). A new flow waits a round at each of its steps (accept,
# connect, first bytes), so the round bounds its latency beside bulk flows: with 200 iperf3
# streams through the proxy, connect to first echoed byte had a p90 of 38-44 ms at 4 ms
# rounds, 13-25 ms at 1 ms (HAProxy 14-21 ms). A round costs about 3 us more than its pumps,
# 0.3% at this length; a pump's turn (``TURN_BYTES``) is about half of it.
ROUND_S = 0.001

# <sys/epoll.h>, looked up so that the package still imports where there is no epoll (to
# unit-test an interceptor on a laptop, say); serving needs Linux anyway.
_IN, _OUT, _ERR, _HUP, _RDHUP, _ET = (
    getattr(select, name, value)
    for name, value in (
        ("EPOLLIN", 0x1),
        ("EPOLLOUT", 0x4),
        ("EPOLLERR", 0x8),
        ("EPOLLHUP", 0x10),
        ("EPOLLRDHUP", 0x2000),
        ("EPOLLET", 1 << 31),
    )
)
_REGISTER = _IN | _OUT | _RDHUP | _ET
_READ_EVENTS = _IN | _RDHUP | _HUP | _ERR
_WRITE_EVENTS = _OUT | _HUP | _ERR
_CLOSED_EVENTS = _RDHUP | _HUP | _ERR


class Side(enum.IntEnum):
    """Which end of a flow a socket faces; the value places its three bits in ``Readiness``."""

    CLIENT = 0
    SERVER = 3


READABLE = 1
"""The socket may have bytes (or an EOF, or an error) to read."""
WRITABLE = 2
"""The socket may take more bytes."""
PEER_CLOSED = 4
"""The peer has sent its FIN (or reset): sticky, never cleared. A read that returns less than
asked then does not mean the socket is empty, since the EOF is still to be read."""

POKED = 1 << 6
"""The first of the bits no socket sets: ``Readiness.poke`` sets them, to wake a task that
waits on its socket and on something else too (a direction's interceptors changing)."""


def bit(side: Side, kind: int) -> int:
    """The bit for ``kind`` (``READABLE``, ``WRITABLE``, ``PEER_CLOSED``) of ``side``'s socket."""
    return kind << side


class Turn(enum.Enum):
    """What a pump's turn ended with."""

    STUCK = "stuck"
    """It waits for an edge: the reactor runs it again when one comes."""
    MORE = "more"
    """It could move more, but its turn is over: it goes again after the others."""
    DONE = "done"
    """Its direction is over: the reactor lets it go and wakes its task."""


class Pump(Protocol):
    """Moves one direction's bytes without blocking, a bounded amount per ``turn``."""

    @property
    def mask(self) -> int:
        """The readiness bits the pump moves on (its source readable, its sink writable)."""
        ...

    def turn(self) -> Turn: ...

    def detached(self) -> None:
        """The pump will not be run again (its direction is over, or its task cancelled): let
        go of what it holds."""


class _Parked:
    """A task parked on some of a flow's bits, with the pump the reactor runs for it, if any.

    Its ``abort`` is what Trio calls to cancel the wait: a bound method rather than a closure
    per wait, since thousands of idle flows each keep two of these.
    """

    __slots__ = ("mask", "more", "pump", "readiness", "task")

    def __init__(self, readiness: Readiness, mask: int, pump: Pump | None) -> None:
        self.readiness = readiness
        self.mask = mask
        self.task = trio.lowlevel.current_task()
        self.pump = pump
        self.more = False  # the pump's last turn ended with more to move

    def abort(self, _: RaiseCancelT) -> Abort:
        self.readiness._forget(self)
        return Abort.SUCCEEDED


class Readiness:
    """What the reactor has seen of one flow's two sockets, and the tasks parked on it.

    At most one task waits on any given bit, as with Trio's ``BusyResourceError``: two tasks
    reading the same socket would each see half the bytes.
    """

    __slots__ = ("_bits", "_edges", "_parked", "_pumped", "_waiting", "queued")

    def __init__(self, bits: int = 0) -> None:
        self._bits = bits
        self._edges = 0  # bits newly set since the pumps last ran
        self._parked: list[_Parked] = []
        self._waiting = 0  # tasks parked on bits
        self._pumped = 0  # tasks parked while the reactor runs their pumps
        self.queued = False
        """Set while the reactor has this flow's pumps in its queue (so it holds it once)."""

    @property
    def bits(self) -> int:
        return self._bits

    def clear(self, mask: int) -> None:
        """The socket said it would block (or a short read emptied it): forget those edges."""
        self._bits &= ~mask

    async def wait(self, mask: int) -> None:
        """Sleep until one of the bits in ``mask`` is set (at once if one is)."""
        if self._bits & mask:
            await trio.lowlevel.checkpoint()
            return
        await trio.lowlevel.wait_task_rescheduled(self._park(mask, None).abort)

    async def pump(self, pump: Pump) -> None:
        """Run ``pump`` until its direction is over: here while it has bytes to move, then by
        the reactor, on each edge, while this task sleeps.

        Cancelling the task detaches the pump at once: from then on not a byte moves.
        """
        try:
            while True:
                turn = pump.turn()
                if turn is Turn.DONE:
                    return
                if turn is Turn.STUCK:
                    break
                await trio.lowlevel.checkpoint()
            await trio.lowlevel.wait_task_rescheduled(self._park(pump.mask, pump).abort)
        finally:
            pump.detached()

    def poke(self, bits: int) -> None:
        """Set ``bits`` (``POKED`` and up, never a socket's) and wake the tasks waiting on
        them; whoever sees them clears them."""
        self._bits |= bits
        if self._waiting:
            for parked in [parked for parked in self._parked if parked.mask & bits]:
                if parked.pump is None:
                    self._unpark(parked, outcome.Value(None))

    def release(self, pump: object) -> None:
        """Wake the task that handed the reactor ``pump``, as if its direction were over
        (its pump must now say so when turned, in case it is not parked but queued)."""
        for parked in self._parked:
            if parked.pump is pump:
                self._unpark(parked, outcome.Value(None))
                return

    def notify(self, bits: int) -> bool:
        """Set ``bits`` (the reactor's job) and wake the tasks waiting for them; true if a
        pump should now run and the flow is not queued for that yet."""
        # A pump only waits on a bit it has cleared, so only a bit that was clear is news to
        # one; epoll reports a socket's every ready state with each edge ("writable" comes
        # along with every read), which would run both directions for each message.
        self._edges |= bits & ~self._bits
        self._bits |= bits
        if self._waiting:
            for parked in [parked for parked in self._parked if parked.mask & bits]:
                if parked.pump is None:
                    self._unpark(parked, outcome.Value(None))
        if self._pumped and not self.queued:
            self.queued = True
            return True
        return False

    def run_pumps(self) -> bool:
        """Give a turn to each pump parked here that an edge since the last round concerns,
        or that had more to move; true if any has more to move now.

        A request on a kept-alive connection is one edge on one socket: only the direction
        reading it (or writing to it) runs, not the other one too.
        """
        edges, self._edges = self._edges, 0
        more = False
        for parked in [
            parked
            for parked in self._parked
            if parked.pump is not None and (parked.more or parked.mask & edges)
        ]:
            pump = parked.pump
            assert pump is not None
            try:
                turn = pump.turn()
            except Exception as exc:  # noqa: BLE001 - a bug in a pump ends its own flow only
                self._unpark(parked, outcome.Error(exc))
                continue
            if turn is Turn.DONE:
                self._unpark(parked, outcome.Value(None))
            else:
                parked.more = turn is Turn.MORE
                more = more or parked.more
        return more

    def _park(self, mask: int, pump: Pump | None) -> _Parked:
        """Note the current task as parked on ``mask``; it then waits, with no await between."""
        for parked in self._parked:
            if parked.mask & mask:
                raise trio.BusyResourceError("another task is already waiting on these sockets")
        parked = _Parked(self, mask, pump)
        self._parked.append(parked)
        self._count(parked, 1)
        return parked

    def _forget(self, parked: _Parked) -> None:
        self._parked.remove(parked)
        self._count(parked, -1)

    def _unpark(self, parked: _Parked, result: outcome.Outcome[None]) -> None:
        self._forget(parked)
        trio.lowlevel.reschedule(parked.task, result)

    def _count(self, parked: _Parked, change: int) -> None:
        # Counted apart so that an edge costs no walk over the parked when nobody waits.
        if parked.pump is None:
            self._waiting += change
        else:
            self._pumped += change


class Reactor:
    """One edge-triggered epoll for the flows of one proxy, and the task that reads it.

    ``run`` must be running (in a nursery that outlives the flows) for any ``Readiness`` to
    change. Use as a context manager: leaving it closes the epoll.
    """

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._watched: dict[int, tuple[Readiness, Side]] = {}
        # ``kick``'s news for the next round, and the eventfd that wakes ``run`` for it when
        # it sleeps on the epoll.
        self._kicked: list[Readiness] = []
        self._asleep = False
        self._wakeup = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll.register(self._wakeup, _IN)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        trio.lowlevel.notify_closing(self._epoll.fileno())
        self._epoll.close()
        os.close(self._wakeup)

    def watch(self, sock: socket.socket, readiness: Readiness, side: Side) -> Watching:
        """Report ``sock``'s edges to ``readiness`` as ``side`` until the returned context ends.

        Leave that context before (or just after) closing the socket, with no await between.
        If the socket is ready already the kernel reports that at once, as a first edge.
        """
        fd = sock.fileno()
        self._epoll.register(fd, _REGISTER)
        self._watched[fd] = (readiness, side)
        return Watching(self._watched, fd, readiness)

    def kick(self, readiness: Readiness, bits: int) -> None:
        """Report ``bits`` of ``readiness`` as an edge from the kernel would be: news that
        reached the proxy another way than through the flow's own sockets (a datagram the UDP
        listener hands to its session). Waiting tasks wake now; pumps run in the reactor's
        next round, in the reactor's task, as for any edge."""
        if readiness.notify(bits):
            kicked = self._kicked
            kicked.append(readiness)
            if self._asleep and len(kicked) == 1:
                os.eventfd_write(self._wakeup, 1)

    async def run(self) -> None:
        """Turn edges into ``Readiness`` bits and run the pumps they call for, until
        cancelled."""
        epoll, watched, kicked, wakeup = self._epoll, self._watched, self._kicked, self._wakeup
        fileno = epoll.fileno()
        carried: deque[Readiness] = deque()
        clock = time.perf_counter
        while True:
            if carried or kicked:
                await trio.lowlevel.checkpoint()  # pumps with more to do: after the others
            else:
                self._asleep = True
                try:
                    await trio.lowlevel.wait_readable(fileno)
                finally:
                    self._asleep = False
            fresh: list[Readiness] = []
            for fd, events in epoll.poll(0, MAX_EVENTS):
                entry = watched.get(fd)
                if entry is None:
                    if fd == wakeup:
                        os.eventfd_read(wakeup)
                    continue
                readiness, side = entry
                bits = 0
                if events & _READ_EVENTS:
                    bits |= READABLE
                if events & _WRITE_EVENTS:
                    bits |= WRITABLE
                if events & _CLOSED_EVENTS:
                    bits |= PEER_CLOSED
                if readiness.notify(bits << side):
                    fresh.append(readiness)
            if kicked:
                fresh += kicked
                kicked.clear()
            # Fresh edges first, then the carried-over pumps, until the round's time is up.
            carried.extendleft(reversed(fresh))
            deadline = clock() + ROUND_S
            for _ in range(len(carried)):
                readiness = carried.popleft()
                if readiness.run_pumps():
                    carried.append(readiness)
                else:
                    readiness.queued = False
                if clock() >= deadline:
                    break


class Watching:
    """A socket's registration with the reactor; leaving the context forgets it.

    The kernel drops the epoll registration itself when the socket closes. This drops the
    reactor's note of it, so that a later socket given the same descriptor number is not
    taken for this one; the check on ``readiness`` keeps a late exit from dropping the note of
    a newer socket that already has that number.
    """

    __slots__ = ("_fd", "_readiness", "_watched")

    def __init__(
        self, watched: dict[int, tuple[Readiness, Side]], fd: int, readiness: Readiness
    ) -> None:
        self._watched = watched
        self._fd = fd
        self._readiness = readiness

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        entry = self._watched.get(self._fd)
        if entry is not None and entry[0] is self._readiness:
            del self._watched[self._fd]
