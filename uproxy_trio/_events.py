"""The life of a flow as a sequence of events.

The proxy reports what happens to an ``on_event`` callable; ``log_event`` (the default) turns
the events into log lines. A library user passes their own callable to count, record or
assert on flows. The callable runs inline on the data path, so it must be quick and must not
block; it may not raise (an exception there is logged and otherwise ignored).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeAlias

from ._address import format_address
from ._flow import Direction, Flow

LOGGER = logging.getLogger("uproxy_trio.flow")


@dataclass(frozen=True, slots=True)
class FlowOpened:
    """A client's connection was accepted; ``flow.server`` is its original destination."""

    flow: Flow


@dataclass(frozen=True, slots=True)
class UpstreamConnected:
    """The transparent connection to the original destination is up."""

    flow: Flow
    connect_s: float


@dataclass(frozen=True, slots=True)
class UpstreamFailed:
    """The original destination could not be reached; the client is reset."""

    flow: Flow
    reason: str
    """From a closed set (``refused``, ``unreachable``, ``timeout``, ``reset``,
    ``address_in_use``, ``no_resources``, ``error``), fit for a metrics label."""
    detail: str = ""
    """What exactly failed (the errno, the addresses), for the log."""


@dataclass(frozen=True, slots=True)
class FlowRefused:
    """The proxy would not relay this flow (``route_disabled``: its route is disabled;
    ``self_loop``: its destination is the proxy's own listener); the client is reset."""

    flow: Flow
    reason: str


@dataclass(frozen=True, slots=True)
class HalfClosed:
    """``side`` sent its FIN and the proxy passed it on; the other direction goes on."""

    flow: Flow
    side: str


@dataclass(frozen=True, slots=True)
class InterceptorFailed:
    """An interceptor raised; its flow is reset and nothing else is touched."""

    flow: Flow
    direction: Direction
    error: BaseException


@dataclass(frozen=True, slots=True)
class FlowClosed:
    """The flow is over and both of its sockets are closed.

    ``reason`` is ``closed`` (both sides finished cleanly), ``client_reset``, ``server_reset``,
    ``interceptor_failed``, ``interceptor_closed`` or ``interceptor_reset`` (an interceptor
    raised ``CloseFlow`` or ``ResetFlow``), ``idle_timeout``, ``cancelled``,
    ``upstream_<why>`` or ``refused_<why>``; the byte counts are what the proxy delivered to
    the server and to the client; ``intercepted`` is whether interceptors ran on the flow's
    bytes (false for a flow relayed as it is); ``route`` is the name of the route the flow
    took (``None``: no route took it).
    """

    flow: Flow
    reason: str
    first_closed: str | None
    bytes_client_to_server: int
    bytes_server_to_client: int
    duration_s: float
    intercepted: bool = False
    """Whether interceptors ran on the flow."""
    route: str | None = None
    """The route the flow took, ``None`` when none did."""


FlowEvent: TypeAlias = (
    FlowOpened
    | UpstreamConnected
    | UpstreamFailed
    | FlowRefused
    | HalfClosed
    | InterceptorFailed
    | FlowClosed
)
EventSink: TypeAlias = Callable[[FlowEvent], None]

# What each event is worth. A flow's close is its access-log line, the one line a flow writes
# at INFO (serve's default); the steps before it are DEBUG, since five lines a flow held uproxy
# to 0.25 to 0.44 x HAProxy's new connections per second, about half its rate at --log-level
# warning. Failures stay WARNING or ERROR.
_LEVELS: Mapping[type[object], int] = {
    FlowOpened: logging.DEBUG,
    UpstreamConnected: logging.DEBUG,
    HalfClosed: logging.DEBUG,
    FlowClosed: logging.INFO,
    UpstreamFailed: logging.WARNING,
    FlowRefused: logging.WARNING,
    InterceptorFailed: logging.ERROR,
}


def log_event(event: FlowEvent) -> None:
    """The default sink: one log line per event on the ``uproxy_trio.flow`` logger.

    At INFO a flow writes one line, when it closes: client, server, how it ended, bytes each
    way, duration, whether interceptors ran and, for a flow a route took, ``route=NAME``; a
    UDP session's line ends with ``transport=udp`` (its bytes are datagrams' payloads).
    DEBUG adds its opening, the upstream connect and each half-close. Each record carries
    the event itself as ``record.flow_event``, so a formatter can render it as structured
    data (``uproxy serve --log-format json`` does).
    """
    level = _LEVELS.get(type(event), logging.INFO)
    if not LOGGER.isEnabledFor(level):
        return  # a disabled event costs one cached level check: no record, nothing formatted
    flow = event.flow
    extra = {"flow_event": event}
    # One logger call per event, the close first: it is the one every flow logs by default.
    if isinstance(event, FlowClosed):
        LOGGER.log(
            level,
            "flow %d close reason=%s client=%s server=%s first=%s client_to_server=%d "
            "server_to_client=%d duration=%.3fs intercepted=%s%s%s",
            flow.id,
            event.reason,
            format_address(flow.client),
            format_address(flow.server),
            event.first_closed or "-",
            event.bytes_client_to_server,
            event.bytes_server_to_client,
            event.duration_s,
            "true" if event.intercepted else "false",
            "" if event.route is None else f" route={event.route}",
            _transport(flow),
            extra=extra,
        )
    elif isinstance(event, FlowOpened):
        LOGGER.log(
            level,
            "flow %d open client=%s server=%s%s",
            flow.id,
            format_address(flow.client),
            format_address(flow.server),
            _transport(flow),
            extra=extra,
        )
    elif isinstance(event, UpstreamConnected):
        LOGGER.log(
            level, "flow %d upstream connected in %.3fs", flow.id, event.connect_s, extra=extra
        )
    elif isinstance(event, UpstreamFailed):
        LOGGER.log(
            level,
            "flow %d upstream %s failed: %s; resetting client",
            flow.id,
            format_address(flow.server),
            f"{event.reason}: {event.detail}" if event.detail else event.reason,
            extra=extra,
        )
    elif isinstance(event, FlowRefused):
        LOGGER.log(
            level,
            "flow %d refused (%s): %s; resetting client",
            flow.id,
            event.reason,
            (
                f"the route to {format_address(flow.server)} is disabled"
                if event.reason == "route_disabled"
                else f"{format_address(flow.server)} is this proxy's own listener"
            ),
            extra=extra,
        )
    elif isinstance(event, HalfClosed):
        LOGGER.log(level, "flow %d %s closed its side", flow.id, event.side, extra=extra)
    else:
        LOGGER.log(
            level,
            "flow %d interceptor failed (%s); resetting the flow",
            flow.id,
            event.direction.value,
            exc_info=event.error,
            extra=extra,
        )


def _transport(flow: Flow) -> str:
    """The end of a line for a UDP session; TCP, the common case, adds nothing."""
    return "" if flow.transport == "tcp" else f" transport={flow.transport}"
