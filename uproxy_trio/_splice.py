"""Zero-copy relaying with splice(2): socket → pipe → socket, the bytes never entering Python.

A pipe is only lent to a direction while bytes are actually moving and is given back as soon
as the source has nothing more to read, so thousands of idle flows hold no pipes at all and
stay within the descriptor limit.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket

import trio

# Linux-only, and Python 3.10+: without it every direction falls back to recv/send.
SPLICE_AVAILABLE = hasattr(os, "splice")

# <linux/fcntl.h>; Python's fcntl module has it from 3.10 on, as F_SETPIPE_SZ.
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)

# A bigger pipe moves more per pair of splice calls. 1 MiB is the default pipe-max-size; if
# the kernel refuses it (the per-user pipe budget is spent), the pipe keeps its 64 KiB.
PIPE_SIZE = 1 << 20

# How many idle pipes the pool keeps for reuse; more are closed when given back.
POOL_KEEP = 32

# A burst yields to other tasks after moving this much, so one fast flow cannot starve the rest.
BURST_LIMIT = 4 << 20

_FLAGS = (
    getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2) if SPLICE_AVAILABLE else 0
)


class SpliceFailed(Exception):
    """A burst ended on an error; ``moved`` bytes had reached the sink before it."""

    def __init__(self, moved: int) -> None:
        super().__init__(moved)
        self.moved = moved

    @property
    def unsupported(self) -> bool:
        """splice(2) cannot work on these descriptors at all: use recv/send instead."""
        cause = self.__cause__
        return isinstance(cause, OSError) and cause.errno in (errno.EINVAL, errno.ENOSYS)


class SourceGone(SpliceFailed):
    """Reading the source failed: it was reset."""


class SinkGone(SpliceFailed):
    """Writing the sink failed: it was reset or shut its read side."""


class Pipe:
    __slots__ = ("read_fd", "size", "write_fd")

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            self.size = fcntl.fcntl(self.write_fd, F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            self.size = 1 << 16

    def close(self) -> None:
        os.close(self.read_fd)
        os.close(self.write_fd)


class PipePool:
    """Pipes lent to directions for the length of one burst. Owned by one proxy."""

    def __init__(self, keep: int = POOL_KEEP) -> None:
        self._keep = keep
        self._idle: list[Pipe] = []

    def take(self) -> Pipe:
        return self._idle.pop() if self._idle else Pipe()

    def give_back(self, pipe: Pipe) -> None:
        if len(self._idle) < self._keep:
            self._idle.append(pipe)
        else:
            pipe.close()

    def close(self) -> None:
        while self._idle:
            self._idle.pop().close()


async def splice_burst(source: socket.socket, sink: socket.socket, pipe: Pipe) -> tuple[int, bool]:
    """Move what the source has now through ``pipe`` to the sink.

    Returns ``(bytes moved, eof)``; stops when the source would block, at EOF, or after
    ``BURST_LIMIT`` bytes. Raises ``SourceGone``/``SinkGone``. The pipe is empty on return;
    if this raises or is cancelled it may not be, and must be closed rather than reused.
    """
    source_fd, sink_fd = source.fileno(), sink.fileno()
    moved = 0
    while moved < BURST_LIMIT:
        try:
            pending = os.splice(source_fd, pipe.write_fd, pipe.size, flags=_FLAGS)
        except BlockingIOError:
            return moved, False
        except OSError as exc:
            raise SourceGone(moved) from exc
        if pending == 0:
            return moved, True
        while pending:
            try:
                sent = os.splice(pipe.read_fd, sink_fd, pending, flags=_FLAGS)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(sink)
                continue
            except OSError as exc:
                raise SinkGone(moved) from exc
            pending -= sent
            moved += sent
    return moved, False
