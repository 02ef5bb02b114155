"""The one place that decides how a flow ends.

Kept free of sockets so each TCP corner can be tested exactly: the proxy tells a ``FlowEnding``
how each direction finished and does what it says. The rules:

* A clean EOF on one side is passed on as a FIN (``shutdown(SHUT_WR)``) and the other
  direction keeps flowing: TCP half-close.
* Anything else (a reset on either side, a failed interceptor, a cancelled flow) resets both
  sides, because a FIN would tell the peer that everything arrived, which is no longer true.
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
        if self.kind is EndKind.INTERCEPTOR_FAILED:
            return "proxy"
        return self.direction.source


class FlowEnding:
    """Collects how the two directions of one flow ended and says what to do about it."""

    def __init__(self) -> None:
        self.ends: list[DirectionEnd] = []
        self.expired = False

    def expire(self) -> None:
        """The flow sat idle past its timeout: it ends with a reset (``idle_timeout``)."""
        self.expired = True

    def record(self, end: DirectionEnd) -> bool:
        """Note one direction's end; true when the whole flow must now be reset."""
        self.ends.append(end)
        return end.kind is not EndKind.EOF

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
        """Both directions saw EOF: close both sockets normally."""
        return (
            not self.expired
            and len(self.ends) == 2
            and all(end.kind is EndKind.EOF for end in self.ends)
        )

    @property
    def first_closed(self) -> str | None:
        """Which side closed first (``"client"``, ``"server"``, ``"proxy"``), if any did."""
        return self.ends[0].side if self.ends else None

    @property
    def failure(self) -> DirectionEnd | None:
        return next((end for end in self.ends if end.kind is not EndKind.EOF), None)

    @property
    def reason(self) -> str:
        """Short and stable, for logs and metrics: ``closed``, ``client_reset``, ``server_reset``,
        ``interceptor_failed``, ``idle_timeout`` or ``cancelled`` (the proxy ended the flow,
        e.g. at shutdown)."""
        if self.clean:
            return "closed"
        if self.expired:
            return "idle_timeout"
        failure = self.failure
        if failure is None:
            return "cancelled"
        if failure.kind is EndKind.INTERCEPTOR_FAILED:
            return "interceptor_failed"
        return f"{failure.side}_reset"
