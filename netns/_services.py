"""Background daemons in a lab namespace (iperf3, nginx, haproxy, uproxy) that always end.

Each runs in a session of its own, so a Ctrl-C at the terminal reaches only the bench, which
then stops them in order: SIGTERM, and SIGKILL for one that has not gone after a grace period.
Their output goes to a log file in a directory of their own, quoted when one fails to start.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from ._namespace import LabError, Namespace

# Long enough for a proxy with thousands of flows to close them; a daemon still there is killed.
STOP_GRACE_S = 5.0
READY_TIMEOUT_S = 20.0
# How often readiness is polled: a daemon binds within milliseconds.
_POLL_S = 0.02
_LOG_TAIL_CHARS = 2000


class Service:
    """One daemon started by ``running``: its process and where its output went."""

    def __init__(
        self,
        name: str,
        process: subprocess.Popen[bytes],
        log_path: Path,
        command: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.process = process
        self.log_path = log_path
        self.command = tuple(command)
        """The daemon's own argv (without the ``ip netns exec`` that runs it)."""

    @property
    def pid(self) -> int:
        """The daemon's own pid: ``ip netns exec`` execs the command, it does not fork."""
        return self.process.pid

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-_LOG_TAIL_CHARS:].strip()
        except FileNotFoundError:
            return ""

    def check_alive(self) -> None:
        """Raise ``LabError`` (with the end of its log) if the daemon has exited."""
        code = self.process.poll()
        if code is not None:
            raise LabError(f"{self.name} exited with code {code}: {self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after ``STOP_GRACE_S``; to the whole session it leads."""
        if self.process.poll() is None:
            _signal_group(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                _signal_group(self.process.pid, signal.SIGKILL)
                self.process.wait()
        # Children it forked (nginx workers) share its session and process group.
        _signal_group(self.process.pid, signal.SIGKILL)


def kill_everything_in(namespaces: Iterable[Namespace]) -> None:
    """SIGKILL every process still inside ``namespaces``, and wait until they are gone.

    The last line of defence before a lab is deleted: a client (iperf3, wrk) whose
    ``subprocess.run`` was interrupted by Ctrl-C while it was being spawned is not known to
    any ``Service``, and would otherwise live on, stuck, in a namespace nobody can name.
    """
    pids = [pid for namespace in namespaces if namespace.exists() for pid in _pids_in(namespace)]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + STOP_GRACE_S
    while any(_exists(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(_POLL_S)


def _pids_in(namespace: Namespace) -> list[int]:
    return [int(pid) for pid in namespace.pids()]


def _exists(pid: int) -> bool:
    """True while ``pid`` is alive and not yet a zombie (a zombie holds no namespace)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass


@contextmanager
def running(
    namespace: Namespace,
    name: str,
    argv: Sequence[str],
    workdir: Path,
    *,
    ready_port: int | None = None,
) -> Iterator[Service]:
    """Run ``argv`` in ``namespace`` for the block, with its log in ``workdir/NAME.log``.

    With ``ready_port``, the block starts only once something listens on that TCP port in the
    namespace. The daemon is stopped when the block ends, however it ends.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"{name}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            namespace.exec_argv(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            start_new_session=True,
        )
    service = Service(name, process, log_path, argv)
    try:
        if ready_port is not None:
            wait_listening(namespace, ready_port, service)
        yield service
    finally:
        service.stop()


def wait_listening(namespace: Namespace, port: int, service: Service) -> None:
    """Return once a TCP listener on ``port`` exists in ``namespace``; ``LabError`` if the
    service dies first or ``READY_TIMEOUT_S`` passes."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not namespace.run(["ss", "-Hltn", f"sport = :{port}"]).strip():
        service.check_alive()
        if time.monotonic() > deadline:
            raise LabError(f"{service.name} not listening on port {port} after {READY_TIMEOUT_S}s")
        time.sleep(_POLL_S)
