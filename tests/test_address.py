"""The one address parser: what it accepts, and what it says about what it refuses."""

from __future__ import annotations

import re

import pytest

from uproxy_trio import format_address, parse_address
from uproxy_trio._address import from_sockaddr


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("127.0.0.1:9091", ("127.0.0.1", 9091)),
        ("[::1]:9091", ("::1", 9091)),
        ("[2001:DB8::0001]:1", ("2001:db8::1", 1)),
        ("0.0.0.0:65535", ("0.0.0.0", 65535)),
    ],
)
def test_parses_and_round_trips(text: str, address: tuple[str, int]) -> None:
    assert parse_address(text) == address
    assert parse_address(format_address(address)) == address


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("9091", "is not HOST:PORT"),
        (":9091", "is not HOST:PORT"),
        ("localhost:9091", "is not an IP address"),
        ("::1:9091", "write an IPv6 address in brackets"),
        ("[127.0.0.1]:9091", "only an IPv6 address goes in brackets"),
        ("127.0.0.1:http", "is not a number"),
        ("127.0.0.1:0", "out of range"),
        ("127.0.0.1:65536", "out of range"),
        ("127.0.0.1:-1", "is not a number"),
    ],
)
def test_refuses_with_a_reason(text: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        parse_address(text)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("::1:9091", "'::1:9091': write an IPv6 address in brackets, as [::1]:9091"),
        # Brackets already there: no port, or no closing bracket. No made-up "[[:]:1]".
        ("[::1]", "'[::1]' is not [IPV6]:PORT, as [::1]:9091"),
        ("[::1:9091", "'[::1:9091' is not [IPV6]:PORT, as [::1]:9091"),
        ("[2001:db8::1]9091", "'[2001:db8::1]9091' is not [IPV6]:PORT, as [::1]:9091"),
    ],
)
def test_the_ipv6_hint_is_a_form_that_parses(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        parse_address(text)


def test_ipv4_mapped_client_becomes_plain_ipv4() -> None:
    # A v4 client on a dual-stack socket must be reached again over IPv4.
    assert from_sockaddr(("::ffff:192.0.2.2", 40000, 0, 0)) == ("192.0.2.2", 40000)
    assert from_sockaddr(("2001:db8:1::2", 40000, 0, 0)) == ("2001:db8:1::2", 40000)
