"""Pipes for zero-copy relaying with splice(2): socket → pipe → socket, the bytes never
entering Python.

A pipe is only lent to a direction while bytes are actually moving and is given back as soon
as the source has nothing more to read, so thousands of idle flows hold no pipes at all and
stay within the descriptor limit.
"""

from __future__ import annotations

import fcntl
import os

# Linux-only, and Python 3.10+: without it every direction falls back to recv/send.
SPLICE_AVAILABLE = hasattr(os, "splice")

# <linux/fcntl.h>; Python's fcntl module has it from 3.10 on, as F_SETPIPE_SZ.
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)

# A bigger pipe moves more per pair of splice calls. 1 MiB is the default pipe-max-size; if
# the kernel refuses it (the per-user pipe budget is spent), the pipe keeps its 64 KiB.
PIPE_SIZE = 1 << 20

# How many idle pipes the pool keeps for reuse; more are closed when given back.
POOL_KEEP = 32

SPLICE_FLAGS = (
    getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2) if SPLICE_AVAILABLE else 0
)


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
