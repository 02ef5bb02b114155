"""``uproxy serve --workers N``: N proxy processes behind one set of listening addresses.

Each worker is a whole ``uproxy serve`` of its own that binds the same addresses with
SO_REUSEPORT, so the kernel spreads new flows across them; that works behind TPROXY too,
whose listener lookup goes through the same reuseport group. The parent binds nothing: it
starts the workers one after the other (a bind error is then reported once, by the first),
forwards SIGTERM/SIGINT (and, with a config file, SIGHUP: each worker reloads its routes) to
them, and restarts a worker that dies on its own, saying so, unless they keep dying.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence

import trio
from prometheus_client.multiprocess import mark_process_dead

from uproxy_trio import Address

from ._metrics import render_multiprocess, serve_metrics

LOGGER = logging.getLogger("uproxy.workers")

# Set by the parent for each worker: "INDEX/COUNT", and the descriptor to report readiness on.
WORKER_ENV = "_UPROXY_WORKER"
READY_FD_ENV = "_UPROXY_READY_FD"

# A worker that needs longer than this to bind is considered failed.
READY_TIMEOUT_S = 30.0
# More deaths than this within the window means a crash loop: stop instead of restarting.
RESTART_LIMIT = 5
RESTART_WINDOW_S = 60.0
# How long a stopping parent waits for a worker before killing it (after its own --grace).
KILL_AFTER_S = 10.0


class WorkerFailedToStart(Exception):
    def __init__(self, index: int, code: int) -> None:
        super().__init__(index, code)
        self.index = index
        self.code = code


def worker_label() -> str | None:
    """``worker 2/4`` inside a worker process, ``None`` elsewhere."""
    value = os.environ.get(WORKER_ENV)
    return f"worker {value}" if value else None


def report_ready() -> None:
    """Tell the parent (if there is one) that this worker's listeners are bound."""
    fd = os.environ.pop(READY_FD_ENV, None)
    if fd is not None:
        os.write(int(fd), b"ready\n")
        os.close(int(fd))


def cpu_count() -> int:
    return len(os.sched_getaffinity(0))


class Supervisor:
    """Runs ``count`` workers until a signal, and returns the exit code for the parent."""

    def __init__(
        self,
        argv_for: Callable[[int], Sequence[str]],
        count: int,
        grace: float,
        metrics: Address | None = None,
        *,
        forward_reload: bool = False,
    ) -> None:
        self._argv_for = argv_for
        self._reload_signals = (signal.SIGHUP,) if forward_reload else ()
        self._metrics = metrics
        self._count = count
        self._grace = grace
        self._stopping = False
        self._processes: dict[int, trio.Process] = {}
        self._exit_codes: dict[int, int] = {}
        self._deaths: deque[float] = deque()

    async def run(self) -> int:
        with trio.open_signal_receiver(
            signal.SIGINT, signal.SIGTERM, *self._reload_signals
        ) as signals:
            async with trio.open_nursery() as outer:
                outer.start_soon(self._forward, signals)
                if self._metrics is not None:
                    await outer.start(serve_metrics, self._metrics, render_multiprocess)
                failed: list[WorkerFailedToStart] = []
                try:
                    async with trio.open_nursery() as workers:
                        for index in range(self._count):
                            await workers.start(self._keep_running, index)
                        LOGGER.info("%d workers ready", self._count)
                except* WorkerFailedToStart as group:
                    failed.extend(e for e in group.exceptions if isinstance(e, WorkerFailedToStart))
                finally:
                    outer.cancel_scope.cancel()
        if failed:
            # The worker has said why on stderr already, in one line.
            return failed[0].code or 1
        return max(self._exit_codes.values(), default=0)

    async def _forward(self, signals: AsyncIterator[int]) -> None:
        async for signum in signals:
            if signum not in self._reload_signals:
                self._stopping = True
            LOGGER.info(
                "%s received: passing it to %d workers",
                signal.Signals(signum).name,
                len(self._processes),
            )
            for process in self._processes.values():
                if process.returncode is None:
                    process.send_signal(signum)

    async def _keep_running(
        self, index: int, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        started = False
        while not self.stopping():
            process, ready = await self._spawn(index)
            try:
                if not ready:
                    code = await process.wait()
                    if not started:
                        raise WorkerFailedToStart(index, code)
                else:
                    self._processes[index] = process
                    if self.stopping():
                        # The signal came while this worker was starting, so ``_forward``
                        # could not pass it on: it would serve on, and the parent wait on it.
                        process.send_signal(signal.SIGTERM)
                    if not started:
                        task_status.started()
                        started = True
                    code = await process.wait()
            finally:
                await _stop(process, self._grace)
                if self._metrics is not None:
                    # Its counters stay in the sum; its share of the active gauge goes.
                    mark_process_dead(process.pid)  # type: ignore[no-untyped-call]
            if self.stopping():
                self._exit_codes[index] = code
                return
            LOGGER.error(
                "worker %d (pid %d) exited with code %d on its own",
                index + 1,
                process.pid,
                code,
            )
            if self._crash_looping():
                LOGGER.error(
                    "workers died %d times within %ss: stopping all of them",
                    RESTART_LIMIT + 1,
                    RESTART_WINDOW_S,
                )
                self._stopping = True
                self._exit_codes[index] = 1
                for other in self._processes.values():
                    if other.returncode is None:
                        other.send_signal(signal.SIGTERM)
                return
            LOGGER.warning("restarting worker %d", index + 1)

    def stopping(self) -> bool:
        """A signal came (or the workers crash-looped): nothing is started any more."""
        return self._stopping

    def _crash_looping(self) -> bool:
        now = trio.current_time()
        self._deaths.append(now)
        while self._deaths and self._deaths[0] < now - RESTART_WINDOW_S:
            self._deaths.popleft()
        return len(self._deaths) > RESTART_LIMIT

    async def _spawn(self, index: int) -> tuple[trio.Process, bool]:
        """Start worker ``index``; true once it reported its listeners bound."""
        read_fd, write_fd = os.pipe()
        env = {
            **os.environ,
            WORKER_ENV: f"{index + 1}/{self._count}",
            READY_FD_ENV: str(write_fd),
        }
        try:
            process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "uproxy_cli", *self._argv_for(index)],
                env=env,
                pass_fds=(write_fd,),
            )
        finally:
            os.close(write_fd)
        async with trio.lowlevel.FdStream(read_fd) as readiness:
            with trio.move_on_after(READY_TIMEOUT_S):
                # b"" here means the worker exited (or closed the pipe) without being ready.
                return process, await readiness.receive_some() == b"ready\n"
        return process, False


async def _stop(process: trio.Process, grace: float) -> None:
    """Make sure ``process`` is gone, also when our task is being cancelled."""
    if process.returncode is not None:
        return
    with trio.CancelScope(shield=True):
        process.send_signal(signal.SIGTERM)
        with trio.move_on_after(grace + KILL_AFTER_S):
            await process.wait()
            return
        process.kill()
        await process.wait()
