"""``Proxy`` refuses options that could not work when it is made, not when a flow needs them."""

from __future__ import annotations

from typing import Any

import pytest

from uproxy_trio import Proxy


@pytest.mark.parametrize(
    ("options", "complaint"),
    [
        ({"max_flows": 0}, "max_flows"),
        ({"connect_timeout": 0}, "connect_timeout"),
        ({"idle_timeout": 0}, "idle_timeout"),
        ({"idle_timeout": -1.5}, "idle_timeout"),
    ],
)
def test_options_that_cannot_work_are_refused_at_once(
    options: dict[str, Any], complaint: str
) -> None:
    with pytest.raises(ValueError, match=complaint):
        Proxy(**options)


@pytest.mark.parametrize(
    "options",
    [
        {"max_flows": 1},
        {"connect_timeout": 0.001},
        {"idle_timeout": 0.001},
        {"idle_timeout": None, "max_flows": None},
        {"connect_timeout": 0.5, "idle_timeout": 30, "max_flows": 10},
    ],
)
def test_the_least_that_can_work_is_taken(options: dict[str, Any]) -> None:
    Proxy(**options)  # no ValueError: one flow, or a millisecond, is little but works
