"""Idle flows through a proxy: what each costs the proxy in memory, and whether each still works.

The bench process plays client and server itself (sockets made in their namespaces), opens
the flows one after another, reads the proxy's resident set size before and after, then sends
one byte each way on every flow. Its own descriptors (two per flow) and the proxy's (two per
flow as well) must fit RLIMIT_NOFILE, which ``ensure_open_files`` raises.
"""

from __future__ import annotations

import resource
import socket
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from ._namespace import LabError, Namespace

# Per-operation timeout: a flow the proxy lost must not hang the bench.
SOCKET_TIMEOUT_S = 10.0
# Descriptors on top of two per flow: the interpreter, logs, pipes, listeners.
_SPARE_FILES = 256
# The proxy sets up the last flows' relay tasks a moment after the server has accepted them;
# its RSS is read once it has stopped moving, or after this long regardless.
_SETTLE_S = 2.0
_SETTLE_STEP_S = 0.1


@dataclass(frozen=True, slots=True)
class IdleResult:
    """``flows`` idle flows held through the proxy at once."""

    flows: int
    rss_before_kib: int
    rss_after_kib: int
    relayed: int
    """How many of the flows carried a byte client to server and another back afterwards."""

    @property
    def kib_per_flow(self) -> float:
        return (self.rss_after_kib - self.rss_before_kib) / self.flows


def ensure_open_files(flows: int) -> None:
    """Raise this process's RLIMIT_NOFILE to hold ``flows`` flows (two descriptors each).

    Processes started afterwards (the proxy) inherit the limit. The hard limit is raised too
    when needed, which takes root (CAP_SYS_RESOURCE), as the lab does anyway.
    """
    needed = 2 * flows + _SPARE_FILES
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    new_hard = hard if hard == resource.RLIM_INFINITY or hard >= needed else needed
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, new_hard))
    except (ValueError, OSError) as exc:
        raise LabError(f"cannot raise the open-files limit to {needed}: {exc}") from None


def resident_kib(pid: int) -> int:
    """VmRSS of ``pid`` and all its descendants in KiB (``uproxy serve --workers`` is a parent
    and its workers), from /proc/PID/status."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        raise LabError(f"process {pid} is gone") from None
    own = next((line for line in status.splitlines() if line.startswith("VmRSS:")), None)
    if own is None:
        raise LabError(f"/proc/{pid}/status has no VmRSS")
    return int(own.split()[1]) + sum(resident_kib(child) for child in _children(pid))


def _children(pid: int) -> list[int]:
    # Every thread's children: trio starts worker processes from a helper thread.
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except FileNotFoundError:
            continue
    return found


def measure_idle_flows(
    client: Namespace, server: Namespace, host: str, port: int, flows: int, proxy_pid: int
) -> IdleResult:
    """Hold ``flows`` flows from ``client`` to ``host:port`` in ``server`` through the proxy
    ``proxy_pid``, then check each one relays a byte both ways."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with ExitStack() as sockets:
        listener = sockets.enter_context(server.socket(family))
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.settimeout(SOCKET_TIMEOUT_S)
        listener.bind((host, port))
        listener.listen(flows)
        before = resident_kib(proxy_pid)
        pairs = [_open_flow(sockets, client, listener, family, host, port) for _ in range(flows)]
        after = _settled_resident_kib(proxy_pid)
        relayed = sum(
            _relays_both_ways(client_sock, server_sock) for client_sock, server_sock in pairs
        )
    return IdleResult(flows, before, after, relayed)


def _open_flow(
    sockets: ExitStack,
    client: Namespace,
    listener: socket.socket,
    family: socket.AddressFamily,
    host: str,
    port: int,
) -> tuple[socket.socket, socket.socket]:
    client_sock = sockets.enter_context(client.socket(family))
    client_sock.settimeout(SOCKET_TIMEOUT_S)
    try:
        client_sock.connect((host, port))
        server_sock, _ = listener.accept()
    except OSError as exc:
        raise LabError(f"opening an idle flow through the proxy failed: {exc}") from None
    sockets.enter_context(server_sock)
    server_sock.settimeout(SOCKET_TIMEOUT_S)
    return client_sock, server_sock


def _settled_resident_kib(pid: int) -> int:
    deadline = time.monotonic() + _SETTLE_S
    previous = resident_kib(pid)
    while time.monotonic() < deadline:
        time.sleep(_SETTLE_STEP_S)
        current = resident_kib(pid)
        if current == previous:
            return current
        previous = current
    return previous


def _relays_both_ways(client_sock: socket.socket, server_sock: socket.socket) -> bool:
    try:
        client_sock.sendall(b"c")
        if server_sock.recv(1) != b"c":
            return False
        server_sock.sendall(b"s")
        return client_sock.recv(1) == b"s"
    except OSError:
        return False
