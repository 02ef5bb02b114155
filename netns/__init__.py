"""The three-host lab for uproxy-trio: client, proxy and server network namespaces."""

from ._bench import BenchReport, BenchSettings, Relay, RelayResult, run_bench
from ._idle import IdleResult
from ._lab import (
    CLIENT_V4,
    CLIENT_V6,
    PROXY_CLIENT_SIDE_V4,
    PROXY_CLIENT_SIDE_V6,
    PROXY_SERVER_SIDE_V4,
    PROXY_SERVER_SIDE_V6,
    SERVER_V4,
    SERVER_V6,
    Lab,
    sweep_stale_labs,
)
from ._namespace import LabError, Namespace
from ._rules import TproxySetup
from ._wrk import HttpResult

__all__ = [
    "CLIENT_V4",
    "CLIENT_V6",
    "PROXY_CLIENT_SIDE_V4",
    "PROXY_CLIENT_SIDE_V6",
    "PROXY_SERVER_SIDE_V4",
    "PROXY_SERVER_SIDE_V6",
    "SERVER_V4",
    "SERVER_V6",
    "BenchReport",
    "BenchSettings",
    "HttpResult",
    "IdleResult",
    "Lab",
    "LabError",
    "Namespace",
    "Relay",
    "RelayResult",
    "TproxySetup",
    "run_bench",
    "sweep_stale_labs",
]
