"""The UDP pieces that need no lab: control-message addresses, a session's close reason, and
how a pump's runs fall back to single datagrams."""

from __future__ import annotations

import errno
import socket
import struct
from collections import Counter
from types import SimpleNamespace
from typing import Any, cast

import pytest

from uproxy_trio import Direction, Flow
from uproxy_trio._datagram import parse_sockaddr
from uproxy_trio._readiness import READABLE, WRITABLE, Reactor, Readiness, Side, Turn, bit
from uproxy_trio._udp import _close_reason
from uproxy_trio._udp_way import RUN_BUFFER, DatagramEnd, DatagramWay, _datagrams_of

_READY = bit(Side.CLIENT, READABLE) | bit(Side.SERVER, WRITABLE)


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


class _SinkThatWillNotSegment(socket.socket):
    """A sink whose kernel refuses runs (``EINVAL``) and has room for ``room`` datagrams."""

    def __init__(self, room: int) -> None:
        super().__init__(socket.AF_INET, socket.SOCK_DGRAM)
        self.room = room
        self.sent: list[bytes] = []

    def sendmsg(self, *_: Any) -> int:
        raise OSError(errno.EINVAL, "Invalid argument")

    def send(self, data: Any, flags: int = 0) -> int:
        if not self.room:
            raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
        self.room -= 1
        self.sent.append(bytes(data))
        return len(data)


async def test_a_run_the_kernel_refuses_goes_one_by_one_in_order_even_when_the_sink_fills() -> None:
    """The run of five is refused as a run; its datagrams go one by one until the sink is
    full; the rest of the run, then the datagram that ended the run, then the ones after,
    go when there is room again, in the order they came."""
    sizes = [1400] * 5 + [1401] + [1400] * 3
    datagrams = [bytes([index]) * size for index, size in enumerate(sizes)]
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as source,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender,
        _SinkThatWillNotSegment(room=2) as sink,
    ):
        source.bind(("127.0.0.1", 0))
        sender.bind(("127.0.0.1", 0))
        sender.connect(source.getsockname())
        source.connect(sender.getsockname())
        source.setblocking(False)
        sink.connect(("127.0.0.1", 9))  # (no datagram goes there: ``send`` is the fake's)
        for datagram in datagrams:
            sender.send(datagram)
        flow = Flow(1, sender.getsockname(), ("127.0.0.1", 9), transport="udp")
        readiness = Readiness(_READY)
        way = DatagramWay(
            Direction.CLIENT_TO_SERVER,
            source,
            sink,
            readiness,
            memoryview(bytearray(RUN_BUFFER)),
            Counter(),
            flow,
            None,
        )
        assert way.turn() is Turn.STUCK
        assert sink.sent == datagrams[:2]
        sink.room = 100
        with Reactor() as reactor:
            reactor.kick(readiness, _READY)  # as the sink's edge would: it has room again
        while way.turn() is not Turn.STUCK:
            pass
        assert sink.sent == datagrams
        assert way.written == sum(sizes)
