"""UDP through kernel forwarding and through ``uproxy serve``, measured the same way.

HAProxy has no UDP, so the floor (the kernel forwarding on its own) is the only comparison.
Each relay gets a fresh lab and: bulk UDP with ``iperf3 -u`` at 1400-byte datagrams (the
highest offered rate, among a few tried, that loses under 1%), 64-byte datagrams as fast as
iperf3 sends them (datagrams per second received), a request/response round trip (a small
UDP echo, median and 99th percentile), and, for uproxy, the memory an idle session costs.
One run on one host: only the ratios mean much.
"""

from __future__ import annotations

import json
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from ._idle import IdleResult, ensure_open_files
from ._iperf import _GRACE_S, _iperf3, running_iperf_server
from ._lab import CLIENT_V4, SERVER_V4, Lab, sweep_stale_labs
from ._namespace import LabError, Namespace
from ._packages import ensure_packages
from ._rules import TproxySetup
from ._services import Service, kill_everything_in, running
from ._udp_idle import measure_idle_sessions
from ._uproxy import running_uproxy

IPERF_PORT = 9094
ECHO_PORT = 9095
IDLE_PORT = 9096
PROXY_LISTEN_HOST = "127.0.0.1"
PROXY_LISTEN_PORT = 9091
UDP_RULES = TproxySetup(
    ports="9090:9099", listen_port=PROXY_LISTEN_PORT, syn_to_tproxy=True, udp_ports="9090:9099"
)

BULK_DATAGRAM = 1400
SMALL_DATAGRAM = 64
# Loss the bulk figure may have: its rate is the highest tried with less.
MAX_LOSS_PERCENT = 1.0
# Offered rates tried for bulk, as fractions of what was received when sending flat out.
_RATE_STEPS = (0.9, 0.75, 0.6, 0.45, 0.3, 0.2, 0.1)
# The echo's request/response pairs, one at a time.
ECHO_ROUNDS = 2000
_ECHO_TIMEOUT_S = 2.0

# The echo server, run in the server namespace by this interpreter.
_ECHO_SERVER = """
import socket, sys
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind((sys.argv[1], int(sys.argv[2])))
while True:
    data, peer = sock.recvfrom(2048)
    sock.sendto(data, peer)
"""

Progress = Callable[[str], None]


class UdpRelay(StrEnum):
    KERNEL = "kernel"
    UPROXY = "uproxy"
    UPROXY_IDENTITY = "uproxy-identity"


@dataclass(frozen=True, slots=True)
class UdpSettings:
    relays: tuple[UdpRelay, ...] = tuple(UdpRelay)
    duration_s: int = 3
    idle_sessions: int = 9500


@dataclass(frozen=True, slots=True)
class UdpResult:
    relay: UdpRelay
    bulk_bps: float
    """Received bits per second at the highest offered rate with under 1% loss."""
    bulk_loss_percent: float
    small_pps: float
    """64-byte datagrams received per second, sent flat out."""
    small_loss_percent: float
    rtt_median_us: float
    rtt_p99_us: float
    idle: IdleResult | None
    lab: str


def run_udp_bench(settings: UdpSettings, progress: Progress) -> tuple[UdpResult, ...]:
    """Every relay of ``settings`` in turn, each on a lab of its own."""
    installed = ensure_packages()
    if installed:
        progress(f"installed {', '.join(installed)}")
    ensure_open_files(settings.idle_sessions)
    sweep_stale_labs()
    with tempfile.TemporaryDirectory(prefix="uproxy-bench-udp-") as workdir:
        return tuple(
            _bench_relay(relay, settings, Path(workdir) / str(relay), progress)
            for relay in settings.relays
        )


def _bench_relay(
    relay: UdpRelay, settings: UdpSettings, workdir: Path, progress: Progress
) -> UdpResult:
    rules = None if relay is UdpRelay.KERNEL else UDP_RULES
    with ExitStack() as stack:
        lab = stack.enter_context(Lab.owned(tproxy=rules))
        stack.callback(kill_everything_in, lab.namespaces)
        progress(f"{relay}: lab {lab.tag} up")
        daemons: list[Service] = [
            stack.enter_context(running_iperf_server(lab.server, workdir, SERVER_V4, IPERF_PORT)),
            stack.enter_context(
                running(
                    lab.server,
                    "udp-echo",
                    [sys.executable, "-c", _ECHO_SERVER, SERVER_V4, str(ECHO_PORT)],
                    workdir,
                )
            ),
        ]
        proxy = None
        if relay is not UdpRelay.KERNEL:
            interceptors = (
                ["uproxy_netns.interceptors:identity"] if relay is UdpRelay.UPROXY_IDENTITY else []
            )
            proxy = stack.enter_context(
                running_uproxy(
                    lab.proxy,
                    workdir,
                    PROXY_LISTEN_HOST,
                    PROXY_LISTEN_PORT,
                    interceptors,
                    name=str(relay),
                    extra=["--udp-listen", f"{PROXY_LISTEN_HOST}:{PROXY_LISTEN_PORT}"],
                )
            )
            daemons.append(proxy)
        progress(f"{relay}: iperf3 -u, {BULK_DATAGRAM}-byte datagrams")
        bulk_bps, bulk_loss = _bulk(lab.client, settings.duration_s)
        progress(f"{relay}: iperf3 -u, {SMALL_DATAGRAM}-byte datagrams flat out")
        small = _iperf_udp(lab.client, settings.duration_s, SMALL_DATAGRAM, "0")
        progress(f"{relay}: UDP echo, {ECHO_ROUNDS} round trips")
        rtts = _echo_round_trips(lab.client)
        idle = None
        if relay is UdpRelay.UPROXY and proxy is not None:
            progress(f"{relay}: {settings.idle_sessions} idle sessions")
            idle = measure_idle_sessions(
                lab.client,
                lab.server,
                CLIENT_V4,
                SERVER_V4,
                IDLE_PORT,
                settings.idle_sessions,
                proxy.pid,
            )
        for daemon in daemons:
            daemon.check_alive()
    return UdpResult(
        relay,
        bulk_bps,
        bulk_loss,
        small.received_pps,
        small.loss_percent,
        statistics.median(rtts),
        _percentile(rtts, 0.99),
        idle,
        lab.tag,
    )


@dataclass(frozen=True, slots=True)
class _UdpRun:
    received_bps: float
    received_pps: float
    loss_percent: float


def _bulk(client: Namespace, duration_s: int) -> tuple[float, float]:
    """The received rate at the highest offered rate that loses under 1%, and its loss.

    Flat out first; then fractions of what flat out delivered, highest first."""
    flat_out = _iperf_udp(client, duration_s, BULK_DATAGRAM, "0")
    if flat_out.loss_percent < MAX_LOSS_PERCENT:
        return flat_out.received_bps, flat_out.loss_percent
    lossy = 1.0
    for fraction in _RATE_STEPS:
        run = _iperf_udp(client, duration_s, BULK_DATAGRAM, _rate(flat_out, fraction))
        if run.loss_percent < MAX_LOSS_PERCENT:
            # One more try halfway to the step above, which lost too much.
            between = _iperf_udp(
                client, duration_s, BULK_DATAGRAM, _rate(flat_out, (fraction + lossy) / 2)
            )
            if between.loss_percent < MAX_LOSS_PERCENT and between.received_bps > run.received_bps:
                run = between
            break
        lossy = fraction
    # Still 1% or more at the lowest rate (a host busy with something else): that run's
    # figures, whose loss the report shows.
    return run.received_bps, run.loss_percent


def _rate(flat_out: _UdpRun, fraction: float) -> str:
    return str(int(flat_out.received_bps * fraction))


def _iperf_udp(client: Namespace, duration_s: int, length: int, bitrate: str) -> _UdpRun:
    argv = [
        _iperf3(),
        "--client",
        SERVER_V4,
        "--port",
        str(IPERF_PORT),
        "--udp",
        "--length",
        str(length),
        "--bitrate",
        bitrate,
        "--time",
        str(duration_s),
        # Socket buffers both ends: a receiver descheduled for a moment on a shared host
        # would otherwise lose what the relay delivered, and count it against the relay.
        "--window",
        "4M",
        "--json",
    ]
    output = client.run(argv, timeout=duration_s + _GRACE_S)
    try:
        report = json.loads(output)
        total = report["end"]["sum"]
        seconds = float(total["seconds"])
        packets, lost = int(total["packets"]), int(total["lost_packets"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise LabError(f"iperf3 -u printed no usable report: {output[:200]!r}") from exc
    received = packets - lost
    return _UdpRun(
        received * length * 8 / seconds,
        received / seconds,
        100.0 * lost / packets if packets else 100.0,
    )


def _echo_round_trips(client: Namespace) -> list[float]:
    """Microseconds per request/response with the echo server, one at a time."""
    rtts = []
    with client.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(_ECHO_TIMEOUT_S)
        sock.bind((CLIENT_V4, 0))
        server = (SERVER_V4, ECHO_PORT)
        request = b"x" * SMALL_DATAGRAM
        deadline = time.monotonic() + 10
        while True:  # the echo server may still be starting
            try:
                sock.sendto(request, server)
                sock.recv(2048)
                break
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise LabError("the UDP echo server never answered") from None
        clock = time.perf_counter
        for _ in range(ECHO_ROUNDS):
            started = clock()
            sock.sendto(request, server)
            try:
                sock.recv(2048)
            except TimeoutError:
                continue  # lost: left out of the figures
            rtts.append((clock() - started) * 1e6)
    if not rtts:
        raise LabError("no UDP echo came back")
    return rtts


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def format_udp_report(results: tuple[UdpResult, ...]) -> str:
    """A table of the figures, with uproxy's as ratios of the kernel's where it ran."""
    kernel = next((r for r in results if r.relay is UdpRelay.KERNEL), None)
    lines = [
        f"{'relay':<16} {'bulk Mbit/s':>12} {'loss':>6} {'64B kpps':>9} {'loss':>6} "
        f"{'rtt p50 us':>11} {'rtt p99 us':>11}"
    ]
    for r in results:
        lines.append(
            f"{r.relay:<16} {r.bulk_bps / 1e6:>12.0f} {r.bulk_loss_percent:>5.2f}% "
            f"{r.small_pps / 1e3:>9.1f} {r.small_loss_percent:>5.1f}% "
            f"{r.rtt_median_us:>11.0f} {r.rtt_p99_us:>11.0f}"
        )
    if kernel is not None:
        for r in results:
            if r is kernel:
                continue
            lines.append(
                f"{r.relay} / kernel: bulk {r.bulk_bps / kernel.bulk_bps:.2f}, "
                f"64-byte pps {r.small_pps / kernel.small_pps:.2f}, "
                f"rtt p50 {r.rtt_median_us / kernel.rtt_median_us:.2f}"
            )
    for r in results:
        if r.idle is not None:
            lines.append(
                f"{r.relay}: {r.idle.flows} idle sessions, {r.idle.kib_per_flow:.1f} KiB each, "
                f"{r.idle.relayed} still answering"
            )
    return "\n".join(lines)
