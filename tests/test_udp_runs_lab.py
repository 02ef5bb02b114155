"""Queued datagrams leave the proxy in segmented runs (one send for many), in the lab, IPv4
and IPv6: every datagram arrives whole, in order, whatever mix of sizes, both ways; and when
the kernel stops taking runs (the path MTU went down), the datagrams still go, one by one."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import pytest
import trio
from lab_tools import ADDRESSES, CliProxy, family_of
from udp_tools import UDP_LISTEN_ARGS, UDP_PORT, UdpSocket, udp_proxy, udp_socket

from uproxy_netns import CLIENT_V4, SERVER_V4, Lab
from uproxy_trio import _udp_way
from uproxy_trio._datagram import MAX_SEGMENTS, send_segmented

pytestmark = [pytest.mark.lab]

# Every frame, for a packet socket; the largest one a 1500-byte link carries.
_ETH_P_ALL = 0x0003
_ETHERNET_MTU = 1500 + 14
# The largest payload one unfragmented packet carries on the lab's 1500-byte links.
_WHOLE = {socket.AF_INET: 1500 - 28, socket.AF_INET6: 1500 - 48}


# A queue on the proxy's link to the server that drains slower than a burst arrives.
_SLOW_QUEUE = ["tc", "qdisc", "add", "dev", "ens7", "root"]
_SLOW_QUEUE += ["tbf", "rate", "40mbit", "burst", "16kb", "limit", "8mb"]


def _burst_sizes(family: socket.AddressFamily) -> list[int]:
    """Sizes that make runs and break them every way a run can end: longer than the kernel
    takes at once (in datagrams and in bytes), a shorter last one, empty datagrams, sizes
    either side of what one packet carries, fragmented ones."""
    whole = _WHOLE[family]
    return (
        [1400] * 70
        + [700]
        + [1400] * 3
        + [0, 0, 5]
        + [1] * 5
        + [whole, whole + 1, whole, whole, whole - 1]
        + [3000, 3000]
        + [9000] * 3
        + [60000]
        + [64] * 100
        + [1400] * 10
        + [2]
    )


def _datagrams(sizes: list[int]) -> list[bytes]:
    return [bytes([index % 251]) * size for index, size in enumerate(sizes)]


@contextmanager
def _counting_runs(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The number of datagrams in each segmented send the pumps make (0 for one the kernel
    had no room for: it is held and sent again)."""
    runs: list[int] = []
    send = send_segmented

    def counted(sock: socket.socket, run: bytes | memoryview, segment: int) -> None:
        try:
            send(sock, run, segment)
        except BlockingIOError:
            runs.append(0)
            raise
        runs.append(-(-len(run) // segment))

    monkeypatch.setattr(_udp_way, "send_segmented", counted)
    yield runs


def _send_burst(sock: UdpSocket, datagrams: list[bytes], to: tuple[str, int]) -> None:
    """Send every datagram without letting the proxy (in this event loop) run meanwhile, so
    that they queue up on its session socket."""
    raw = socket.socket(sock.family, socket.SOCK_DGRAM, fileno=sock.fileno())
    try:
        raw.setblocking(True)
        for datagram in datagrams:
            raw.sendto(datagram, to)
    finally:
        raw.setblocking(False)
        raw.detach()


async def _received(sock: UdpSocket, count: int) -> list[bytes]:
    got: list[bytes] = []
    with trio.move_on_after(5):
        while len(got) < count:
            data, _ = await sock.recvfrom(1 << 16)
            got.append(data)
    return got


@asynccontextmanager
async def _session(
    lab: Lab, client_ip: str, server_ip: str, options: Mapping[str, Any] | None = None
) -> AsyncIterator[tuple[UdpSocket, UdpSocket]]:
    """A proxy, and a session through it already open (so that a burst goes to the session's
    sockets rather than the listener): ``(client, server)``. Nothing may be dropped."""
    async with udp_proxy(options) as (proxy, _events):
        with (
            udp_socket(lab.server, server_ip, UDP_PORT) as server,
            udp_socket(lab.client, client_ip) as client,
        ):
            await client.sendto(b"hello", (server_ip, UDP_PORT))
            with trio.fail_after(5):
                assert (await server.recvfrom(100))[0] == b"hello"
            yield client, server
            assert not any(proxy.udp.dropped.values())


@pytest.mark.parametrize(("client_ip", "server_ip"), ADDRESSES)
async def test_a_burst_of_mixed_sizes_goes_through_in_runs_every_datagram_whole(
    inside_proxy: Lab, client_ip: str, server_ip: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    datagrams = _datagrams(_burst_sizes(family_of(client_ip)))
    with _counting_runs(monkeypatch) as runs:
        async with _session(inside_proxy, client_ip, server_ip) as (client, server):
            _send_burst(client, datagrams, (server_ip, UDP_PORT))
            assert await _received(server, len(datagrams)) == datagrams
            _send_burst(server, datagrams, client.getsockname()[:2])
            assert await _received(client, len(datagrams)) == datagrams
    # Runs were made, in both directions, and none broke the kernel's limits.
    assert sum(runs) > len(datagrams)
    assert max(runs) <= MAX_SEGMENTS


@pytest.mark.parametrize(("client_ip", "server_ip"), ADDRESSES)
async def test_when_the_path_mtu_goes_down_the_datagrams_of_a_run_go_one_by_one(
    inside_proxy: Lab, client_ip: str, server_ip: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A session learnt its path MTU with its first run; a smaller one afterwards makes the
    kernel refuse the next run (EINVAL), whose datagrams must still all arrive."""
    lab = inside_proxy
    datagrams = _datagrams([1400] * 40)
    with _counting_runs(monkeypatch) as runs:
        async with _session(lab, client_ip, server_ip) as (client, server):
            _send_burst(client, datagrams, (server_ip, UDP_PORT))
            assert await _received(server, len(datagrams)) == datagrams
            assert runs
            lab.proxy.ip("link set ens7 mtu 1280\n")
            try:
                _send_burst(client, datagrams, (server_ip, UDP_PORT))
                assert await _received(server, len(datagrams)) == datagrams
            finally:
                lab.proxy.ip("link set ens7 mtu 1500\n")


@pytest.mark.parametrize(("client_ip", "server_ip"), ADDRESSES)
async def test_a_run_the_sink_has_no_room_for_is_held_and_sent_whole_later(
    inside_proxy: Lab, client_ip: str, server_ip: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slow queue on the way to the server keeps the session socket's send buffer full:
    runs are refused (EAGAIN), held, and sent when there is room, every datagram whole."""
    lab = inside_proxy
    datagrams = _datagrams([1400] * 300 + [700] + [1400] * 100)
    with _counting_runs(monkeypatch) as runs:
        async with _session(lab, client_ip, server_ip) as (client, server):
            lab.proxy.run(_SLOW_QUEUE)
            try:
                _send_burst(client, datagrams, (server_ip, UDP_PORT))
                assert await _received(server, len(datagrams)) == datagrams
            finally:
                lab.proxy.run(["tc", "qdisc", "del", "dev", "ens7", "root"])
    assert 0 in runs


@contextmanager
def _capture(lab: Lab) -> Iterator[list[int]]:
    """The length of every frame that crosses the proxy's link to the server during the
    block, as tcpdump there would see them (read when the block ends)."""
    with lab.proxy.entered():
        capture = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(_ETH_P_ALL))
    with capture:
        capture.bind(("ens7", 0))
        capture.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        capture.setblocking(False)
        frames: list[int] = []
        yield frames
        while True:
            try:
                frames.append(len(capture.recv(1 << 17)))
            except BlockingIOError:
                break


@pytest.mark.parametrize("gso", [True, False], ids=["gso", "no-gso"])
@pytest.mark.parametrize(("client_ip", "server_ip"), ADDRESSES)
async def test_a_capture_on_the_proxys_egress_sees_runs_unless_gso_is_off(
    inside_proxy: Lab, client_ip: str, server_ip: str, gso: bool
) -> None:
    """What tcpdump on the proxy host's link to the server sees: a run is one packet longer
    than the link's MTU (the kernel cuts it up further on); with ``udp_gso=False`` every
    datagram is a packet of its own."""
    datagrams = _datagrams([1400] * 200)
    with _capture(inside_proxy) as frames:
        async with _session(inside_proxy, client_ip, server_ip, {"udp_gso": gso}) as (
            client,
            server,
        ):
            _send_burst(client, datagrams, (server_ip, UDP_PORT))
            assert await _received(server, len(datagrams)) == datagrams
    assert frames
    assert (max(frames) > _ETHERNET_MTU) is gso


@pytest.mark.parametrize("gso", ["on", "off"])
async def test_serves_gso_option_reaches_its_workers(
    lab: Lab, cli_proxy: CliProxy, gso: str
) -> None:
    """``uproxy serve --udp-gso off`` (with two workers, which get it from the supervisor):
    no run on the wire; ``on``: a flat-out stream leaves in runs."""
    cli_proxy.start(*UDP_LISTEN_ARGS, "--workers", "2", "--udp-gso", gso)
    cli_proxy.wait_for_log("2 workers ready")
    datagrams = _datagrams([1400] * 3000)
    with (
        udp_socket(lab.server, SERVER_V4, UDP_PORT) as server,
        udp_socket(lab.client, CLIENT_V4) as client,
    ):
        with trio.fail_after(10):
            while True:  # the workers' UDP listeners may still be coming up
                await client.sendto(b"hello", (SERVER_V4, UDP_PORT))
                with trio.move_on_after(0.2):
                    if (await server.recvfrom(100))[0] == b"hello":
                        break
        with trio.move_on_after(0.3):  # hellos that were still on their way
            while True:
                await server.recvfrom(100)
        with _capture(lab) as frames:
            _send_burst(client, datagrams, (SERVER_V4, UDP_PORT))
            assert await _received(server, len(datagrams)) == datagrams
    assert (max(frames) > _ETHERNET_MTU) is (gso == "on")
    assert cli_proxy.stop() == 0
