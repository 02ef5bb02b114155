"""The one place that decides how a flow ends.

Kept free of sockets so each TCP corner can be tested exactly: the proxy tells a ``FlowEnding``
how each direction finished and does what it says. The rules:

* A clean EOF on one side is passed on as a FIN (``shutdown(SHUT_WR)``) and the other
  direction keeps flowing: TCP half-close.
* An interceptor may end the whole flow on purpose, as a network fault would: ``CloseFlow``
  closes both sides (what it yielded before is delivered first), ``ResetFlow`` resets them.
* Anything else (a reset on either side, a failed interceptor, a flow the proxy stopped)
  resets both sides, because a FIN would tell the peer that everything arrived, which is no
  longer true. Once that is decided, not a byte moves and no FIN goes out.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ._flow import Direction


class EndKind(enum.Enum):
    EOF = "eof"
    """The source sent FIN; every byte read was written, then the FIN was passed on."""
    SOURCE_RESET = "source_reset"
    """Reading from the source failed: it reset the connection (or vanished)."""
    SINK_RESET = "sink_reset"
    """Writing to the sink failed: it reset the connection or closed its read side."""
    INTERCEPTOR_FAILED = "interceptor_failed"
    """An interceptor of this direction raised."""
    INTERCEPTOR_CLOSED = "interceptor_closed"
    """An interceptor of this direction raised ``CloseFlow``: both sides are closed."""
    INTERCEPTOR_RESET = "interceptor_reset"
    """An interceptor of this direction raised ``ResetFlow``: both sides are reset."""


_BY_INTERCEPTOR = frozenset(
    {EndKind.INTERCEPTOR_FAILED, EndKind.INTERCEPTOR_CLOSED, EndKind.INTERCEPTOR_RESET}
)
_NOT_RESETTING = frozenset({EndKind.EOF, EndKind.INTERCEPTOR_CLOSED})


class CloseFlow(Exception):
    """Raised by an interceptor to close the whole flow now, as a peer that hangs up would:
    what the chain yielded before is delivered, then both sockets are closed (a FIN, or a RST
    where the kernel still holds bytes nobody read). Reported as ``interceptor_closed``."""


class ResetFlow(Exception):
    """Raised by an interceptor to reset the whole flow now, as a broken network would: both
    sides get a RST. Reported as ``interceptor_reset``, not as an interceptor failure."""


@dataclass(frozen=True, slots=True)
class DirectionEnd:
    direction: Direction
    kind: EndKind
    error: BaseException | None = None

    @property
    def side(self) -> str:
        """The side whose behaviour ended this direction (``"proxy"`` for an interceptor)."""
        if self.kind is EndKind.SINK_RESET:
            return self.direction.sink
        if self.kind in _BY_INTERCEPTOR:
            return "proxy"
        return self.direction.source


class Stop(enum.Enum):
    """Why the proxy itself ended a flow, rather than either side."""

    IDLE_TIMEOUT = "idle_timeout"
    """Nothing moved either way for the idle timeout."""
    CANCELLED = "cancelled"
    """The proxy is stopping (the grace period is over, or it was cancelled)."""
    PROXY_ERROR = "proxy_error"
    """A fault inside the proxy: this flow is reset, nothing else is touched."""
    ROUTE_DISABLED = "route_disabled"
    """Its route was disabled (``Proxy.set_enabled``)."""
    RESET_REQUESTED = "reset_requested"
    """Someone asked for this flow to be reset (``Proxy.reset_flow``)."""


class FlowEnding:
    """Collects how a flow ended and says what to do about it: FIN or RST, and the reason."""

    __slots__ = ("ends", "stopped", "upstream")
    # ``upstream``: why the flow never got to relay (``upstream_<why>``, ``refused_<why>``).

    def __init__(self) -> None:
        self.ends: list[DirectionEnd] = []
        self.stopped: Stop | None = None
        self.upstream: str | None = None

    def stop(self, why: Stop) -> bool:
        """The proxy ends the flow (a reset, both ways); false if it was over already, so
        that a flow that finished is never reported as stopped."""
        if self.over:
            return False
        self.stopped = why
        return True

    def fail_upstream(self, reason: str) -> None:
        """The original destination could not be reached: the client is reset."""
        self.upstream = f"upstream_{reason}"

    def refuse(self, reason: str) -> None:
        """The proxy will not relay this flow (its destination is the proxy itself, say): the
        client is reset."""
        self.upstream = f"refused_{reason}"

    def record(self, end: DirectionEnd) -> bool:
        """Note one direction's end; true when the whole flow must now end (reset, or closed
        by an interceptor)."""
        self.ends.append(end)
        return end.kind is not EndKind.EOF

    @property
    def resetting(self) -> bool:
        """Whether the flow is being reset: from then on not a byte moves and no FIN goes
        out."""
        return (
            self.stopped is not None
            or self.upstream is not None
            or any(end.kind not in _NOT_RESETTING for end in self.ends)
        )

    @property
    def over(self) -> bool:
        """Both directions have ended, or an interceptor closed the flow, or it is being
        reset."""
        return len(self.ends) == 2 or self.resetting or self.closed_by_interceptor

    @property
    def fin_needs_shutdown(self) -> bool:
        """Whether an EOF ending a direction now must be passed on by ``shutdown(SHUT_WR)``.

        Not when the other direction has ended with EOF already: both sockets are closed next,
        and ``close`` sends the FIN itself (the sink has been read to its EOF, so there is no
        unread byte that would turn it into a RST). One system call fewer per flow.
        """
        return not self.ends or self.ends[0].kind is not EndKind.EOF

    @property
    def clean(self) -> bool:
        """Both directions saw EOF, or an interceptor closed the flow: close both sockets
        normally."""
        ends = self.ends
        if self.stopped is not None or any(end.kind not in _NOT_RESETTING for end in ends):
            return False
        return len(ends) == 2 or self.closed_by_interceptor

    @property
    def closed_by_interceptor(self) -> bool:
        return any(end.kind is EndKind.INTERCEPTOR_CLOSED for end in self.ends)

    @property
    def first_closed(self) -> str | None:
        """Which side closed first (``"client"``, ``"server"``, ``"proxy"``), if any did."""
        return self.ends[0].side if self.ends else None

    @property
    def failure(self) -> DirectionEnd | None:
        return next((end for end in self.ends if end.kind not in _NOT_RESETTING), None)

    @property
    def reason(self) -> str:
        """Short and from a closed set, for logs and metrics: ``closed``, ``client_reset``,
        ``server_reset``, ``interceptor_failed``, ``interceptor_closed``,
        ``interceptor_reset``, ``upstream_<why>``, ``refused_<why>``, ``idle_timeout``,
        ``route_disabled``, ``reset_requested``, ``proxy_error`` or ``cancelled`` (the proxy
        ended the flow, e.g. at shutdown)."""
        if self.clean:
            return EndKind.INTERCEPTOR_CLOSED.value if self.closed_by_interceptor else "closed"
        if self.upstream is not None:
            return self.upstream
        if self.stopped is not None:
            return self.stopped.value
        failure = self.failure
        if failure is None:
            return Stop.CANCELLED.value
        if failure.kind in _BY_INTERCEPTOR:
            return failure.kind.value
        return f"{failure.side}_reset"
