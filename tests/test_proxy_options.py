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


def test_sensible_options_make_a_proxy() -> None:
    proxy = Proxy(connect_timeout=0.5, idle_timeout=30, max_flows=10)
    assert proxy.active_flows == 0
