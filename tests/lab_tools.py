"""Sockets in the lab's client and server namespaces, and proxies to test against."""

from __future__ import annotations

import fcntl
import os
import resource
import signal
import socket
import struct
import subprocess
import tempfile
import termios
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from cli_tools import PROXY_LISTEN_ADDRESSES, PROXY_PORT, listen_args, uproxy_argv

import uproxy_trio
from uproxy_netns import CLIENT_V4, CLIENT_V6, SERVER_V4, SERVER_V6, Lab, Namespace
from uproxy_trio import FlowEvent, format_address

PROXY_LISTEN = [("127.0.0.1", PROXY_PORT), ("::1", PROXY_PORT)]

# The proxy looks for idle flows four times per idle timeout, so an idle timeout fires
# between its period and 1.25 times it (README: --idle-timeout).
TIMEOUT_LATENESS = 1.25
# A connect timeout is the deadline of the flow's cancel scope (README: --connect-timeout): it
# fires on time. Long enough that a deadline a quarter late (as the idle sweep's would be) is
# later than the allowance below.
CONNECT_TIMEOUT_S = 1.0
# What a test measures on top of that: the RST crossing the lab and the test's task being
# scheduled to see it, on a shared two-CPU machine where other suites run too.
SCHEDULING_ALLOWANCE_S = 0.15

# (client_ip, server_ip) for tests that must hold for both IP versions.
ADDRESSES = [
    pytest.param(CLIENT_V4, SERVER_V4, id="ipv4"),
    pytest.param(CLIENT_V6, SERVER_V6, id="ipv6"),
]


async def eventually(condition: Callable[[], bool], timeout: float = 10) -> None:
    """Wait until ``condition()`` holds: for state outside this process (a proxy's descriptor
    count, its listeners), which can only be polled."""
    with trio.fail_after(timeout):
        while not condition():  # noqa: ASYNC110 - nothing to wait on but the other process
            await trio.sleep(0.02)


async def eventually_async(condition: Callable[[], Awaitable[bool]], timeout: float = 10) -> None:
    """``eventually`` for a condition that has to do I/O to find out (a metrics scrape)."""
    with trio.fail_after(timeout):
        while not await condition():  # noqa: ASYNC110 - the state is in another process
            await trio.sleep(0.05)


def raise_own_fd_limit() -> None:
    """Tests that hold thousands of sockets need more than the usual soft limit of 1024."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def family_of(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


async def listen(
    ns: Namespace, host: str, port: int, backlog: int = 1024
) -> trio.socket.SocketType:
    sock = trio.socket.from_stdlib_socket(ns.socket(family_of(host)))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    await sock.bind((host, port))
    sock.listen(backlog)
    return sock


async def connect(ns: Namespace, host: str, port: int) -> trio.socket.SocketType:
    sock = trio.socket.from_stdlib_socket(ns.socket(family_of(host)))
    try:
        await sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


@contextmanager
def silent_server_port(lab: Lab, port: int) -> Iterator[None]:
    """For the block, the server host drops every packet to ``port``: an upstream that never
    answers a SYN."""
    rule = ["INPUT", "-p", "tcp", "--dport", str(port), "-j", "DROP"]
    lab.server.run(["iptables", "-I", *rule])
    try:
        yield
    finally:
        lab.server.run(["iptables", "-D", *rule])


@asynccontextmanager
async def open_flow(
    lab: Lab, server_ip: str, port: int = 9090
) -> AsyncIterator[tuple[trio.socket.SocketType, trio.socket.SocketType, Any]]:
    """A client connected through the proxy to a listener in the server namespace, and the
    server's end: ``(client, server, address the server saw)``.

    The sockets and the listener are closed when the block ends, however it ends: a test
    that fails must not leave the port bound for the tests after it.
    """
    with (
        await listen(lab.server, server_ip, port) as listener,
        await connect(lab.client, server_ip, port) as client,
    ):
        server, peer = await listener.accept()
        with server:
            yield client, server, peer


async def until_the_proxy_has_read(lab: Lab, client: trio.socket.SocketType) -> None:
    """Wait until the proxy has read every byte ``client`` sent through it so far, so that
    what the client sends next reaches the proxy's interceptors as a read of its own.

    Everything sent was acknowledged (the client's send queue is empty) and nothing is left
    unread in the proxy's socket for this flow (its Recv-Q in ss).
    """
    flow = ["src", format_address(client.getpeername()[:2])]
    flow += ["dst", format_address(client.getsockname()[:2])]

    def read_by_proxy() -> bool:
        if _unacknowledged(client):
            return False
        (line,) = lab.proxy.run(["ss", "-Htn", "state", "established", *flow]).splitlines()
        return int(line.split()[0]) == 0

    await eventually(read_by_proxy)


def _unacknowledged(sock: trio.socket.SocketType) -> int:
    """Bytes in ``sock``'s send queue, sent or not, that its peer has not acknowledged."""
    # SIOCOUTQ, which has the value of TIOCOUTQ.
    raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4)
    count: int = struct.unpack("i", raw)[0]
    return count


async def connect_expecting_reset(ns: Namespace, host: str, port: int) -> None:
    """Connect through the proxy and read until it resets us.

    The proxy completes the handshake and then resets; when the RST lands before the
    connecting task has looked, connect() itself reports it. Either way is the reset.
    """
    try:
        client = await connect(ns, host, port)
    except ConnectionResetError:
        return
    with client, pytest.raises(ConnectionResetError):
        await recv_until_eof(client)


async def send_all(sock: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view:
        sent = await sock.send(view[: 1 << 20])
        view = view[sent:]


async def recv_until_eof(sock: trio.socket.SocketType, limit: int = 1 << 27) -> bytes:
    received = bytearray()
    while True:
        data = await sock.recv(1 << 18)
        if not data:
            return bytes(received)
        received += data
        assert len(received) <= limit, "peer sent more than expected"


async def recv_exactly(sock: trio.socket.SocketType, size: int) -> bytes:
    received = bytearray()
    while len(received) < size:
        data = await sock.recv(size - len(received))
        assert data, f"EOF after {len(received)} of {size} bytes"
        received += data
    return bytes(received)


async def roundtrip(sock: trio.socket.SocketType, data: bytes = b"ping") -> None:
    """Send ``data`` and read it back from an echo server."""
    await send_all(sock, data)
    assert await recv_exactly(sock, len(data)) == data


async def both_ways(
    client: trio.socket.SocketType,
    server: trio.socket.SocketType,
    up: bytes = b"ping",
    down: bytes = b"pong",
) -> None:
    """``up`` from the client to the server, then ``down`` back, each checked on arrival."""
    await send_all(client, up)
    assert await recv_exactly(server, len(up)) == up
    await send_all(server, down)
    assert await recv_exactly(client, len(down)) == down


def reset_close(sock: trio.socket.SocketType) -> None:
    """Close with a RST, as a crashing or aborting peer would."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()


async def echo_connection(sock: trio.socket.SocketType) -> None:
    with sock:
        try:
            while data := await sock.recv(1 << 16):
                await send_all(sock, data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass


async def echo_server(
    listener: trio.socket.SocketType,
    on_accept: Callable[[Any], None] | None = None,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Echo every connection until its EOF; ``on_accept(peer)`` sees each client address."""
    with listener:
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                sock, peer = await listener.accept()
                if on_accept is not None:
                    on_accept(peer)
                nursery.start_soon(echo_connection, sock)


class EventLog:
    """Collects the proxy's events, and lets a test wait for one."""

    def __init__(self) -> None:
        self.events: list[FlowEvent] = []
        self._changed = trio.Event()

    def __call__(self, event: FlowEvent) -> None:
        uproxy_trio.log_event(event)
        self.events.append(event)
        self._changed.set()
        self._changed = trio.Event()

    def of_type(self, kind: type[Any]) -> list[Any]:
        return [event for event in self.events if isinstance(event, kind)]

    async def wait_for(self, kind: type[Any], count: int = 1, timeout: float = 10) -> list[Any]:
        with trio.fail_after(timeout):
            while len(found := self.of_type(kind)) < count:
                await self._changed.wait()
        return found


async def run_library_proxy(
    events: EventLog,
    options: Mapping[str, Any],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """``uproxy_trio.serve`` on the lab's TPROXY port; the caller must be in the proxy ns."""
    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: uproxy_trio.serve(
                PROXY_LISTEN, on_event=events, task_status=task_status, **options
            )
        )
        task_status.started()


def listeners(namespace: Namespace, port: int = PROXY_PORT) -> int:
    """How many sockets listen on TCP ``port`` in ``namespace`` (a proxy's, its workers')."""
    return len(_listening_sockets(namespace, port))


def waiting_to_be_accepted(namespace: Namespace, port: int = PROXY_PORT) -> int:
    """Connections the kernel has completed but nobody has accepted yet, on every listener on
    TCP ``port`` in ``namespace``: for a listening socket, ss shows them as its Recv-Q."""
    return sum(int(line.split()[1]) for line in _listening_sockets(namespace, port))


def _listening_sockets(namespace: Namespace, port: int) -> list[str]:
    return namespace.run(["ss", "-Hltn", f"sport = :{port}"]).splitlines()


class CliProxy:
    """``uproxy serve`` as a separate process in the lab's proxy namespace."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.process: subprocess.Popen[bytes] | None = None
        self._log = tempfile.NamedTemporaryFile(prefix="uproxy-", suffix=".log")  # noqa: SIM115
        self.returncode: int | None = None

    @property
    def log(self) -> str:
        return Path(self._log.name).read_text(errors="replace")

    def start(
        self,
        *args: str,
        listen: Sequence[str] = PROXY_LISTEN_ADDRESSES,
        ready_timeout: float = 20,
        wrap: Sequence[str] = (),
    ) -> None:
        """Start ``uproxy serve`` on both ``listen`` addresses with ``args``; ``wrap`` is a
        command prefix (``setpriv ...``) run inside the proxy namespace."""
        argv = uproxy_argv(
            "serve", *listen_args(listen), *args, namespace=self.lab.proxy, wrap=wrap
        )
        self.process = subprocess.Popen(argv, stdout=self._log, stderr=self._log)
        deadline = time.monotonic() + ready_timeout
        # Ready means every listener is up, whatever --log-level hides.
        while listeners(self.lab.proxy) < len(listen):
            if self.process.poll() is not None:
                raise AssertionError(f"uproxy serve exited {self.process.returncode}:\n{self.log}")
            if time.monotonic() > deadline:
                raise AssertionError(f"uproxy serve not ready in {ready_timeout}s:\n{self.log}")
            time.sleep(0.02)

    @property
    def pid(self) -> int:
        assert self.process is not None, "not started"
        return self.process.pid

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def open_sockets(self) -> int:
        return descriptors(self.pid)["socket"]

    def open_pipes(self) -> int:
        return descriptors(self.pid)["pipe"]

    def status(self, field: str) -> str:
        """A field of /proc/PID/status, such as ``VmRSS`` or ``CapEff``."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name == field:
                return value.strip()
        raise KeyError(field)

    def rss_kib(self) -> int:
        return int(self.status("VmRSS").split()[0])

    def wait_for_log(self, text: str, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log:
            assert time.monotonic() < deadline, f"{text!r} not logged in {timeout}s:\n{self.log}"
            time.sleep(0.02)

    def send(self, sig: int) -> None:
        assert self.process is not None, "not started"
        self.process.send_signal(sig)

    def wait_exit(self, timeout: float = 15) -> int | None:
        """Wait for a proxy that was already told to stop; return its exit code."""
        if self.process is not None:
            self.process.wait(timeout)
        return self.stop()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int | None:
        """Signal the proxy and wait; return its exit code."""
        if self.process is None:
            return self.returncode
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.returncode = self.process.returncode
        self.process = None
        self._log.flush()
        return self.returncode


def descriptors(pid: int | str = "self") -> Counter[str]:
    """A process's open descriptors by kind: ``socket``, ``pipe`` (splice's pool keeps a few
    for reuse), ``other``."""
    kinds: Counter[str] = Counter()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue  # closed while we looked
        kind = target.split(":", 1)[0]
        kinds[kind if kind in ("socket", "pipe") else "other"] += 1
    return kinds
