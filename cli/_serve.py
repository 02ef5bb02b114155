"""``uproxy serve``: run the proxy until signalled, then drain it."""

from __future__ import annotations

import gc
import logging
import os
import resource
import shutil
import signal
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from typing import TypeVarTuple

import trio

from uproxy_trio import (
    Address,
    EventSink,
    FlowEvent,
    Forward,
    Interceptor,
    Proxy,
    format_address,
    log_event,
)

from ._config import ConfigError, ConfigFile, read_config
from ._control import ApiError, Control
from ._control_app import control_app
from ._errors import CommandError
from ._http import HttpAddress, serve_http
from ._logging import setup_logging
from ._metrics import MULTIPROC_ENV, Metrics, in_multiprocess_mode, metrics_route, serve_metrics
from ._privileges import Identity, drop_to
from ._toxics import ToxicKit, toxic_kit
from ._workers import Supervisor, report_ready, worker_label

LOGGER = logging.getLogger("uproxy")

Args = TypeVarTuple("Args")

# Exit codes of `uproxy serve` after a signal: every flow finished within the grace period,
# or some had to be reset.
EXIT_DRAINED = 0
EXIT_FLOWS_RESET = 1

SOURCE_PORTS = ("keep", "ephemeral")
ON_OFF = ("on", "off")


def run_unwrapped(async_fn: Callable[[*Args], Awaitable[int]], *args: *Args) -> int:
    """``trio.run``, but a failure that is alone in its nursery's exception group is raised bare,
    so the command line can report it in one line."""
    try:
        return trio.run(async_fn, *args)
    except BaseExceptionGroup as group:
        leaf = _only_leaf(group)
        if leaf is None:
            raise
        raise leaf from None


def _only_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    if len(group.exceptions) != 1:
        return None
    (inner,) = group.exceptions
    return _only_leaf(inner) if isinstance(inner, BaseExceptionGroup) else inner


@dataclass(frozen=True, slots=True)
class ServeOptions:
    """``uproxy serve``'s options, checked; the texts as given are kept for the workers."""

    listen: list[str]
    addresses: list[Address]
    interceptor_specs: list[str]
    interceptors: list[Interceptor]
    label: str | None
    connect_timeout: float
    grace: float
    max_flows: int | None
    idle_timeout: float | None
    udp_listen: list[str]
    udp_addresses: list[Address]
    udp_idle_timeout: float
    max_udp_sessions: int
    udp_gso: bool
    source_port: str
    user: str | None
    group: str | None
    identity: Identity | None
    workers: int
    log_level: str
    log_format: str
    metrics: Address | None
    config: ConfigFile | None
    """The config file as it was read at the start, its routes loaded."""
    control: HttpAddress | None = None
    forwards: tuple[Forward, ...] = ()
    """``--forward``'s and the config file's, checked for unique names."""
    seed: int | None = None
    toxics: ToxicKit | None = None
    """The toxic types the control API knows: Toxiproxy's and ``--toxic-type``'s."""


def run_serve(options: ServeOptions) -> int:
    """Run the proxy, or with ``--workers`` the supervisor of several; return the exit code."""
    if options.config is not None:
        # Until the proxy listens for SIGHUP, one would end the process (its default action).
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    worker = worker_label()
    setup_logging(options.log_level, options.log_format, worker)
    if options.workers > 1 and worker is None:
        return _run_workers(options)
    raise_fd_limit()
    wants_metrics = options.metrics is not None or options.control is not None
    metrics = Metrics() if wants_metrics or in_multiprocess_mode() else None
    proxy = Proxy(
        routes=options.config.routes if options.config is not None else None,
        interceptors=options.interceptors,
        connect_timeout=options.connect_timeout,
        idle_timeout=options.idle_timeout,
        max_flows=options.max_flows,
        reuse_port=worker is not None,
        source_port=options.source_port,
        forwards=options.forwards,
        on_event=log_event if metrics is None else _both(log_event, metrics.on_event),
        udp_idle_timeout=options.udp_idle_timeout,
        max_udp_sessions=options.max_udp_sessions,
        udp_gso=options.udp_gso,
    )

    def after_bind() -> None:
        report_ready()
        identity = options.identity
        if identity is not None:
            try:
                drop_to(identity)
            except OSError as exc:
                raise CommandError(f"cannot run as {identity.user}: {exc.strerror}") from None
            LOGGER.info("running as %s with CAP_NET_ADMIN only", identity.user)

    # A worker's metrics are served by the parent, which sums every worker's.
    serve_at = options.metrics if worker is None else None
    # Everything made so far (modules, the CLI, interceptors) lives as long as the process:
    # kept out of the collector's full passes, which otherwise walk it over and over while
    # flows come and go (about 3% of the CPU per short flow, measured with gc off).
    gc.freeze()
    reload_file = None if options.config is None else partial(reload_routes, proxy, options.config)
    control = None
    if options.control is not None:
        toxics = options.toxics or toxic_kit()
        calls = Control(proxy, toxics.make, toxics.types, seed=options.seed, reload=reload_file)
        control = (options.control, calls)
    reload = None
    if reload_file is not None:
        reload = partial(_reload, reload_file, None if control is None else control[1])
    return run_unwrapped(
        run_proxy,
        proxy,
        options.addresses,
        options.grace,
        after_bind,
        metrics,
        serve_at,
        reload,
        control,
        options.udp_addresses,
    )


def _reload(reload_file: Callable[[], str | None], control: Control | None) -> None:
    """SIGHUP: as ``POST /reload`` when the control API runs, so that it keeps the toxics of
    the routes that stay and drops those of the routes that went."""
    if control is None:
        reload_file()
        return
    try:
        control.reload()
    except ApiError:
        pass  # refused, and logged as such by reload_routes


def reload_routes(proxy: Proxy, started_with: ConfigFile) -> str | None:
    """SIGHUP: read the config file again and take new flows by its routes. A file that does
    not read, or whose interceptors do not load, is refused in one line, and the routes in
    use stay, and the line is returned (for ``POST /reload``); ``None`` when it was taken.
    Only ``[[routes]]`` are reloaded: the other keys take effect at the next start.

    The file is read and its SPECs loaded on the event loop, which pauses the flows for as
    long as that takes; a reload is rare, and it never leaves a half-made table.
    """
    path = started_with.path
    try:
        config = read_config(path)
    except ConfigError as exc:
        in_use = len(proxy.routes or ())
        LOGGER.error("reload refused, the %d routes in use stay: %s", in_use, exc)
        return f"reload refused, the {in_use} routes in use stay: {exc}"
    proxy.set_routes(config.routes)
    LOGGER.info("reloaded %d routes from %s", len(config.routes), path)
    changed = sorted(
        key
        for key in config.options.keys() | started_with.options.keys()
        if config.options.get(key) != started_with.options.get(key)
    )
    if changed:
        LOGGER.warning(
            "%s: %s changed: from the next start (SIGHUP reloads [[routes]] only)",
            path,
            ", ".join(changed),
        )
    return None


def _both(first: EventSink, second: EventSink) -> EventSink:
    def emit(event: FlowEvent) -> None:
        first(event)
        second(event)

    return emit


def _run_workers(options: ServeOptions) -> int:
    """The parent of ``--workers``: every worker is this same command with ``--workers 1``."""
    count = options.workers
    max_flows = options.max_flows
    share = None if max_flows is None else max(1, -(-max_flows // count))
    worker_args = [
        "serve",
        *(arg for address in options.listen for arg in ("--listen", address)),
        *("--connect-timeout", repr(options.connect_timeout), "--grace", repr(options.grace)),
        *(["--label", options.label] if options.label is not None else []),
        *(arg for spec in options.interceptor_specs for arg in ("--interceptor", spec)),
        *(["--max-flows", str(share)] if share is not None else []),
        *(["--idle-timeout", repr(options.idle_timeout)] if options.idle_timeout else []),
        *(arg for address in options.udp_listen for arg in ("--udp-listen", address)),
        *("--udp-idle-timeout", repr(options.udp_idle_timeout)),
        *("--max-udp-sessions", str(-(-options.max_udp_sessions // count))),
        *("--udp-gso", "on" if options.udp_gso else "off"),
        *("--source-port", options.source_port),
        *(["--user", options.user] if options.user is not None else []),
        *(["--group", options.group] if options.group is not None else []),
        *("--log-level", options.log_level, "--log-format", options.log_format),
        *(["--config", str(options.config.path)] if options.config is not None else []),
        *("--workers", "1"),
    ]
    with ExitStack() as cleanup:
        if options.metrics is not None:
            directory = tempfile.mkdtemp(prefix="uproxy-metrics-")
            cleanup.callback(shutil.rmtree, directory, ignore_errors=True)
            os.environ[MULTIPROC_ENV] = directory  # inherited by the workers
        supervisor = Supervisor(
            lambda index: worker_args,
            count,
            options.grace,
            options.metrics,
            forward_reload=options.config is not None,
        )
        return run_unwrapped(supervisor.run)


def raise_fd_limit() -> None:
    """Every flow costs two descriptors; the usual soft limit of 1024 would cap a proxy at
    about 500 flows although the hard limit allows far more."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        LOGGER.info("open-file limit raised from %d to %s", soft, hard)


async def run_proxy(
    proxy: Proxy,
    listen: Sequence[Address],
    grace: float,
    after_bind: Callable[[], None],
    metrics: Metrics | None,
    metrics_address: Address | None,
    reload: Callable[[], None] | None = None,
    control: tuple[HttpAddress, Control] | None = None,
    udp_listen: Sequence[Address] = (),
) -> int:
    """Serve until SIGINT or SIGTERM, then drain: no new flows, ``grace`` seconds for those in
    flight, then reset the rest. A second signal resets them at once. With ``reload``,
    SIGHUP calls it, at any time, and the proxy goes on.

    The signal receiver is opened before the listeners, so a signal that arrives while they
    are being bound still stops the proxy cleanly instead of raising KeyboardInterrupt.
    """
    flows_reset = 0
    stop_signals = (signal.SIGINT, signal.SIGTERM)
    reload_signals = (signal.SIGHUP,) if reload is not None else ()
    with trio.open_signal_receiver(*stop_signals, *reload_signals) as signals:
        async with trio.open_nursery() as nursery:
            if metrics is not None:
                nursery.start_soon(metrics.keep_sampling, proxy)
                if metrics_address is not None:
                    await nursery.start(serve_metrics, metrics_address, metrics.render)

            async def serve(task_status: trio.TaskStatus[list[Address]]) -> None:
                await proxy.serve(listen, udp_listen=udp_listen, task_status=task_status)
                nursery.cancel_scope.cancel()  # drained: the helpers above are done too

            bound = await nursery.start(serve)
            if control is not None:
                where, calls = control
                extra = [metrics_route(metrics.render)] if metrics is not None else []
                app = control_app(calls, extra)
                await nursery.start(serve_http, where, app, "the control API")
            after_bind()
            ready_on = [format_address(a) for a in bound]
            ready_on += [f"UDP {format_address(a)}" for a in proxy.udp.listening]
            LOGGER.info("ready on %s", ", ".join(ready_on))

            async def drain() -> None:
                nonlocal flows_reset
                flows_reset = await proxy.drain(grace)

            draining = False
            async for signum in signals:
                name = signal.Signals(signum).name
                if signum in reload_signals:
                    assert reload is not None
                    reload()
                elif not draining:
                    LOGGER.info(
                        "%s received: draining %d flows for up to %ss (a second signal resets "
                        "them)",
                        name,
                        proxy.active_flows,
                        grace,
                    )
                    nursery.start_soon(drain)
                    draining = True
                else:
                    flows_reset = proxy.active_flows
                    LOGGER.warning("%s received again: resetting %d flows", name, flows_reset)
                    nursery.cancel_scope.cancel()
                    break
    if flows_reset:
        LOGGER.warning("stopped; %d flows were reset", flows_reset)
        return EXIT_FLOWS_RESET
    LOGGER.info("stopped; every flow finished")
    return EXIT_DRAINED
