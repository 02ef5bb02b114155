"""``uproxy serve`` as a daemon in the lab's proxy namespace, run by this very interpreter."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from uproxy_trio import format_address

from ._namespace import Namespace
from ._services import Service, running

# Every flow logs five lines at "info"; in a benchmark that is the disk being measured.
BENCH_LOG_LEVEL = "warning"


def uproxy_serve_argv(
    listen_host: str, listen_port: int, interceptors: Sequence[str], workers: int = 1
) -> list[str]:
    """``python -m uproxy_cli serve`` with the interpreter running us, so the proxy is the same
    installed package as the bench, whichever virtualenv that is."""
    listen = format_address((listen_host, listen_port))
    argv = [sys.executable, "-m", "uproxy_cli", "serve", "--listen", listen]
    argv += ["--log-level", BENCH_LOG_LEVEL, "--workers", str(workers)]
    for spec in interceptors:
        argv += ["--interceptor", spec]
    return argv


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
) -> Iterator[Service]:
    """``uproxy serve`` in ``namespace`` for the block, its log in ``workdir/NAME``."""
    argv = uproxy_serve_argv(listen_host, listen_port, interceptors, workers)
    with running(namespace, name, argv, workdir / name, ready_port=listen_port) as service:
        yield service
