"""``uproxy serve`` as a user runs it: a separate process in the lab's proxy namespace."""

from __future__ import annotations

import os
import re
import signal
import socket

import pytest
import trio
from cli_tools import run_uproxy
from lab_tools import (
    ADDRESSES,
    CONNECT_TIMEOUT_S,
    SCHEDULING_ALLOWANCE_S,
    CliProxy,
    connect,
    echo_server,
    listen,
    open_flow,
    recv_exactly,
    recv_until_eof,
    send_all,
    silent_server_port,
    until_the_proxy_has_read,
)

from uproxy_netns import SERVER_V4, Lab

pytestmark = pytest.mark.lab


@pytest.mark.parametrize(("client_ip", "server_ip"), ADDRESSES)
async def test_server_sees_the_client_and_the_client_sees_the_server(
    lab: Lab, cli_proxy: CliProxy, client_ip: str, server_ip: str
) -> None:
    cli_proxy.start()
    with trio.fail_after(10):
        async with open_flow(lab, server_ip) as (client, server, peer):
            assert peer[:2] == client.getsockname()[:2]
            assert peer[0] == client_ip
            assert client.getpeername()[:2] == (server_ip, 9090)
            await send_all(client, b"hello")
            assert await recv_exactly(server, 5) == b"hello"
    assert cli_proxy.stop() == 0
    # The flow's life is one line at its close: who, where to, and how it ended.
    port = peer[1]
    client_text = f"[{client_ip}]:{port}" if ":" in client_ip else f"{client_ip}:{port}"
    server_text = f"[{server_ip}]:9090" if ":" in server_ip else f"{server_ip}:9090"
    assert re.search(
        rf"flow 1 close reason=\w+ client={re.escape(client_text)} "
        rf"server={re.escape(server_text)} .*client_to_server=5 ",
        cli_proxy.log,
    )


@pytest.mark.parametrize(("client_ip", "server_ip"), ADDRESSES)
async def test_32_mib_each_way_at_once_arrives_byte_exact(
    lab: Lab, cli_proxy: CliProxy, client_ip: str, server_ip: str
) -> None:
    cli_proxy.start()
    size = 32 << 20
    upload, download = os.urandom(size), os.urandom(size)
    received: dict[str, bytes] = {}
    with trio.fail_after(60):
        async with open_flow(lab, server_ip) as (client, server, _):

            async def send_then_fin(sock: trio.socket.SocketType, data: bytes) -> None:
                await send_all(sock, data)
                sock.shutdown(socket.SHUT_WR)

            async def drain(name: str, sock: trio.socket.SocketType) -> None:
                received[name] = await recv_until_eof(sock, limit=size)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_then_fin, client, upload)
                nursery.start_soon(send_then_fin, server, download)
                nursery.start_soon(drain, "server", server)
                nursery.start_soon(drain, "client", client)
    assert received["server"] == upload
    assert received["client"] == download
    assert cli_proxy.stop() == 0
    assert "close reason=closed" in cli_proxy.log
    assert f"client_to_server={size} server_to_client={size}" in cli_proxy.log


async def test_label_marks_every_read_both_ways(lab: Lab, cli_proxy: CliProxy) -> None:
    cli_proxy.start("--label", "<via uproxy>")
    label = b"<via uproxy>\n"
    with trio.fail_after(10):
        async with open_flow(lab, SERVER_V4) as (client, server, _):
            # Two reads for certain, each labelled.
            await send_all(client, b"hel")
            await until_the_proxy_has_read(lab, client)
            await send_all(client, b"lo")
            client.shutdown(socket.SHUT_WR)
            assert await recv_until_eof(server) == b"hel" + label + b"lo" + label
            # However the proxy happens to read: one label after each read, none empty.
            await send_all(server, b"world")
            server.close()
            at_client = await recv_until_eof(client)
    assert at_client.endswith(label)
    pieces = at_client.split(label)[:-1]
    assert b"".join(pieces) == b"world"
    assert all(pieces)


async def test_connect_timeout_resets_a_client_whose_server_is_silent(
    lab: Lab, cli_proxy: CliProxy
) -> None:
    with silent_server_port(lab, 9094):
        cli_proxy.start("--connect-timeout", str(CONNECT_TIMEOUT_S))
        with trio.fail_after(10):
            # From before the handshake: the proxy's clock starts when it accepts, after it.
            started = trio.current_time()
            client = await connect(lab.client, SERVER_V4, 9094)
            with pytest.raises(ConnectionResetError):
                await recv_until_eof(client)
            waited = trio.current_time() - started
        client.close()
    assert CONNECT_TIMEOUT_S <= waited <= CONNECT_TIMEOUT_S + SCHEDULING_ALLOWANCE_S
    assert cli_proxy.stop() == 0
    assert "failed: timeout: no answer in time; resetting client" in cli_proxy.log


async def test_200_concurrent_flows_each_get_their_own_bytes_back(
    lab: Lab, cli_proxy: CliProxy
) -> None:
    cli_proxy.start("--log-level", "warning")
    seen_ports: set[int] = set()
    all_connected = trio.Event()

    def accepted(peer: tuple[str, int]) -> None:
        seen_ports.add(peer[1])
        if len(seen_ports) == 200:
            all_connected.set()

    async with trio.open_nursery() as nursery:
        listener = await listen(lab.server, SERVER_V4, 9090)
        await nursery.start(echo_server, listener, accepted)
        client_ports: set[int] = set()

        async def one_flow(index: int) -> None:
            payload = os.urandom(16384) + index.to_bytes(4, "big")
            client = await connect(lab.client, SERVER_V4, 9090)
            with client:
                client_ports.add(client.getsockname()[1])
                await send_all(client, payload)
                # Hold every flow open until all 200 are connected at once.
                await all_connected.wait()
                client.shutdown(socket.SHUT_WR)
                assert await recv_until_eof(client) == payload

        with trio.fail_after(60):
            async with trio.open_nursery() as clients:
                for index in range(200):
                    clients.start_soon(one_flow, index)
        nursery.cancel_scope.cancel()
    assert seen_ports == client_ports
    assert cli_proxy.stop() == 0


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_the_server_cleanly(lab: Lab, cli_proxy: CliProxy, sig: int) -> None:
    cli_proxy.start()
    assert cli_proxy.stop(sig) == 0
    assert f"{signal.Signals(sig).name} received: draining 0 flows" in cli_proxy.log
    assert "stopped; every flow finished" in cli_proxy.log
    assert "Traceback" not in cli_proxy.log


def test_address_in_use_is_one_line_and_exit_1(lab: Lab, cli_proxy: CliProxy) -> None:
    cli_proxy.start()
    done = run_uproxy("serve", "--listen", "127.0.0.1:9091", namespace=lab.proxy)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "uproxy: error: cannot listen on 127.0.0.1:9091: address already in use"
    ]
