"""How a flow ends, decided without sockets: every TCP corner of the relay in plain calls."""

from __future__ import annotations

import pytest

from uproxy_trio import Direction
from uproxy_trio._ending import DirectionEnd, EndKind, FlowEnding, Stop

C2S, S2C = Direction.CLIENT_TO_SERVER, Direction.SERVER_TO_CLIENT


def test_two_eofs_close_cleanly_and_remember_who_went_first() -> None:
    ending = FlowEnding()
    assert ending.record(DirectionEnd(S2C, EndKind.EOF)) is False  # half-close: keep going
    clean_after_one = ending.clean
    assert ending.record(DirectionEnd(C2S, EndKind.EOF)) is False
    assert (clean_after_one, ending.clean) == (False, True)
    assert (ending.reason, ending.first_closed) == ("closed", "server")


@pytest.mark.parametrize(
    ("end", "reason", "first"),
    [
        (DirectionEnd(C2S, EndKind.SOURCE_RESET), "client_reset", "client"),
        (DirectionEnd(C2S, EndKind.SINK_RESET), "server_reset", "server"),
        (DirectionEnd(S2C, EndKind.SOURCE_RESET), "server_reset", "server"),
        (DirectionEnd(S2C, EndKind.SINK_RESET), "client_reset", "client"),
        (
            DirectionEnd(S2C, EndKind.INTERCEPTOR_FAILED, ValueError()),
            "interceptor_failed",
            "proxy",
        ),
    ],
)
def test_anything_but_eof_resets_the_whole_flow(end: DirectionEnd, reason: str, first: str) -> None:
    ending = FlowEnding()
    assert ending.record(end) is True
    assert not ending.clean
    assert (ending.reason, ending.first_closed) == (reason, first)


def test_a_reset_after_a_half_close_is_still_a_reset() -> None:
    ending = FlowEnding()
    ending.record(DirectionEnd(C2S, EndKind.EOF))
    assert ending.record(DirectionEnd(S2C, EndKind.SINK_RESET)) is True
    assert not ending.clean
    assert (ending.reason, ending.first_closed) == ("client_reset", "client")


def test_a_flow_stopped_from_outside_is_cancelled_and_reset() -> None:
    ending = FlowEnding()
    ending.record(DirectionEnd(C2S, EndKind.EOF))
    assert not ending.clean  # the other direction never finished
    assert ending.reason == "cancelled"


def test_an_idle_flow_is_stopped_with_a_reset() -> None:
    ending = FlowEnding()
    ending.record(DirectionEnd(C2S, EndKind.EOF))
    assert ending.stop(Stop.IDLE_TIMEOUT) is True
    assert ending.resetting
    assert not ending.clean
    assert ending.reason == "idle_timeout"


def test_a_flow_that_finished_is_never_reported_as_stopped() -> None:
    ending = FlowEnding()
    ending.record(DirectionEnd(C2S, EndKind.EOF))
    ending.record(DirectionEnd(Direction.SERVER_TO_CLIENT, EndKind.EOF))
    assert ending.stop(Stop.IDLE_TIMEOUT) is False
    assert (ending.clean, ending.reason) == (True, "closed")


def test_once_resetting_the_first_reason_stays() -> None:
    ending = FlowEnding()
    ending.record(DirectionEnd(C2S, EndKind.SOURCE_RESET))
    assert ending.stop(Stop.IDLE_TIMEOUT) is False
    assert ending.reason == "client_reset"


def test_an_upstream_failure_or_refusal_names_itself() -> None:
    failed, refused = FlowEnding(), FlowEnding()
    failed.fail_upstream("refused")
    refused.refuse("self_loop")
    assert (failed.resetting, failed.reason) == (True, "upstream_refused")
    assert (refused.resetting, refused.reason) == (True, "refused_self_loop")


def test_only_the_first_eof_needs_a_shutdown_the_second_is_sent_by_close() -> None:
    ending = FlowEnding()
    assert ending.fin_needs_shutdown
    ending.record(DirectionEnd(Direction.SERVER_TO_CLIENT, EndKind.EOF))
    assert not ending.fin_needs_shutdown


def test_after_a_reset_an_eof_still_needs_its_shutdown() -> None:
    ending = FlowEnding()
    ending.record(DirectionEnd(Direction.SERVER_TO_CLIENT, EndKind.SINK_RESET))
    assert ending.fin_needs_shutdown
