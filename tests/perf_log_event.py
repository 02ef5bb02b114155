"""What the default event sink costs a flow, without sockets.

    .venv/bin/python tests/perf_log_event.py

``log_event`` into a ``StreamHandler`` on /dev/null with ``uproxy serve``'s own text and JSON
formatters (so the write(2) is paid, the disk is not), at the level ``serve`` runs by default
and at ``--log-level warning``. Prints microseconds per ``log_event(FlowClosed)`` call, and per
flow (the five events of a clean flow's life: open, upstream connected, two half-closes,
close). Compare the rows of one run only.
"""

from __future__ import annotations

import logging
import os
import timeit
from collections.abc import Callable

from uproxy_cli._logging import JsonFormatter, TextFormatter, setup_logging
from uproxy_trio import (
    Flow,
    FlowClosed,
    FlowEvent,
    FlowOpened,
    HalfClosed,
    UpstreamConnected,
    log_event,
)

FLOW = Flow(1, ("192.0.2.2", 40312), ("198.51.100.2", 9090))
CLOSED = FlowClosed(FLOW, "closed", "client", 5, 5, 0.003)
LIFE: tuple[FlowEvent, ...] = (
    FlowOpened(FLOW),
    UpstreamConnected(FLOW, 0.001),
    HalfClosed(FLOW, "client"),
    HalfClosed(FLOW, "server"),
    CLOSED,
)
CALLS = 100_000


def per_call_us(call: Callable[[], None]) -> float:
    """The best of five runs: the machine is shared, and noise only ever adds time."""
    return min(timeit.repeat(call, number=CALLS, repeat=5)) / CALLS * 1e6


def one_flow() -> None:
    for event in LIFE:
        log_event(event)


def main() -> None:
    setup_logging("info", "text", None)  # serve's own settings, then a quieter stream
    root = logging.getLogger()
    with open(os.devnull, "w") as devnull:
        handler = logging.StreamHandler(devnull)
        root.handlers[:] = [handler]
        for format_name, formatter in (
            ("text", TextFormatter(None)),
            ("json", JsonFormatter(None)),
        ):
            handler.setFormatter(formatter)
            for level in ("INFO", "WARNING"):
                root.setLevel(level)
                close = per_call_us(lambda: log_event(CLOSED))
                flow = per_call_us(one_flow)
                print(
                    f"{format_name:4} {level.lower():7}  log_event(FlowClosed) {close:6.2f} us"
                    f"   one flow's five events {flow:6.2f} us"
                )


if __name__ == "__main__":
    main()
