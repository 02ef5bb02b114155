"""A named network namespace: run commands in it, and open sockets that live in it.

A socket belongs to the namespace that was current when it was created and stays there, so a
test process can hold client, proxy and server sockets of three different hosts at once. We
switch this thread's namespace with setns(2) just long enough to call socket(2).
"""

from __future__ import annotations

import ctypes
import functools
import os
import socket
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

# <sched.h>: the namespace type setns(2) is asked to switch.
CLONE_NEWNET = 0x40000000

NETNS_DIR = "/run/netns"


class LabError(RuntimeError):
    """A lab command failed; the message carries the command and what it printed."""


@functools.cache
def _libc() -> ctypes.CDLL:
    # Loaded once: a test opens thousands of sockets, each through two setns calls.
    return ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc().setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def run(argv: Sequence[str], *, input: str | None = None, timeout: float | None = None) -> str:
    """Run a command, raising ``LabError`` with its output if it fails or outlives ``timeout``."""
    try:
        done = subprocess.run(
            list(argv), input=input, capture_output=True, text=True, check=False, timeout=timeout
        )
    except FileNotFoundError as exc:
        raise LabError(f"{argv[0]} is not installed") from exc
    except subprocess.TimeoutExpired:
        raise LabError(f"{' '.join(argv)} did not finish in {timeout}s") from None
    if done.returncode != 0:
        output = (done.stderr or done.stdout).strip()
        raise LabError(f"{' '.join(argv)} failed (exit {done.returncode}): {output}")
    return done.stdout


class Namespace:
    """A network namespace known to ``ip netns`` by ``name``."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"Namespace({self.name!r})"

    @property
    def path(self) -> str:
        return os.path.join(NETNS_DIR, self.name)

    def exists(self) -> bool:
        return os.path.exists(self.path)

    def create(self) -> None:
        run(["ip", "netns", "add", self.name])

    def delete(self) -> None:
        """Delete the namespace; its interfaces and sockets go with it."""
        if self.exists():
            run(["ip", "netns", "delete", self.name])

    def pids(self) -> list[str]:
        """The processes inside this namespace."""
        return run(["ip", "netns", "pids", self.name]).split()

    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` wrapped to run inside this namespace (for subprocesses of your own)."""
        return ["ip", "netns", "exec", self.name, *argv]

    def run(
        self, argv: Sequence[str], *, input: str | None = None, timeout: float | None = None
    ) -> str:
        return run(self.exec_argv(argv), input=input, timeout=timeout)

    def ip(self, batch: str, *, ipv6: bool = False) -> None:
        """Run ``ip`` commands (one per line, without the leading ``ip``) in one process.

        A batch has one address family; ``ipv6=True`` is ``ip -6`` for every line.
        """
        family = ["-6"] if ipv6 else []
        run(["ip", *family, "-netns", self.name, "-batch", "-"], input=batch)

    def sysctl(self, settings: Mapping[str, str | int]) -> None:
        """Set sysctls (``{"net.ipv4.ip_forward": 1}``) as seen from inside this namespace."""
        self.run(["sysctl", "-q", "-w", *(f"{key}={value}" for key, value in settings.items())])

    @contextmanager
    def entered(self) -> Iterator[None]:
        """Make this namespace current for the calling thread until the block ends.

        Everything the thread creates meanwhile (sockets, listeners) belongs to this namespace
        for good. Do not await inside the block unless the whole event loop is meant to be in
        here: other tasks would create their sockets here too.
        """
        with open("/proc/thread-self/ns/net", "rb") as home, open(self.path, "rb") as target:
            _setns(target.fileno())
            try:
                yield
            finally:
                _setns(home.fileno())

    def socket(
        self, family: socket.AddressFamily, kind: socket.SocketKind = socket.SOCK_STREAM
    ) -> socket.socket:
        """A new socket that lives in this namespace."""
        with self.entered():
            return socket.socket(family, kind)
