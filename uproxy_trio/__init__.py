"""uproxy-trio: a transparent TCP proxy on Trio, with interceptors that rewrite bytes in flight.

The public API is what this module re-exports; everything in ``_modules`` may change.
"""

from ._address import Address, format_address, parse_address
from ._ending import CloseFlow, ResetFlow
from ._events import (
    EventSink,
    FlowClosed,
    FlowEvent,
    FlowOpened,
    FlowRefused,
    HalfClosed,
    InterceptorFailed,
    UpstreamConnected,
    UpstreamFailed,
    log_event,
)
from ._flow import Direction, Flow, FlowInfo
from ._forward import Forward
from ._interceptor import Interceptor, directions, for_flows, in_own_task, interceptor_factory
from ._proxy import DEFAULT_CONNECT_TIMEOUT_S, Proxy, serve
from ._routes import Route, Routes
from ._transparent import TransparencyUnavailable, transparency_available

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT_S",
    "Address",
    "CloseFlow",
    "Direction",
    "EventSink",
    "Flow",
    "FlowClosed",
    "FlowEvent",
    "FlowInfo",
    "FlowOpened",
    "FlowRefused",
    "Forward",
    "HalfClosed",
    "Interceptor",
    "InterceptorFailed",
    "Proxy",
    "ResetFlow",
    "Route",
    "Routes",
    "TransparencyUnavailable",
    "UpstreamConnected",
    "UpstreamFailed",
    "directions",
    "for_flows",
    "format_address",
    "in_own_task",
    "interceptor_factory",
    "log_event",
    "parse_address",
    "serve",
    "transparency_available",
]
