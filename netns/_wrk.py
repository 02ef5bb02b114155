"""wrk against the lab's nginx: requests per second, and every error wrk counted."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ._namespace import LabError, Namespace
from ._packages import find_command

# wrk stops on its own after --duration; past this grace it is stuck.
_GRACE_S = 30

_REQUESTS_PER_S = re.compile(r"^Requests/sec:\s+([\d.]+)", re.MULTILINE)
_REQUESTS = re.compile(r"^\s*(\d+) requests in ", re.MULTILINE)
_SOCKET_ERRORS = re.compile(
    r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", re.MULTILINE
)
_BAD_STATUS = re.compile(r"Non-2xx or 3xx responses: (\d+)", re.MULTILINE)


@dataclass(frozen=True, slots=True)
class HttpResult:
    """One wrk run."""

    requests_per_s: float
    requests: int
    errors: int
    """Socket errors (connect, read, write, timeout) plus non-2xx/3xx responses."""


def measure_http(
    namespace: Namespace,
    url: str,
    duration_s: int,
    connections: int,
    threads: int,
    *,
    keep_alive: bool,
) -> HttpResult:
    """Run wrk from ``namespace`` against ``url``; without ``keep_alive`` every request asks
    for ``Connection: close``, so each one costs a new TCP connection."""
    argv = [
        find_command("wrk") or "wrk",
        "--threads",
        str(min(threads, connections)),
        "--connections",
        str(connections),
        "--duration",
        f"{duration_s}s",
    ]
    if not keep_alive:
        argv += ["--header", "Connection: close"]
    argv.append(url)
    return parse_wrk_output(namespace.run(argv, timeout=duration_s + _GRACE_S))


def parse_wrk_output(output: str) -> HttpResult:
    """Read wrk's plain-text summary; ``LabError`` if it has no request rate."""
    rate = _REQUESTS_PER_S.search(output)
    count = _REQUESTS.search(output)
    if rate is None or count is None:
        raise LabError(f"wrk printed no request rate: {output[:300]!r}")
    errors = 0
    if socket_errors := _SOCKET_ERRORS.search(output):
        errors += sum(int(group) for group in socket_errors.groups())
    if bad_status := _BAD_STATUS.search(output):
        errors += int(bad_status.group(1))
    return HttpResult(float(rate.group(1)), int(count.group(1)), errors)
