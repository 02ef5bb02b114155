"""Which of a flow's sockets can be read or written, learnt from one edge-triggered epoll.

``trio.lowlevel.wait_readable`` arms a one-shot registration in Trio's epoll for every wait and
disarms it after the wake-up: two or three ``epoll_ctl`` calls per wait, about six per short
flow. Here each socket is registered once, for reading and writing, edge-triggered, and one
reactor task turns the kernel's edges into bits on the flow's ``Readiness``, waking the flow's
task only if it is waiting for one of them. A short flow then costs two ``epoll_ctl`` calls,
and a whole flow can wait on both its sockets from a single task. A flow may go further and
hand the reactor a driver (``Readiness.driver``), which the reactor calls on each edge instead
of waking a task: no trip through Trio's scheduler per event.

Edge-triggered means the kernel reports a change once, so the bits are "may be ready": a task
clears a bit when the socket says it would block (or when a short read has emptied it), and
waits only on cleared bits. Any data arriving after that is a new edge, so nothing is missed;
a stale bit costs at most one read that finds nothing.
"""

from __future__ import annotations

import enum
import select
import socket
from collections.abc import Callable
from types import TracebackType
from typing import Self

import trio
from trio.lowlevel import Abort, RaiseCancelT, Task

# Edges per reactor wake-up at most; more wait for the next round.
MAX_EVENTS = 1024

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

FINISHED = 1 << 6
"""Set by ``Readiness.finish``: the flow's driver is done and its task should wake."""


def bit(side: Side, kind: int) -> int:
    """The bit for ``kind`` (``READABLE``, ``WRITABLE``, ``PEER_CLOSED``) of ``side``'s socket."""
    return kind << side


class TimedOut(Exception):
    """The flow ran out of time while it waited: see ``Readiness.time_out``."""


class Readiness:
    """What the reactor has seen of one flow's two sockets, and who acts on it: the tasks
    waiting for some of the bits, or a driver that the reactor calls itself.

    ``bits`` is public so that the relay can test and clear bits without a call per read.
    """

    __slots__ = ("_waiters", "bits", "driver", "queued", "timed_out")

    def __init__(self, bits: int = 0) -> None:
        self.bits = bits
        self.timed_out = False
        self.driver: Callable[[], bool] | None = None
        """While set, the reactor calls it after each edge instead of waking a task: a flow
        that needs no task of its own per event (no interceptor) moves its bytes right there,
        and a request costs no trip through Trio's scheduler. It returns true when it has
        more to do but should let others go first; it must never block."""
        self.queued = False
        self._waiters: list[tuple[int, Task]] = []

    async def wait(self, mask: int) -> None:
        """Sleep until one of the bits in ``mask`` is set (at once if one is).

        Raises ``TimedOut`` once ``time_out`` has been called.
        """
        if self.timed_out:
            raise TimedOut
        if self.bits & mask:
            await trio.lowlevel.checkpoint()
            return
        waiter = (mask, trio.lowlevel.current_task())
        self._waiters.append(waiter)

        def abort(_: RaiseCancelT) -> Abort:
            self._waiters.remove(waiter)
            return Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)
        if self.timed_out:
            raise TimedOut

    def notify(self, bits: int) -> bool:
        """Set ``bits`` (the reactor's job); true if the driver should now run, which the
        reactor does once per round however many edges the flow had."""
        self.bits |= bits
        if self.driver is not None:
            if self.queued:
                return False
            self.queued = True
            return True
        if self._waiters:
            self._wake(bits)
        return False

    def finish(self) -> None:
        """Wake the task waiting for ``FINISHED``: the driver is done with the flow."""
        self.bits |= FINISHED
        self._wake(FINISHED)

    def time_out(self) -> None:
        """End every wait on this flow, now and from now on, with ``TimedOut``.

        How the proxy stops a flow whose connect or idle time is up: one sweep over the flows
        instead of a cancel scope per flow, which would cost each flow about 5 us.
        """
        self.timed_out = True
        waiters, self._waiters = self._waiters, []
        for _, task in waiters:
            trio.lowlevel.reschedule(task)

    def _wake(self, bits: int) -> None:
        ready = [waiter for waiter in self._waiters if waiter[0] & bits]
        for waiter in ready:
            self._waiters.remove(waiter)
            trio.lowlevel.reschedule(waiter[1])


class Reactor:
    """One edge-triggered epoll for the flows of one proxy, and the task that reads it.

    ``run`` must be running (in a nursery that outlives the flows) for any ``Readiness`` to
    change. Use as a context manager: leaving it closes the epoll.
    """

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._watched: dict[int, tuple[Readiness, Side]] = {}

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

    def watch(self, sock: socket.socket, readiness: Readiness, side: Side) -> Watching:
        """Report ``sock``'s edges to ``readiness`` as ``side`` until the returned context ends.

        Leave that context before (or just after) closing the socket, with no await between.
        If the socket is ready already the kernel reports that at once, as a first edge.
        """
        fd = sock.fileno()
        self._epoll.register(fd, _REGISTER)
        self._watched[fd] = (readiness, side)
        return Watching(self._watched, fd, readiness)

    async def run(self) -> None:
        """Turn edges into ``Readiness`` bits, and run the drivers they call for, until
        cancelled."""
        epoll, watched = self._epoll, self._watched
        fileno = epoll.fileno()
        again: list[Readiness] = []
        while True:
            if again:
                await trio.lowlevel.checkpoint()  # drivers with more to do: after the others
            else:
                await trio.lowlevel.wait_readable(fileno)
            drive, again = again, []
            for fd, events in epoll.poll(0, MAX_EVENTS):
                entry = watched.get(fd)
                if entry is None:
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
                    drive.append(readiness)
            for readiness in drive:
                readiness.queued = False
                driver = readiness.driver
                if driver is not None and driver():
                    readiness.queued = True
                    again.append(readiness)


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
