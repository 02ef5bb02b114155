"""The life of a flow as a sequence of events.

The proxy reports what happens to an ``on_event`` callable; ``log_event`` (the default) turns
the events into log lines. A library user passes their own callable to count, record or
assert on flows. The callable runs inline on the data path, so it must be quick and must not
block; it may not raise (an exception there is logged and otherwise ignored).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
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
    """The proxy would not relay this flow (``self_loop``: its destination is the proxy's
    own listener); the client is reset."""

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
    ``interceptor_failed``, ``idle_timeout``, ``cancelled``, ``upstream_<why>`` or
    ``refused_<why>``; the byte counts are what the proxy delivered to the server and to the
    client.
    """

    flow: Flow
    reason: str
    first_closed: str | None
    bytes_client_to_server: int
    bytes_server_to_client: int
    duration_s: float
    intercepted: bool = False
    """Whether interceptors ran on the flow."""


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

# The events of every flow's life, logged at INFO; the others are worth a WARNING or more.
_ROUTINE = (FlowOpened, UpstreamConnected, HalfClosed, FlowClosed)


def log_event(event: FlowEvent) -> None:
    """The default sink: one log line per event on the ``uproxy_trio.flow`` logger.

    Each record carries the event itself as ``record.flow_event``, so a formatter can render
    it as structured data (``uproxy serve --log-format json`` does).
    """
    if not LOGGER.isEnabledFor(logging.INFO) and isinstance(event, _ROUTINE):
        return  # at --log-level warning a flow's routine life costs nothing to format
    flow = event.flow
    extra = {"flow_event": event}
    if isinstance(event, FlowOpened):
        LOGGER.info(
            "flow %d open client=%s server=%s",
            flow.id,
            format_address(flow.client),
            format_address(flow.server),
            extra=extra,
        )
    elif isinstance(event, UpstreamConnected):
        LOGGER.info("flow %d upstream connected in %.3fs", flow.id, event.connect_s, extra=extra)
    elif isinstance(event, UpstreamFailed):
        LOGGER.warning(
            "flow %d upstream %s failed (%s): %s; resetting client",
            flow.id,
            format_address(flow.server),
            event.reason,
            event.detail,
            extra=extra,
        )
    elif isinstance(event, FlowRefused):
        LOGGER.warning(
            "flow %d refused (%s): %s is this proxy's own listener; resetting client",
            flow.id,
            event.reason,
            format_address(flow.server),
            extra=extra,
        )
    elif isinstance(event, HalfClosed):
        LOGGER.info("flow %d %s closed its side", flow.id, event.side, extra=extra)
    elif isinstance(event, InterceptorFailed):
        LOGGER.error(
            "flow %d interceptor failed (%s); resetting the flow",
            flow.id,
            event.direction.value,
            exc_info=event.error,
            extra=extra,
        )
    else:
        LOGGER.info(
            "flow %d close reason=%s first=%s client_to_server=%d server_to_client=%d "
            "duration=%.3fs",
            flow.id,
            event.reason,
            event.first_closed or "-",
            event.bytes_client_to_server,
            event.bytes_server_to_client,
            event.duration_s,
            extra=extra,
        )
