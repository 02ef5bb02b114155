"""The UDP pieces that need no lab: control-message addresses and a session's close reason."""

from __future__ import annotations

import errno
import socket
import struct
from types import SimpleNamespace
from typing import Any, cast

import pytest

from uproxy_trio import Direction
from uproxy_trio._datagram import parse_sockaddr
from uproxy_trio._udp import _close_reason
from uproxy_trio._udp_way import DatagramEnd, DatagramWay, _datagrams_of


def test_an_ipv4_original_destination_is_read_from_its_sockaddr_in() -> None:
    raw = struct.pack("=H", socket.AF_INET) + struct.pack("!H", 9090)
    raw += socket.inet_pton(socket.AF_INET, "198.51.100.2") + bytes(8)
    assert parse_sockaddr(raw) == ("198.51.100.2", 9090)


def test_an_ipv6_original_destination_is_read_from_its_sockaddr_in6() -> None:
    raw = struct.pack("=H", socket.AF_INET6) + struct.pack("!H", 53) + bytes(4)
    raw += socket.inet_pton(socket.AF_INET6, "2001:db8:2::2") + bytes(4)
    assert parse_sockaddr(raw) == ("2001:db8:2::2", 53)


def test_an_ipv4_mapped_destination_is_plain_ipv4() -> None:
    raw = struct.pack("=H", socket.AF_INET6) + struct.pack("!H", 53) + bytes(4)
    raw += socket.inet_pton(socket.AF_INET6, "::ffff:198.51.100.2") + bytes(4)
    assert parse_sockaddr(raw) == ("198.51.100.2", 53)


def _way(direction: Direction, end: DatagramEnd | None, code: int = 0) -> DatagramWay:
    return cast(DatagramWay, SimpleNamespace(direction=direction, end=end, errno=code))


@pytest.mark.parametrize(
    ("way", "reason"),
    [
        (
            _way(Direction.SERVER_TO_CLIENT, DatagramEnd.SOURCE_GONE, errno.ECONNREFUSED),
            "server_refused",
        ),
        (
            _way(Direction.CLIENT_TO_SERVER, DatagramEnd.SINK_GONE, errno.ECONNREFUSED),
            "server_refused",
        ),
        (
            _way(Direction.CLIENT_TO_SERVER, DatagramEnd.SOURCE_GONE, errno.ECONNREFUSED),
            "client_refused",
        ),
        (
            _way(Direction.SERVER_TO_CLIENT, DatagramEnd.SOURCE_GONE, errno.EHOSTUNREACH),
            "server_unreachable",
        ),
        (_way(Direction.SERVER_TO_CLIENT, DatagramEnd.SOURCE_GONE, errno.EPROTO), "server_error"),
        (_way(Direction.CLIENT_TO_SERVER, DatagramEnd.INTERCEPTOR_FAILED), "interceptor_failed"),
        (_way(Direction.CLIENT_TO_SERVER, DatagramEnd.INTERCEPTOR_CLOSED), "interceptor_closed"),
        (_way(Direction.CLIENT_TO_SERVER, DatagramEnd.INTERCEPTOR_RESET), "interceptor_reset"),
        (_way(Direction.CLIENT_TO_SERVER, DatagramEnd.CHAIN_ENDED), "closed"),
    ],
)
def test_a_session_is_closed_for_the_side_whose_socket_failed(way: Any, reason: str) -> None:
    assert _close_reason(way) == reason


def test_a_held_run_is_given_back_as_its_datagrams() -> None:
    """What a pump held when the sink was full goes to the interceptors datagram by datagram
    if a live interceptor takes the direction over."""
    run = b"a" * 1400 + b"b" * 1400 + b"c" * 10
    assert _datagrams_of(run, 1400) == [b"a" * 1400, b"b" * 1400, b"c" * 10]
    assert _datagrams_of(b"x" * 3000, 0) == [b"x" * 3000]
