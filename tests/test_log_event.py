"""What the default event sink writes at each level, and how the JSON formatter renders it."""

from __future__ import annotations

import json
import logging

import pytest

from uproxy_cli._logging import JsonFormatter, TextFormatter, event_fields
from uproxy_trio import (
    Direction,
    Flow,
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

FLOW = Flow(7, ("192.0.2.2", 40312), ("198.51.100.2", 9090))
FLOW_V6 = Flow(8, ("2001:db8:1::2", 40313), ("2001:db8:2::2", 9090))
CLOSED = FlowClosed(FLOW, "closed", "client", 5, 6, 0.0031)
LIFE: tuple[FlowEvent, ...] = (
    FlowOpened(FLOW),
    UpstreamConnected(FLOW, 0.0012),
    HalfClosed(FLOW, "client"),
    HalfClosed(FLOW, "server"),
    CLOSED,
)
CLOSE_LINE = (
    "flow 7 close reason=closed client=192.0.2.2:40312 server=198.51.100.2:9090 first=client "
    "client_to_server=5 server_to_client=6 duration=0.003s intercepted=false"
)


def logged(
    caplog: pytest.LogCaptureFixture, level: int, events: tuple[FlowEvent, ...]
) -> list[tuple[int, str]]:
    """``events`` through ``log_event`` with the flow logger at ``level``: (level, line) each."""
    caplog.set_level(level, logger="uproxy_trio.flow")
    for event in events:
        log_event(event)
    return [(record.levelno, record.getMessage()) for record in caplog.records]


def test_at_info_a_flow_is_one_line_written_at_its_close(
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert logged(caplog, logging.INFO, LIFE) == [(logging.INFO, CLOSE_LINE)]
    assert getattr(caplog.records[0], "flow_event", None) is CLOSED


def test_the_close_line_says_whether_interceptors_ran_and_brackets_ipv6(
    caplog: pytest.LogCaptureFixture,
) -> None:
    closed = FlowClosed(FLOW_V6, "server_reset", None, 0, 10, 1.5, intercepted=True)
    assert logged(caplog, logging.INFO, (closed,)) == [
        (
            logging.INFO,
            "flow 8 close reason=server_reset client=[2001:db8:1::2]:40313 "
            "server=[2001:db8:2::2]:9090 first=- client_to_server=0 server_to_client=10 "
            "duration=1.500s intercepted=true",
        )
    ]


def test_at_debug_every_step_of_a_flow_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    assert logged(caplog, logging.DEBUG, LIFE) == [
        (logging.DEBUG, "flow 7 open client=192.0.2.2:40312 server=198.51.100.2:9090"),
        (logging.DEBUG, "flow 7 upstream connected in 0.001s"),
        (logging.DEBUG, "flow 7 client closed its side"),
        (logging.DEBUG, "flow 7 server closed its side"),
        (logging.INFO, CLOSE_LINE),
    ]


def test_failures_are_warnings_and_errors_at_every_level_but_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    failures = (
        UpstreamFailed(FLOW, "refused"),
        FlowRefused(FLOW, "self_loop"),
        InterceptorFailed(FLOW, Direction.CLIENT_TO_SERVER, ValueError("boom")),
    )
    assert logged(caplog, logging.WARNING, (*LIFE, *failures)) == [
        (logging.WARNING, "flow 7 upstream 198.51.100.2:9090 failed: refused; resetting client"),
        (
            logging.WARNING,
            "flow 7 refused (self_loop): 198.51.100.2:9090 is this proxy's own listener; "
            "resetting client",
        ),
        (logging.ERROR, "flow 7 interceptor failed (client_to_server); resetting the flow"),
    ]
    assert caplog.records[-1].exc_info is not None


def test_a_flow_refused_for_its_disabled_route_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Not that its destination is the proxy's own listener: that is self_loop's reason.
    assert logged(caplog, logging.WARNING, (FlowRefused(FLOW, "route_disabled"),)) == [
        (
            logging.WARNING,
            "flow 7 refused (route_disabled): the route to 198.51.100.2:9090 is disabled; "
            "resetting client",
        )
    ]


@pytest.mark.parametrize("intercepted", [False, True])
def test_json_flow_close_is_the_same_object_plus_intercepted(intercepted: bool) -> None:
    closed = FlowClosed(FLOW, "closed", "client", 5, 6, 0.0031, intercepted)
    assert event_fields(closed) == {
        "event": "flow_close",
        "flow": 7,
        "client": "192.0.2.2:40312",
        "server": "198.51.100.2:9090",
        "transport": "tcp",
        "reason": "closed",
        "first_closed": "client",
        "bytes_client_to_server": 5,
        "bytes_server_to_client": 6,
        "duration_s": 0.0031,
        "intercepted": intercepted,
    }
    record = logging.LogRecord("uproxy_trio.flow", logging.INFO, "", 0, "close", (), None)
    record.flow_event = closed  # as LOGGER.log(..., extra=...) sets it
    entry = json.loads(JsonFormatter(None).format(record))
    assert entry["intercepted"] is intercepted
    assert entry["event"] == "flow_close"


def test_a_routed_flow_names_its_route_at_the_end_of_its_close_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    closed = FlowClosed(FLOW, "closed", "client", 5, 6, 0.0031, True, "slow-db")
    assert logged(caplog, logging.INFO, (closed,)) == [
        (logging.INFO, CLOSE_LINE.replace("intercepted=false", "intercepted=true route=slow-db"))
    ]


def test_json_flow_close_names_the_route_when_a_route_took_the_flow() -> None:
    routed = FlowClosed(FLOW, "closed", "client", 5, 6, 0.0031, False, "spliced-db")
    assert event_fields(routed)["route"] == "spliced-db"
    assert "route" not in event_fields(CLOSED)


def test_the_text_formatter_writes_the_time_as_logging_does_across_seconds() -> None:
    # It formats the date and seconds once per second: the lines must not show it.
    ours = TextFormatter("worker 1/2")
    standard = logging.Formatter("%(asctime)s %(levelname)s worker 1/2 %(name)s: %(message)s")
    for created in (1764160000.001, 1764160000.999, 1764160001.0, 1764160001.5, 1764163600.25):
        record = logging.LogRecord("uproxy_trio.flow", logging.INFO, __file__, 1, "x", None, None)
        record.created, record.msecs = created, (created - int(created)) * 1000
        assert ours.format(record) == standard.format(record)
