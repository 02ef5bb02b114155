"""The three-host lab for uproxy-trio: client, proxy and server network namespaces."""

from ._bench import BenchReport, BenchSettings, Relay, RelayResult, run_bench
from ._idle import IdleResult
from ._install import apply_setup, has_local_route, has_policy_rule, remove_setup
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
    kept_labs,
    sweep_stale_labs,
)
from ._namespace import LabError, Namespace
from ._rules import BACKENDS, PortRange, TproxySetup, merge_port_ranges, parse_port_range
from ._udp_bench import UdpRelay, UdpResult, UdpSettings, format_udp_report, run_udp_bench
from ._udp_idle import measure_idle_sessions
from ._wrk import HttpResult

__all__ = [
    "BACKENDS",
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
    "PortRange",
    "Relay",
    "RelayResult",
    "TproxySetup",
    "UdpRelay",
    "UdpResult",
    "UdpSettings",
    "apply_setup",
    "format_udp_report",
    "has_local_route",
    "has_policy_rule",
    "kept_labs",
    "measure_idle_sessions",
    "merge_port_ranges",
    "parse_port_range",
    "remove_setup",
    "run_bench",
    "run_udp_bench",
    "sweep_stale_labs",
]
