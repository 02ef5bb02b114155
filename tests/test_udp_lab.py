"""UDP sessions through the proxy in the lab, IPv4 and IPv6: addresses kept both ways, many
concurrent sessions with no datagram crossing, expiry, limits, ICMP errors, large datagrams."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing
from lab_tools import ADDRESSES, CliProxy, descriptors, raise_own_fd_limit
from udp_tools import (
    CLOSED_UDP_PORT,
    UDP_LISTEN_ARGS,
    UDP_PORT,
    echo_server,
    exchange,
    udp_proxy,
    udp_socket,
)

from uproxy_netns import Lab
from uproxy_trio import Direction, Flow, FlowClosed, FlowOpened, _udp
from uproxy_trio._datagram import open_session_socket
from uproxy_trio._transparent import transparent_datagram_socket
from uproxy_trio._udp_way import Drop

pytestmark = [pytest.mark.lab]


@pytest.mark.parametrize(("client_ip", "server_ip"), ADDRESSES)
async def test_server_sees_the_client_and_the_client_sees_the_server(
    inside_proxy: Lab, client_ip: str, server_ip: str
) -> None:
    lab = inside_proxy
    async with udp_proxy() as (_proxy, events):
        with (
            udp_socket(lab.server, server_ip, UDP_PORT) as server,
            udp_socket(lab.client, client_ip) as client,
        ):
            client_address = client.getsockname()[:2]
            await client.sendto(b"ping", (server_ip, UDP_PORT))
            with trio.fail_after(5):
                data, seen_from = await server.recvfrom(100)
            assert (data, seen_from[:2]) == (b"ping", client_address)
            await server.sendto(b"pong", seen_from)
            with trio.fail_after(5):
                data, answered_by = await client.recvfrom(100)
            assert (data, answered_by[:2]) == (b"pong", (server_ip, UDP_PORT))
            # The client's later datagrams reach the same session's socket, not the listener.
            await client.sendto(b"again", (server_ip, UDP_PORT))
            with trio.fail_after(5):
                data, seen_from = await server.recvfrom(100)
            assert (data, seen_from[:2]) == (b"again", client_address)
        (opened,) = events.of_type(FlowOpened)
        assert opened.flow.transport == "udp"
        assert (opened.flow.client, opened.flow.server) == (client_address, (server_ip, UDP_PORT))


async def _client(
    lab: Lab,
    client_ip: str,
    server: tuple[str, int],
    index: int,
    count: int,
    go: trio.Event,
    crossed: list[str],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Send ``count`` numbered datagrams, one at a time, each checked on its way back;
    a lost one is sent again. Started once its socket is made; the first datagram goes out
    with every other client's, at ``go``."""
    with udp_socket(lab.client, client_ip) as sock:
        port = sock.getsockname()[1]
        mine = b"%d %d " % (index, port)
        task_status.started()
        await go.wait()
        for seq in range(count):
            payload = mine + b"%d" % seq
            while True:
                await sock.sendto(payload, server)
                with trio.move_on_after(2):
                    while True:
                        data, source = await sock.recvfrom(100)
                        if source[:2] != server or not data.startswith(mine):
                            crossed.append(f"client {index} got {data!r} from {source}")
                        if data == payload:
                            break
                    break


@pytest.mark.parametrize(("client_ip", "server_ip"), ADDRESSES)
async def test_a_thousand_concurrent_sessions_never_cross(
    lab: Lab, cli_proxy: CliProxy, client_ip: str, server_ip: str
) -> None:
    """1000 clients send their first datagram at once, while the proxy (a process of its
    own, on the other CPU) binds and connects their sessions' sockets: the race where TPROXY
    hands a half-made session another client's datagram. Then each exchanges 100 datagrams.
    The server checks each datagram's source against the port written in it, each client
    checks that every answer is its own."""
    raise_own_fd_limit()
    sessions, per_session = 1000, 100
    cli_proxy.start(*UDP_LISTEN_ARGS, "--log-level", "debug")
    crossed: list[str] = []
    server_address = (server_ip, UDP_PORT)
    with udp_socket(lab.server, server_ip, UDP_PORT) as server:

        async def checking_echo() -> None:
            while True:
                data, peer = await server.recvfrom(100)
                _index, port, _seq = data.split()
                if (peer[0], peer[1]) != (client_ip, int(port)):
                    crossed.append(f"server got {data!r} from {peer}")
                await server.sendto(data, peer)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(checking_echo)
            go = trio.Event()
            async with trio.open_nursery() as clients:
                for index in range(sessions):
                    await clients.start(
                        _client, lab, client_ip, server_address, index, per_session, go, crossed
                    )
                go.set()  # every client's socket is made
            nursery.cancel_scope.cancel()
    assert crossed == []
    log = cli_proxy.log
    assert log.count(" open client=") == sessions


async def test_idle_sessions_expire_and_give_their_descriptors_back(inside_proxy: Lab) -> None:
    lab, server = inside_proxy, ("198.51.100.2", UDP_PORT)
    async with (
        udp_proxy({"udp_idle_timeout": 0.5}) as (proxy, events),
        echo_server(lab, server[0]),
    ):
        baseline = descriptors()["socket"]
        clients = [udp_socket(lab.client, "192.0.2.2") for _ in range(20)]
        try:
            for client in clients:
                await exchange(client, b"hello", server)
        finally:
            for client in clients:
                client.close()
        assert proxy.udp.active == 20
        assert descriptors()["socket"] == baseline + 2 * 20  # two sockets a session
        closed = await events.wait_for(FlowClosed, 20, timeout=5)
        assert {event.reason for event in closed} == {"idle_timeout"}
        assert proxy.udp.active == 0
        assert descriptors()["socket"] == baseline


async def test_at_the_session_limit_new_sessions_are_dropped_and_old_ones_go_on(
    inside_proxy: Lab,
) -> None:
    lab, server = inside_proxy, ("198.51.100.2", UDP_PORT)
    async with udp_proxy({"max_udp_sessions": 3}) as (proxy, _events), echo_server(lab, server[0]):
        clients = [udp_socket(lab.client, "192.0.2.2") for _ in range(4)]
        try:
            for client in clients[:3]:
                assert (await exchange(client, b"in", server))[0] == b"in"
            with pytest.raises(trio.TooSlowError):
                await exchange(clients[3], b"over", server, timeout=0.5)
            assert proxy.udp.dropped[Drop.SESSION_LIMIT] == 1
            for client in clients[:3]:
                assert (await exchange(client, b"still", server))[0] == b"still"
        finally:
            for client in clients:
                client.close()


@pytest.mark.parametrize(("client_ip", "server_ip"), ADDRESSES)
async def test_port_unreachable_ends_the_session(
    inside_proxy: Lab, client_ip: str, server_ip: str
) -> None:
    """The server's ICMP port unreachable reaches the session's socket (the ICMP socket rule)
    as ECONNREFUSED, and the session ends at once, not at its idle timeout."""
    lab = inside_proxy
    async with udp_proxy({"udp_idle_timeout": 30}) as (_proxy, events):
        with udp_socket(lab.client, client_ip) as client:
            await client.sendto(b"anyone?", (server_ip, CLOSED_UDP_PORT))
            (closed,) = await events.wait_for(FlowClosed, timeout=3)
    assert closed.reason == "server_refused"
    assert closed.flow.transport == "udp"


@pytest.mark.parametrize(("client_ip", "server_ip"), ADDRESSES)
async def test_a_60000_byte_datagram_goes_through_whole(
    inside_proxy: Lab, client_ip: str, server_ip: str
) -> None:
    lab = inside_proxy
    big = bytes(range(256)) * 234 + b"end"  # 59,907 bytes
    big = big + b"." * (60000 - len(big))
    async with udp_proxy(), echo_server(lab, server_ip):
        with udp_socket(lab.client, client_ip) as client:
            data, _ = await exchange(client, big, (server_ip, UDP_PORT))
    assert data == big


async def test_a_datagram_handed_to_a_half_made_session_goes_to_its_own(
    inside_proxy: Lab, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    """Between a session socket's bind and connect, a socket-matching shortcut rule for the
    clients' datagrams (as the seed's TCP rules have; ``uproxy rules`` writes none for UDP)
    can hand it another client's datagram. Forced here: while the proxy makes A's session,
    B's first datagram is sent (and delivered, in the sending call) at the exact moment. It
    must reach the server from B's address, in B's own session, and A's session must carry
    only A's."""
    lab, server_address = inside_proxy, ("198.51.100.2", UDP_PORT)
    shortcut = [
        "PREROUTING",
        "-i",
        "ens6",
        "-p",
        "udp",
        "--dport",
        "9090",
        "-m",
        "socket",
        "--transparent",
        "-j",
        "DIVERT",
    ]
    lab.proxy.run(["iptables", "-t", "mangle", "-I", *shortcut])
    request.addfinalizer(lambda: lab.proxy.run(["iptables", "-t", "mangle", "-D", *shortcut]))
    real_open = open_session_socket
    intruder = lab.client.socket(socket.AF_INET, socket.SOCK_DGRAM)
    intruder.bind(("192.0.2.2", 0))

    def open_racing(local: tuple[str, int], peer: tuple[str, int]) -> socket.socket:
        if local != server_address or intruder.getsockname()[1] == peer[1]:
            return real_open(local, peer)
        sock = transparent_datagram_socket(socket.AF_INET)
        sock.bind(local)
        intruder.sendto(b"from B", server_address)  # lands in this unconnected socket
        sock.connect(peer)
        return sock

    monkeypatch.setattr(_udp, "open_session_socket", open_racing)
    with intruder, udp_socket(lab.server, server_address[0], UDP_PORT) as server:
        async with udp_proxy() as (proxy, events):
            with udp_socket(lab.client, "192.0.2.2") as client:
                await client.sendto(b"from A", server_address)
                seen = {}
                with trio.fail_after(5):
                    for _ in range(2):
                        data, peer = await server.recvfrom(100)
                        seen[data] = peer[:2]
                assert seen == {
                    b"from A": client.getsockname()[:2],
                    b"from B": intruder.getsockname()[:2],
                }
            assert proxy.udp.handed_back == 1
            assert len(events.of_type(FlowOpened)) == 2


@pytest.mark.parametrize("intercepted", [False, True], ids=["plain", "intercepted"])
async def test_a_datagram_the_listener_hands_to_a_waiting_session_goes_out_at_once(
    inside_proxy: Lab, intercepted: bool
) -> None:
    """A session's datagram can reach the listener's path after the session is made (queued
    for the listener before the session's connect, or handed back by another session): it
    is relayed at once, not when the session's own socket next has a datagram. The session
    here has relayed one datagram and waits for its next edge, which never comes."""
    lab, server_address = inside_proxy, ("198.51.100.2", UDP_PORT)

    async def identity(
        flow: Flow, direction: Direction, chunks: AsyncIterator[bytes]
    ) -> AsyncIterator[bytes]:
        async for chunk in chunks:
            yield chunk

    options = {"interceptors": [identity]} if intercepted else {}
    with udp_socket(lab.server, server_address[0], UDP_PORT) as server:
        async with udp_proxy(options) as (proxy, _events):
            with udp_socket(lab.client, "192.0.2.2") as client:
                await client.sendto(b"first", server_address)
                with trio.fail_after(5):
                    assert (await server.recvfrom(100))[0] == b"first"
                await trio.testing.wait_all_tasks_blocked()
                proxy.udp.deliver(b"late", client.getsockname()[:2], server_address)
                with trio.fail_after(5):
                    data, peer = await server.recvfrom(100)
                assert (data, peer[:2]) == (b"late", client.getsockname()[:2])
                assert proxy.udp.sessions_total == 1
