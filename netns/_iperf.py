"""iperf3 in the lab: a server in one namespace, one-flow runs from another, in bits per second."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ._namespace import LabError, Namespace
from ._packages import find_command
from ._services import Service, running

# A run that has not ended this long after its duration is stuck (a proxy that lost the
# control connection, say): give up on it rather than hang the bench.
_GRACE_S = 30


def _iperf3() -> str:
    return find_command("iperf3") or "iperf3"


@contextmanager
def running_iperf_server(
    namespace: Namespace, workdir: Path, host: str, port: int
) -> Iterator[Service]:
    """``iperf3 -s`` on ``host:port`` for the block; it serves one run after another."""
    argv = [_iperf3(), "--server", "--bind", host, "--port", str(port)]
    with running(namespace, "iperf3", argv, workdir / "iperf3", ready_port=port) as service:
        yield service


def measure_throughput(
    namespace: Namespace, host: str, port: int, duration_s: int, *, reverse: bool
) -> float:
    """Bits per second of one TCP flow to ``host:port`` over ``duration_s`` seconds, as received.

    ``reverse`` (iperf3 ``-R``) has the server send and the client receive.
    """
    argv = [
        _iperf3(),
        "--client",
        host,
        "--port",
        str(port),
        "--time",
        str(duration_s),
        "--parallel",
        "1",
        "--json",
    ]
    if reverse:
        argv.append("--reverse")
    return parse_iperf_json(namespace.run(argv, timeout=duration_s + _GRACE_S))


def parse_iperf_json(output: str) -> float:
    """The received bits per second from ``iperf3 --json`` output; ``LabError`` if absent."""
    try:
        report = json.loads(output)
    except json.JSONDecodeError as exc:
        raise LabError(f"iperf3 printed no JSON report: {output[:200]!r}") from exc
    if "error" in report:
        raise LabError(f"iperf3 failed: {report['error']}")
    try:
        return float(report["end"]["sum_received"]["bits_per_second"])
    except (KeyError, TypeError, ValueError) as exc:
        raise LabError(f"iperf3 report has no received rate: {exc}") from exc
