"""The three-host lab for uproxy-trio: client, proxy and server network namespaces."""

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

__all__ = [
    "CLIENT_V4",
    "CLIENT_V6",
    "PROXY_CLIENT_SIDE_V4",
    "PROXY_CLIENT_SIDE_V6",
    "PROXY_SERVER_SIDE_V4",
    "PROXY_SERVER_SIDE_V6",
    "SERVER_V4",
    "SERVER_V6",
    "Lab",
    "LabError",
    "Namespace",
    "TproxySetup",
    "sweep_stale_labs",
]
