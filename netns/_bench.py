"""The benchmark of issue 4: the same traffic through each relay on one lab, one after another.

The relays are the kernel forwarding on its own (a plain router: the floor every proxy is
measured against), HAProxy in transparent mode (the established user-space proxy), and
``uproxy serve`` without and with an identity interceptor. Each gets the same measurements:
one bulk TCP flow each way (iperf3), small HTTP requests over kept-alive connections and with
a new connection per request (wrk against nginx), and, for uproxy, the memory an idle flow
costs. nginx and the iperf3 server run once for the whole bench; rules and proxy change
between relays. The figures come from one run on one host, so only their ratios mean much.
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
from ._services import Service
from ._uproxy import running_uproxy
from ._wrk import HttpResult, measure_http

# Server ports, all inside the intercepted range; the proxy listens on 127.0.0.1:9091.
HTTP_PORT = 9090
IPERF_PORT = 9092
IDLE_PORT = 9093
PROXY_LISTEN_HOST = "127.0.0.1"
PROXY_LISTEN_PORT = 9091
_INTERCEPTED_PORTS = "9090:9099"

# uproxy runs behind the seed's rules, as its README sets it up; HAProxy behind the same with
# "! --syn" on the socket shortcut, as its transparent mode is usually deployed. The option
# matters once client ports repeat: a proxy that passes on nginx's close is first to close
# towards the client, so its client-side socket waits in TIME_WAIT, and a SYN reusing that port
# matches it through "-m socket", is routed to it and reset instead of reaching TPROXY. A 3 s
# run uses too few ports for that (none seen); a long new-connection run would show it in the
# errors column.
UPROXY_RULES = TproxySetup(ports=_INTERCEPTED_PORTS, listen_port=PROXY_LISTEN_PORT)
HAPROXY_RULES = TproxySetup(
    ports=_INTERCEPTED_PORTS, listen_port=PROXY_LISTEN_PORT, syn_to_tproxy=True
)

IDENTITY_INTERCEPTOR = "uproxy_netns.interceptors:identity"

# wrk threads: the lab host has two cores (shared with the relays under test).
_WRK_THREADS = 2

Progress = Callable[[str], None]


class Relay(StrEnum):
    """What carries the traffic between the client and server namespaces."""

    KERNEL = "kernel"
    HAPROXY = "haproxy"
    UPROXY = "uproxy"
    UPROXY_IDENTITY = "uproxy-identity"

    @property
    def rules(self) -> TproxySetup | None:
        """The proxy host's TPROXY rules for this relay; ``None`` is a plain router."""
        if self is Relay.KERNEL:
            return None
        return HAPROXY_RULES if self is Relay.HAPROXY else UPROXY_RULES

    @property
    def is_uproxy(self) -> bool:
        return self in (Relay.UPROXY, Relay.UPROXY_IDENTITY)


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


@dataclass(frozen=True, slots=True)
class RelayResult:
    relay: Relay
    rules: str
    client_to_server_bps: float
    server_to_client_bps: float
    keep_alive: HttpResult
    new_connection: HttpResult
    idle: IdleResult | None
    """Measured for uproxy only."""


@dataclass(frozen=True, slots=True)
class BenchReport:
    settings: BenchSettings
    lab: str
    """The lab's tag: its namespaces were ``TAG-client``, ``TAG-proxy``, ``TAG-server``."""
    pids: tuple[int, ...]
    """Every daemon the bench started; all are gone when ``run_bench`` returns."""
    results: tuple[RelayResult, ...]


def run_bench(settings: BenchSettings, progress: Progress) -> BenchReport:
    """Run every relay of ``settings`` in turn on one lab; ``LabError`` if a step fails.

    Daemons are stopped and the lab and its temporary directory removed however this ends,
    Ctrl-C included.
    """
    installed = ensure_packages()
    if installed:
        progress(f"installed {', '.join(installed)}")
    ensure_open_files(settings.idle_flows)
    sweep_stale_labs()
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="uproxy-bench-")))
        lab = stack.enter_context(Lab.owned(tproxy=None))
        progress(f"lab {lab.tag} up; files in {workdir}")
        daemons = [
            stack.enter_context(running_nginx(lab.server, workdir, SERVER_V4, HTTP_PORT)),
            stack.enter_context(running_iperf_server(lab.server, workdir, SERVER_V4, IPERF_PORT)),
        ]
        results = []
        for relay in settings.relays:
            result, proxy = _bench_relay(lab, relay, settings, workdir, progress)
            results.append(result)
            daemons += [proxy] if proxy is not None else []
        tag = lab.tag
    return BenchReport(settings, tag, tuple(daemon.pid for daemon in daemons), tuple(results))


def _bench_relay(
    lab: Lab, relay: Relay, settings: BenchSettings, workdir: Path, progress: Progress
) -> tuple[RelayResult, Service | None]:
    rules = relay.rules
    if rules is None:
        lab.remove_tproxy()
    else:
        lab.install_tproxy(rules)
    with _running_relay(lab, relay, workdir) as proxy:
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
        if relay.is_uproxy and proxy is not None:
            progress(f"{relay}: {settings.idle_flows} idle flows")
            idle = measure_idle_flows(
                lab.client, lab.server, SERVER_V4, IDLE_PORT, settings.idle_flows, proxy.pid
            )
        if proxy is not None:
            proxy.check_alive()
    result = RelayResult(
        relay, describe_rules(rules), upload, download, keep_alive, new_connection, idle
    )
    return result, proxy


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
def _running_relay(lab: Lab, relay: Relay, workdir: Path) -> Iterator[Service | None]:
    """The proxy daemon ``relay`` needs, for the block; ``None`` for kernel forwarding."""
    if relay is Relay.KERNEL:
        yield None
        return
    if relay is Relay.HAPROXY:
        with running_haproxy(lab.proxy, workdir, PROXY_LISTEN_HOST, PROXY_LISTEN_PORT) as proxy:
            yield proxy
        return
    interceptors = [IDENTITY_INTERCEPTOR] if relay is Relay.UPROXY_IDENTITY else []
    with running_uproxy(
        lab.proxy, workdir, PROXY_LISTEN_HOST, PROXY_LISTEN_PORT, interceptors, name=str(relay)
    ) as proxy:
        yield proxy
