"""The benchmark of issue 4: the same traffic through each relay, one after another.

The relays are the kernel forwarding on its own (a plain router: the floor every proxy is
measured against), HAProxy in transparent mode (the established user-space proxy),
``uproxy serve`` without and with an identity interceptor (both at ``--log-level warning``, so
their figures are the relay's, not the logging's), and ``uproxy serve`` at its default level,
a log line per flow, as a user who passes no option runs it. Each gets the same measurements:
one bulk TCP flow each way (iperf3), small HTTP requests over kept-alive connections and with
a new connection per request (wrk against nginx), and, for uproxy, the memory an idle flow
costs. Each relay gets a fresh lab with its own nginx and iperf3 server, so none inherits
another's kernel state. The figures come from one run on one host, so only their ratios mean
much.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from ._haproxy import running_haproxy
from ._idle import IdleResult, ensure_open_files, measure_idle_flows
from ._iperf import measure_throughput, running_iperf_server
from ._lab import SERVER_V4, Lab, sweep_stale_labs
from ._nginx import running_nginx
from ._packages import ensure_packages
from ._rules import TproxySetup
from ._services import Service, kill_everything_in
from ._uproxy import BENCH_LOG_LEVEL, running_uproxy
from ._wrk import HttpResult, measure_http

# Server ports, all inside the intercepted range; the proxy listens on 127.0.0.1:9091.
HTTP_PORT = 9090
IPERF_PORT = 9092
IDLE_PORT = 9093
PROXY_LISTEN_HOST = "127.0.0.1"
PROXY_LISTEN_PORT = 9091
_INTERCEPTED_PORTS = "9090:9099"

# uproxy runs behind the seed's rules, as its README sets it up; HAProxy behind the same with
# "! --syn" on the socket shortcut, so that its figures are not held back by it. The option
# matters once client ports repeat: a proxy that passes on nginx's close is first to close
# towards the client, so its client-side socket waits in TIME_WAIT, and a SYN reusing that port
# matches it through "-m socket" and is routed to it instead of reaching TPROXY; the client's
# connect stalls until it retries. A 3 s run of uproxy alone uses too few ports for that; a
# longer one may show it as a lower new-connection rate. --uproxy-syn-to-tproxy compares.
SEED_RULES = TproxySetup(ports=_INTERCEPTED_PORTS, listen_port=PROXY_LISTEN_PORT)
SYN_RULES = TproxySetup(ports=_INTERCEPTED_PORTS, listen_port=PROXY_LISTEN_PORT, syn_to_tproxy=True)

IDENTITY_INTERCEPTOR = "uproxy_netns.interceptors:identity"

# wrk threads: the lab host has two cores (shared with the relays under test).
_WRK_THREADS = 2

Progress = Callable[[str], None]


class Relay(StrEnum):
    """What carries the traffic between the client and server namespaces."""

    KERNEL = "kernel"
    HAPROXY = "haproxy"
    UPROXY = "uproxy"
    UPROXY_DEFAULT_LOGGING = "uproxy-default-logging"
    """uproxy as ``uproxy`` is, at serve's default log level instead of ``warning``."""
    UPROXY_IDENTITY = "uproxy-identity"

    @property
    def is_uproxy(self) -> bool:
        return self in (Relay.UPROXY, Relay.UPROXY_DEFAULT_LOGGING, Relay.UPROXY_IDENTITY)

    @property
    def measures_idle(self) -> bool:
        """Whether the proxy's memory per idle flow is measured. Not for
        uproxy-default-logging: an idle flow logs nothing before it closes, so its memory is
        ``uproxy``'s, and holding thousands of flows would only lengthen the run."""
        return self in (Relay.UPROXY, Relay.UPROXY_IDENTITY)


def uproxy_log_level(relay: Relay) -> str | None:
    """uproxy's ``--log-level`` in ``relay``; ``None`` leaves serve's default."""
    return None if relay is Relay.UPROXY_DEFAULT_LOGGING else BENCH_LOG_LEVEL


def rules_for(relay: Relay, settings: BenchSettings) -> TproxySetup | None:
    """The proxy host's TPROXY rules for ``relay``; ``None`` is a plain router."""
    if relay is Relay.KERNEL:
        return None
    if relay is Relay.HAPROXY or settings.uproxy_syn_to_tproxy:
        return SYN_RULES
    return SEED_RULES


def describe_rules(rules: TproxySetup | None) -> str:
    if rules is None:
        return "none (plain router)"
    if rules.syn_to_tproxy:
        return f"seed TPROXY + ! --syn, ports {rules.ports}"
    return f"seed TPROXY, ports {rules.ports}"


@dataclass(frozen=True, slots=True)
class BenchSettings:
    relays: tuple[Relay, ...] = tuple(Relay)
    duration_s: int = 3
    """Length of each iperf3 and wrk run."""
    idle_flows: int = 4000
    connections: int = 32
    """wrk's concurrent connections, for both HTTP benchmarks."""
    uproxy_syn_to_tproxy: bool = False
    """Put uproxy behind HAProxy's rules (with ``! --syn``) instead of the seed's."""
    workers: int = 1
    """uproxy's ``--workers`` and HAProxy's ``nbthread``, the same for both."""


@dataclass(frozen=True, slots=True)
class RelayResult:
    relay: Relay
    rules: str
    client_to_server_bps: float
    server_to_client_bps: float
    keep_alive: HttpResult
    new_connection: HttpResult
    idle: IdleResult | None
    """Measured for uproxy only (``Relay.measures_idle``)."""
    lab: str
    """The lab's tag: its namespaces were ``TAG-client``, ``TAG-proxy``, ``TAG-server``."""
    pids: tuple[int, ...]
    """Every daemon started for this relay; all are gone once its result exists."""
    command: tuple[str, ...] = ()
    """The proxy's command line as it ran (empty for kernel forwarding): the options a run
    is to be reproduced with, ``--log-level`` among them."""


@dataclass(frozen=True, slots=True)
class BenchReport:
    settings: BenchSettings
    results: tuple[RelayResult, ...]


def run_bench(settings: BenchSettings, progress: Progress) -> BenchReport:
    """Run every relay of ``settings`` in turn, each on a lab of its own; ``LabError`` if a step
    fails.

    Daemons are stopped and labs and the temporary directory removed however this ends, Ctrl-C
    included.
    """
    installed = ensure_packages()
    if installed:
        progress(f"installed {', '.join(installed)}")
    ensure_open_files(settings.idle_flows)
    sweep_stale_labs()
    with tempfile.TemporaryDirectory(prefix="uproxy-bench-") as workdir:
        progress(f"files in {workdir}")
        results = tuple(
            _bench_relay(relay, settings, Path(workdir) / str(relay), progress)
            for relay in settings.relays
        )
    return BenchReport(settings, results)


def _bench_relay(
    relay: Relay, settings: BenchSettings, workdir: Path, progress: Progress
) -> RelayResult:
    """Measure ``relay`` on a fresh lab.

    A lab of its own per relay, because what one relay leaves in the kernel would otherwise
    slow the next: on a shared lab uproxy's new-connection rate fell from about 2500 to 450
    requests/s when it ran after HAProxy, whose TIME_WAIT sockets (see the rules above) caught
    the client's SYNs.
    """
    rules = rules_for(relay, settings)
    with ExitStack() as stack:
        lab = stack.enter_context(Lab.owned(tproxy=rules))
        stack.callback(kill_everything_in, lab.namespaces)
        progress(f"{relay}: lab {lab.tag} up")
        daemons = [
            stack.enter_context(running_nginx(lab.server, workdir, SERVER_V4, HTTP_PORT)),
            stack.enter_context(running_iperf_server(lab.server, workdir, SERVER_V4, IPERF_PORT)),
        ]
        proxy = stack.enter_context(_running_relay(lab, relay, workdir, settings.workers))
        if proxy is not None:
            daemons.append(proxy)
        progress(f"{relay}: iperf3 client to server, then server to client")
        upload = measure_throughput(
            lab.client, SERVER_V4, IPERF_PORT, settings.duration_s, reverse=False
        )
        download = measure_throughput(
            lab.client, SERVER_V4, IPERF_PORT, settings.duration_s, reverse=True
        )
        progress(f"{relay}: wrk keep-alive, then a new connection per request")
        keep_alive = _wrk(lab, settings, keep_alive=True)
        new_connection = _wrk(lab, settings, keep_alive=False)
        idle = None
        if relay.measures_idle and proxy is not None:
            progress(f"{relay}: {settings.idle_flows} idle flows")
            idle = measure_idle_flows(
                lab.client, lab.server, SERVER_V4, IDLE_PORT, settings.idle_flows, proxy.pid
            )
        for daemon in daemons:
            daemon.check_alive()
    return RelayResult(
        relay,
        describe_rules(rules),
        upload,
        download,
        keep_alive,
        new_connection,
        idle,
        lab.tag,
        tuple(daemon.pid for daemon in daemons),
        () if proxy is None else proxy.command,
    )


def _wrk(lab: Lab, settings: BenchSettings, *, keep_alive: bool) -> HttpResult:
    return measure_http(
        lab.client,
        f"http://{SERVER_V4}:{HTTP_PORT}/",
        settings.duration_s,
        settings.connections,
        _WRK_THREADS,
        keep_alive=keep_alive,
    )


@contextmanager
def _running_relay(lab: Lab, relay: Relay, workdir: Path, workers: int) -> Iterator[Service | None]:
    """The proxy daemon ``relay`` needs, for the block; ``None`` for kernel forwarding."""
    if relay is Relay.KERNEL:
        yield None
        return
    if relay is Relay.HAPROXY:
        with running_haproxy(
            lab.proxy, workdir, PROXY_LISTEN_HOST, PROXY_LISTEN_PORT, workers
        ) as proxy:
            yield proxy
        return
    interceptors = [IDENTITY_INTERCEPTOR] if relay is Relay.UPROXY_IDENTITY else []
    with running_uproxy(
        lab.proxy,
        workdir,
        PROXY_LISTEN_HOST,
        PROXY_LISTEN_PORT,
        interceptors,
        name=str(relay),
        workers=workers,
        log_level=uproxy_log_level(relay),
    ) as proxy:
        yield proxy
