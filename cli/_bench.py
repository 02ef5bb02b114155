"""``uproxy bench``: kernel forwarding, HAProxy and uproxy measured on one throwaway lab."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Annotated

import typer

from uproxy_netns import (
    BenchSettings,
    LabError,
    Relay,
    UdpRelay,
    UdpSettings,
    format_udp_report,
    run_bench,
    run_udp_bench,
)

from ._bench_report import format_report, report_as_json
from ._errors import CommandError
from ._help import choices

_DEFAULTS = BenchSettings()
_UDP_DEFAULTS = UdpSettings()

# 128 + SIGINT: what a shell reports for a command stopped by Ctrl-C.
EXIT_INTERRUPTED = 130


def bench(
    duration: Annotated[
        int,
        typer.Option(
            "--duration",
            min=1,
            metavar="SECONDS",
            help="Length of each iperf3 and wrk run (whole seconds).",
        ),
    ] = _DEFAULTS.duration_s,
    idle_flows: Annotated[
        int,
        typer.Option(
            "--idle-flows",
            min=1,
            metavar="N",
            help="Idle flows held through uproxy to measure its memory per flow.",
        ),
    ] = _DEFAULTS.idle_flows,
    relay: Annotated[
        list[Relay] | None,
        typer.Option(
            "--relay",
            metavar=choices([relay.value for relay in Relay]),
            help="Measure only this relay; repeat for more.",
            show_default="all five, in that order",
        ),
    ] = None,
    uproxy_syn_to_tproxy: Annotated[
        bool,
        typer.Option(
            "--uproxy-syn-to-tproxy",
            help="Put uproxy behind HAProxy's rules (! --syn on the socket shortcut) instead "
            "of the seed's.",
        ),
    ] = False,
    workers: Annotated[
        int,
        typer.Option(
            "--workers",
            min=1,
            metavar="N",
            help="uproxy's --workers and HAProxy's nbthread, the same for both.",
        ),
    ] = _DEFAULTS.workers,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print the figures as JSON instead of a table.")
    ] = False,
    udp: Annotated[
        bool,
        typer.Option(
            "--udp",
            help="Measure UDP instead: kernel forwarding and uproxy (HAProxy has no UDP); "
            "bulk at 1400 bytes under 1% loss, 64-byte datagrams per second, echo round "
            "trips, and memory per idle session (--idle-flows sessions, default 9500).",
        ),
    ] = False,
) -> None:
    """Measure throughput, HTTP request rates and idle-flow memory through each relay.

    Kernel forwarding, HAProxy and uproxy serve, each on a fresh lab of namespaces. Needs root.

    uproxy runs at --log-level warning; uproxy-default-logging at serve's default level.
    """
    # One line per paragraph above: --help keeps the docstring's line breaks.
    if os.geteuid() != 0:
        raise CommandError("uproxy bench needs root (network namespaces, iptables, apt-get)")
    if udp:
        _bench_udp(_udp_relays(relay), _udp_idle_sessions(idle_flows), duration, json_output)
        return
    settings = BenchSettings(
        relays=_in_bench_order(relay or list(Relay)),
        duration_s=duration,
        idle_flows=idle_flows,
        uproxy_syn_to_tproxy=uproxy_syn_to_tproxy,
        workers=workers,
    )
    with _one_line_errors():
        report = run_bench(settings, _progress)
    if json_output:
        print(json.dumps(report_as_json(report), indent=2))
    else:
        print(format_report(report), end="")


def _udp_idle_sessions(idle_flows: int) -> int:
    """``--idle-flows`` for the UDP bench: its own default when left at the TCP one."""
    return _UDP_DEFAULTS.idle_sessions if idle_flows == _DEFAULTS.idle_flows else idle_flows


def _udp_relays(relays: list[Relay] | None) -> tuple[UdpRelay, ...]:
    """``--relay`` for ``--udp``: the relays that have UDP, in bench order."""
    if not relays:
        return tuple(UdpRelay)
    names = {relay.value for relay in relays}
    missing = names - {relay.value for relay in UdpRelay}
    if missing:
        raise typer.BadParameter(
            f"{', '.join(sorted(missing))}: no UDP (with --udp: "
            f"{', '.join(relay.value for relay in UdpRelay)})",
            param_hint="'--relay'",
        )
    return tuple(relay for relay in UdpRelay if relay.value in names)


def _bench_udp(
    relays: tuple[UdpRelay, ...], idle_sessions: int, duration: int, json_output: bool
) -> None:
    settings = UdpSettings(relays=relays, duration_s=duration, idle_sessions=idle_sessions)
    with _one_line_errors():
        results = run_udp_bench(settings, _progress)
    if json_output:
        print(json.dumps([dataclasses.asdict(result) for result in results], indent=2))
    else:
        print(format_udp_report(results))


@contextmanager
def _one_line_errors() -> Iterator[None]:
    """A bench run, which ``kill`` and Ctrl-C interrupt alike: a lab that fails, or the
    interruption, is one line (the bench has stopped its daemons and deleted its labs on the
    way out)."""
    try:
        with _sigterm_as_interrupt():
            yield
    except LabError as exc:
        raise CommandError(str(exc)) from None
    except KeyboardInterrupt:
        raise CommandError("interrupted", EXIT_INTERRUPTED) from None


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Let ``kill`` clean up as Ctrl-C does: the daemons run in sessions of their own and would
    outlive a bench that died of SIGTERM's default action."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _in_bench_order(relays: list[Relay]) -> tuple[Relay, ...]:
    """Each chosen relay once, baselines first, whatever order they were given in."""
    return tuple(relay for relay in Relay if relay in relays)


def _progress(message: str) -> None:
    print(f"uproxy bench: {message}", file=sys.stderr, flush=True)
