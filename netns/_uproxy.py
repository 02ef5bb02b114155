"""``uproxy serve`` as a daemon in the lab's proxy namespace, run by this very interpreter."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from uproxy_trio import format_address

from ._namespace import Namespace
from ._services import Service, running

# The level uproxy runs at in the bench, so that its figures are the relay's and not the
# logging's; the bench's uproxy-default-logging relay runs at serve's default to show that too.
BENCH_LOG_LEVEL = "warning"


def uproxy_serve_argv(
    listen_host: str,
    listen_port: int,
    interceptors: Sequence[str],
    workers: int = 1,
    log_level: str | None = BENCH_LOG_LEVEL,
    extra: Sequence[str] = (),
) -> list[str]:
    """``python -m uproxy_cli serve`` with the interpreter running us, so the proxy is the same
    installed package as the bench, whichever virtualenv that is.

    ``log_level=None`` passes no ``--log-level``: serve's default, as a user gets it.
    """
    listen = format_address((listen_host, listen_port))
    argv = [sys.executable, "-m", "uproxy_cli", "serve", "--listen", listen]
    if log_level is not None:
        argv += ["--log-level", log_level]
    argv += ["--workers", str(workers)]
    for spec in interceptors:
        argv += ["--interceptor", spec]
    return [*argv, *extra]


@contextmanager
def running_uproxy(
    namespace: Namespace,
    workdir: Path,
    listen_host: str,
    listen_port: int,
    interceptors: Sequence[str] = (),
    *,
    name: str = "uproxy",
    workers: int = 1,
    log_level: str | None = BENCH_LOG_LEVEL,
    extra: Sequence[str] = (),
) -> Iterator[Service]:
    """``uproxy serve`` in ``namespace`` for the block, its log in ``workdir/NAME/NAME.log``.

    At serve's default level that log takes a line per flow. It stays a file in the bench's
    temporary directory rather than /dev/null: a failing uproxy's last lines are quoted from
    it, and it costs uproxy what a user's log file costs it, a write(2) to the page cache per
    line. Its size is bounded by the run: about 210 bytes a flow, under
    1 MB per second of wrk at the few thousand new connections a second the lab host reaches
    (2 MB for a 3 s run), deleted with the directory when the bench ends.
    """
    argv = uproxy_serve_argv(listen_host, listen_port, interceptors, workers, log_level, extra)
    with running(namespace, name, argv, workdir / name, ready_port=listen_port) as service:
        yield service
