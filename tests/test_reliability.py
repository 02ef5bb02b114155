"""Trustworthy under faults, load and misuse: drain, limits, timeouts, descriptors, collisions,
dying peers, self-loops and privileges. Each test fails without the behaviour it names."""

from __future__ import annotations

import grp
import os
import pwd
import signal
import socket
import subprocess
import sys
from functools import partial

import pytest
import trio
from cli_tools import NO_CAPABILITIES, run_uproxy
from lab_tools import (
    PROXY_LISTEN,
    CliProxy,
    EventLog,
    connect,
    connect_expecting_reset,
    echo_server,
    eventually,
    listen,
    listeners,
    open_flow,
    raise_own_fd_limit,
    recv_exactly,
    recv_until_eof,
    roundtrip,
    run_library_proxy,
    send_all,
    silent_server_port,
    waiting_to_be_accepted,
)

from uproxy_netns import (
    CLIENT_V4,
    PROXY_CLIENT_SIDE_V4,
    PROXY_CLIENT_SIDE_V6,
    SERVER_V4,
    Lab,
)
from uproxy_trio import FlowClosed, FlowEvent, Proxy, UpstreamFailed
from uproxy_trio._splice import POOL_KEEP
from uproxy_trio._transparent import IP_TRANSPARENT

pytestmark = pytest.mark.lab


# --- lifecycle -----------------------------------------------------------------------------


async def test_drain_closes_listeners_at_once_and_lets_flows_finish(
    lab: Lab, cli_proxy: CliProxy
) -> None:
    cli_proxy.start("--grace", "30")
    async with trio.open_nursery() as nursery:
        listener = await listen(lab.server, SERVER_V4, 9090)
        await nursery.start(echo_server, listener)
        with trio.fail_after(20):
            client = await connect(lab.client, SERVER_V4, 9090)
            await roundtrip(client)
            cli_proxy.send(signal.SIGTERM)
            cli_proxy.wait_for_log("SIGTERM received: draining 1 flows")
            await eventually(lambda: listeners(lab.proxy) == 0)
            # The flow in flight goes on after the listeners are gone, both ways.
            await roundtrip(client, b"after the signal")
            client.shutdown(socket.SHUT_WR)
            assert await recv_until_eof(client) == b""
            client.close()
        nursery.cancel_scope.cancel()
    assert cli_proxy.wait_exit() == 0
    assert "stopped; every flow finished" in cli_proxy.log


async def test_flows_left_after_the_grace_period_are_reset(lab: Lab, cli_proxy: CliProxy) -> None:
    cli_proxy.start("--grace", "0.5")
    with trio.fail_after(20):
        async with open_flow(lab, SERVER_V4) as (client, server, _):
            await send_all(client, b"x")
            assert await recv_exactly(server, 1) == b"x"
            cli_proxy.send(signal.SIGINT)
            with pytest.raises(ConnectionResetError):
                await recv_until_eof(client)
            with pytest.raises(ConnectionResetError):
                await recv_until_eof(server)
    assert cli_proxy.wait_exit() == 1
    assert "grace period over: resetting 1 flows" in cli_proxy.log


async def test_a_flow_still_connecting_at_the_end_of_grace_is_reset(
    lab: Lab, cli_proxy: CliProxy
) -> None:
    with silent_server_port(lab, 9095):
        # At debug, to see the flow open.
        cli_proxy.start("--grace", "0.5", "--connect-timeout", "60", "--log-level", "debug")
        with trio.fail_after(20):
            client = await connect(lab.client, SERVER_V4, 9095)
            cli_proxy.wait_for_log("flow 1 open")
            cli_proxy.send(signal.SIGTERM)
            # Its upstream never answered: the client learns by a reset, not a clean FIN.
            with pytest.raises(ConnectionResetError):
                await recv_until_eof(client)
        client.close()
    assert cli_proxy.wait_exit() == 1
    # Every flow that opened is reported closed, this one too.
    assert "flow 1 close reason=cancelled" in cli_proxy.log


async def test_a_second_signal_resets_at_once(lab: Lab, cli_proxy: CliProxy) -> None:
    cli_proxy.start("--grace", "600")
    with trio.fail_after(20):
        async with open_flow(lab, SERVER_V4) as (client, server, _):
            await send_all(client, b"x")
            assert await recv_exactly(server, 1) == b"x"
            cli_proxy.send(signal.SIGTERM)
            cli_proxy.wait_for_log("draining 1 flows")
            cli_proxy.send(signal.SIGTERM)
            with pytest.raises(ConnectionResetError):
                await recv_until_eof(client)
    assert cli_proxy.wait_exit() == 1
    assert "SIGTERM received again: resetting 1 flows" in cli_proxy.log


async def test_max_flows_leaves_new_connections_in_the_backlog_until_a_flow_ends(
    lab: Lab, cli_proxy: CliProxy
) -> None:
    cli_proxy.start("--max-flows", "2", "--log-level", "warning")
    with trio.fail_after(20), await listen(lab.server, SERVER_V4, 9090) as listener:
        held: list[tuple[trio.socket.SocketType, trio.socket.SocketType]] = []
        for _ in range(2):
            client = await connect(lab.client, SERVER_V4, 9090)
            server, _ = await listener.accept()
            held.append((client, server))
        at_the_limit = cli_proxy.open_sockets()
        waiting = [await connect(lab.client, SERVER_V4, 9090) for _ in range(3)]
        for client in waiting:
            await send_all(client, b"wait")
        # Bytes through both held flows: the proxy has been at work since the three arrived.
        for client, server in held:
            await send_all(client, b"up")
            assert await recv_exactly(server, 2) == b"up"
            await send_all(server, b"down")
            assert await recv_exactly(client, 4) == b"down"
        # Not accepted: the three wait in the kernel's backlog, with their bytes, and the proxy
        # holds no socket for them and has not connected out for them.
        assert waiting_to_be_accepted(lab.proxy) == 3
        assert cli_proxy.open_sockets() == at_the_limit
        assert waiting_to_be_accepted(lab.server, 9090) == 0

        # Each flow that ends lets exactly one waiting connection in, and it is served.
        by_port = {client.getsockname()[1]: client for client in waiting}
        for still_waiting in (2, 1, 0):
            ending_client, ending_server = held.pop(0)
            ending_client.close()
            ending_server.close()
            server, peer = await listener.accept()
            client = by_port.pop(peer[1])
            assert await recv_exactly(server, 4) == b"wait"
            await send_all(server, b"served")
            assert await recv_exactly(client, 6) == b"served"
            held.append((client, server))
            assert waiting_to_be_accepted(lab.proxy) == still_waiting
        for client, server in held:
            client.close()
            server.close()
    assert cli_proxy.stop() == 0


# Rounds of the drain race below: each one lands either way with even odds (Trio runs a
# batch of woken tasks in one order or its reverse), so twenty make a miss one in a million.
DRAIN_RACE_ROUNDS = 20


async def drain_as_the_only_flow_ends(lab: Lab) -> int:
    """A proxy at ``max_flows=1`` with a connection waiting in its backlog starts draining
    just as its one flow ends, as it would for a signal that came then; returns what
    ``drain`` returned: how many flows it reset."""
    drained: list[int] = []
    async with trio.open_nursery() as server_side:
        with await listen(lab.server, SERVER_V4, 9090) as listener:
            async with trio.open_nursery() as proxy_side:

                async def drain() -> None:
                    drained.append(await proxy.drain(10))

                def on_event(event: FlowEvent) -> None:
                    if isinstance(event, FlowClosed) and event.flow.id == 1:
                        proxy_side.start_soon(drain)

                proxy = Proxy(max_flows=1, on_event=on_event)
                await proxy_side.start(proxy.serve, PROXY_LISTEN)
                first = await connect(lab.client, SERVER_V4, 9090)
                first_server, _ = await listener.accept()
                waiting = await connect(lab.client, SERVER_V4, 9090)
                with first, first_server:
                    # Bytes both ways: the proxy ran since, and now waits for a free slot.
                    await send_all(first, b"?")
                    assert await recv_exactly(first_server, 1) == b"?"
                    await send_all(first_server, b"!")
                    assert await recv_exactly(first, 1) == b"!"

                async def close_what_comes() -> None:
                    while True:
                        sock, _ = await listener.accept()
                        sock.close()

                server_side.start_soon(close_what_comes)
                waiting.close()
        server_side.cancel_scope.cancel()
    return drained[0]


async def test_a_drain_that_begins_as_a_flow_ends_takes_no_new_flow(inside_proxy: Lab) -> None:
    lab = inside_proxy
    with trio.fail_after(60):
        flows_reset = [await drain_as_the_only_flow_ends(lab) for _ in range(DRAIN_RACE_ROUNDS)]
    # The one flow in flight finished by itself, and no other was taken: nothing was reset.
    assert flows_reset == [0] * DRAIN_RACE_ROUNDS


async def test_idle_flows_are_reset_and_busy_ones_kept(lab: Lab, cli_proxy: CliProxy) -> None:
    cli_proxy.start("--idle-timeout", "0.5")
    async with trio.open_nursery() as nursery:
        listener = await listen(lab.server, SERVER_V4, 9090)
        await nursery.start(echo_server, listener)
        with trio.fail_after(20):
            idle = await connect(lab.client, SERVER_V4, 9090)
            busy = await connect(lab.client, SERVER_V4, 9090)
            await roundtrip(idle)
            for _ in range(10):  # 2 s of traffic, never 0.5 s apart
                await roundtrip(busy)
                await trio.sleep(0.2)
            with pytest.raises(ConnectionResetError):
                await recv_until_eof(idle)
            await roundtrip(busy)
        idle.close()
        busy.close()
        nursery.cancel_scope.cancel()
    assert cli_proxy.stop() == 0
    assert "flow 1 close reason=idle_timeout" in cli_proxy.log


async def test_running_out_of_descriptors_backs_off_and_recovers(
    lab: Lab, cli_proxy: CliProxy
) -> None:
    cli_proxy.start()
    # Four free descriptors: two flows' worth (accepted socket + outgoing socket each).
    limit = cli_proxy.open_fds() + 4
    subprocess.run(["prlimit", f"--pid={cli_proxy.pid}", f"--nofile={limit}:{limit}"], check=True)
    async with trio.open_nursery() as nursery:
        listener = await listen(lab.server, SERVER_V4, 9090)
        await nursery.start(echo_server, listener)
        with trio.fail_after(20):
            first = await connect(lab.client, SERVER_V4, 9090)
            second = await connect(lab.client, SERVER_V4, 9090)
            await roundtrip(first)
            await roundtrip(second)
            # The third waits in the kernel's backlog while accept() fails with EMFILE...
            third = await connect(lab.client, SERVER_V4, 9090)
            await send_all(third, b"wait")
            cli_proxy.wait_for_log("accept failed: EMFILE (Too many open files)")
            # ...and is served as soon as descriptors come back.
            first.close()
            second.close()
            assert await recv_exactly(third, 4) == b"wait"
            await roundtrip(third)
            third.close()
        nursery.cancel_scope.cancel()
    assert cli_proxy.stop() == 0


async def test_no_descriptor_for_the_outgoing_socket_resets_that_client_only(
    lab: Lab, cli_proxy: CliProxy
) -> None:
    cli_proxy.start()
    spare = cli_proxy.open_fds() + 1  # room to accept, none to connect out
    roomy = spare + 64
    subprocess.run(["prlimit", f"--pid={cli_proxy.pid}", f"--nofile={spare}:{roomy}"], check=True)
    async with trio.open_nursery() as nursery:
        listener = await listen(lab.server, SERVER_V4, 9090)
        await nursery.start(echo_server, listener)
        with trio.fail_after(20):
            starved = await connect(lab.client, SERVER_V4, 9090)
            with pytest.raises(ConnectionResetError):
                await recv_until_eof(starved)
            starved.close()
            cli_proxy.wait_for_log("failed: no_resources: cannot open the outgoing socket: emfile")
            subprocess.run(
                ["prlimit", f"--pid={cli_proxy.pid}", f"--nofile={roomy}:{roomy}"], check=True
            )
            fine = await connect(lab.client, SERVER_V4, 9090)
            await roundtrip(fine)
            fine.close()
        nursery.cancel_scope.cancel()
    assert cli_proxy.stop() == 0


async def test_a_four_tuple_collision_resets_only_that_client(inside_proxy: Lab) -> None:
    lab = inside_proxy
    events = EventLog()
    async with trio.open_nursery() as nursery:
        listener = await listen(lab.server, SERVER_V4, 9090)
        await nursery.start(echo_server, listener)
        await nursery.start(run_library_proxy, events, {})
        with trio.fail_after(10):
            # Something on the proxy host already holds client:40123 -> server:9090.
            squatter = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            squatter.setsockopt(socket.IPPROTO_IP, IP_TRANSPARENT, 1)
            squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            await squatter.bind((CLIENT_V4, 40123))
            await squatter.connect((SERVER_V4, 9090))
            bystander = await connect(lab.client, SERVER_V4, 9090)
            await roundtrip(bystander)

            victim = trio.socket.from_stdlib_socket(lab.client.socket(socket.AF_INET))
            await victim.bind((CLIENT_V4, 40123))
            await victim.connect((SERVER_V4, 9090))
            with pytest.raises(ConnectionResetError):
                await recv_until_eof(victim)
            (failed,) = await events.wait_for(UpstreamFailed)
            await roundtrip(bystander)
        for sock in (squatter, bystander, victim):
            sock.close()
        nursery.cancel_scope.cancel()
    assert failed.flow.client == (CLIENT_V4, 40123)
    assert failed.reason == "address_in_use"
    assert "eaddrnotavail" in failed.detail or "eaddrinuse" in failed.detail


# --- faults --------------------------------------------------------------------------------

STREAM_FOREVER = """
import socket, sys
if sys.argv[2] == "client":
    sock = socket.create_connection((sys.argv[1], 9090))
else:
    listener = socket.socket(); listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((sys.argv[1], 9090)); listener.listen()
    print("listening", flush=True)
    sock, _ = listener.accept()
while True:
    sock.sendall(b"z" * 65536)
"""


async def receive_line(stream: trio.abc.ReceiveStream) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        data = await stream.receive_some()
        assert data, f"EOF after {line!r}"
        line += data
    return line


@pytest.mark.parametrize("dying", ["client", "server"])
async def test_a_peer_killed_mid_transfer_is_noticed_and_cleaned_up(
    lab: Lab, cli_proxy: CliProxy, dying: str
) -> None:
    cli_proxy.start("--log-level", "warning")
    baseline = cli_proxy.open_sockets()
    namespace = lab.client if dying == "client" else lab.server
    argv = namespace.exec_argv([sys.executable, "-c", STREAM_FOREVER, SERVER_V4, dying])
    # A nursery of its own, so the script is killed however the test ends.
    async with trio.open_nursery() as nursery:
        run_script = partial(trio.run_process, argv, stdout=subprocess.PIPE, check=False)
        with trio.fail_after(20):
            if dying == "client":
                with await listen(lab.server, SERVER_V4, 9090) as listener:
                    process = await nursery.start(run_script)
                    survivor, _ = await listener.accept()
            else:
                process = await nursery.start(run_script)
                assert process.stdout is not None
                assert await receive_line(process.stdout) == b"listening\n"
                survivor = await connect(lab.client, SERVER_V4, 9090)
            with survivor:
                await recv_exactly(survivor, 1 << 20)  # mid-transfer
                process.kill()
                await process.wait()
                # The survivor learns (EOF after the bytes in flight, or a reset) promptly.
                with trio.fail_after(5):
                    try:
                        await recv_until_eof(survivor, limit=1 << 30)
                    except ConnectionResetError:
                        pass
            await eventually(lambda: cli_proxy.open_sockets() == baseline)
    assert cli_proxy.stop() == 0


@pytest.mark.parametrize("destination", [PROXY_CLIENT_SIDE_V4, PROXY_CLIENT_SIDE_V6])
async def test_a_flow_to_the_proxys_own_listener_is_refused(
    lab: Lab, cli_proxy: CliProxy, destination: str
) -> None:
    cli_proxy.start(listen=("0.0.0.0:9091", "[::]:9091"))
    with trio.fail_after(10):
        await connect_expecting_reset(lab.client, destination, 9091)
    assert cli_proxy.stop() == 0
    shown = f"[{destination}]:9091" if ":" in destination else f"{destination}:9091"
    assert f"flow 1 refused (self_loop): {shown} is this proxy's own listener" in cli_proxy.log
    assert "flow 2 " not in cli_proxy.log  # no loop


# --- no leaks --------------------------------------------------------------------------------


async def test_thousands_of_short_flows_leave_no_descriptor_behind(
    lab: Lab, cli_proxy: CliProxy
) -> None:
    cli_proxy.start("--log-level", "warning")
    baseline = cli_proxy.open_sockets()
    done = 0

    async def short_flows(count: int) -> None:
        nonlocal done
        for _ in range(count):
            client = await connect(lab.client, SERVER_V4, 9090)
            with client:
                await roundtrip(client, b"hello")
                client.shutdown(socket.SHUT_WR)
                assert await recv_until_eof(client) == b""
            done += 1

    async with trio.open_nursery() as nursery:
        listener = await listen(lab.server, SERVER_V4, 9090)
        await nursery.start(echo_server, listener)
        with trio.fail_after(120):
            async with trio.open_nursery() as clients:
                for _ in range(40):
                    clients.start_soon(short_flows, 50)
        nursery.cancel_scope.cancel()
    assert done == 2000
    await eventually(lambda: cli_proxy.open_sockets() == baseline)
    assert cli_proxy.open_pipes() <= 2 * POOL_KEEP
    assert cli_proxy.stop() == 0


async def test_1000_concurrent_flows_of_256_kib_are_byte_exact(
    lab: Lab, cli_proxy: CliProxy
) -> None:
    raise_own_fd_limit()
    cli_proxy.start("--log-level", "warning")
    block = os.urandom(256 << 10)
    exact = 0
    everyone_connected = trio.Event()
    connected = 0

    async def one_flow(index: int) -> None:
        nonlocal exact, connected
        payload = index.to_bytes(8, "big") + block[8:]
        client = await connect(lab.client, SERVER_V4, 9090)
        with client:
            connected += 1
            if connected == 1000:
                everyone_connected.set()
            await everyone_connected.wait()

            async def send() -> None:
                await send_all(client, payload)
                client.shutdown(socket.SHUT_WR)

            async with trio.open_nursery() as both_ways:
                both_ways.start_soon(send)
                if await recv_until_eof(client, limit=len(payload)) == payload:
                    exact += 1

    async with trio.open_nursery() as nursery:
        listener = await listen(lab.server, SERVER_V4, 9090, backlog=2048)
        await nursery.start(echo_server, listener)
        with trio.fail_after(180):
            async with trio.open_nursery() as clients:
                for index in range(1000):
                    clients.start_soon(one_flow, index)
        nursery.cancel_scope.cancel()
    assert exact == 1000
    assert cli_proxy.stop() == 0


# --- privileges and input -------------------------------------------------------------------


def test_without_cap_net_admin_it_says_so_in_one_line(lab: Lab, cli_proxy: CliProxy) -> None:
    done = run_uproxy("serve", namespace=lab.proxy, wrap=NO_CAPABILITIES)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert lines[-1] == (
        "uproxy: error: setting IP_TRANSPARENT needs CAP_NET_ADMIN or CAP_NET_RAW "
        "(run as root or grant one of them)"
    )
    assert "Traceback" not in done.stderr


async def test_cap_net_raw_alone_is_enough_to_relay(lab: Lab, cli_proxy: CliProxy) -> None:
    """The kernel lets IP_TRANSPARENT be set with CAP_NET_RAW as well as CAP_NET_ADMIN, as
    the error above says: a proxy holding nothing but CAP_NET_RAW relays transparently."""
    cli_proxy.start(wrap=["setpriv", "--inh-caps=-all", "--bounding-set=-all,+net_raw", "--"])
    assert int(cli_proxy.status("CapEff"), 16) == 1 << 13  # CAP_NET_RAW, nothing else
    async with trio.open_nursery() as nursery:
        listener = await listen(lab.server, SERVER_V4, 9090)
        await nursery.start(echo_server, listener)
        with trio.fail_after(10):
            client = await connect(lab.client, SERVER_V4, 9090)
            await roundtrip(client, b"transparent with CAP_NET_RAW")
            client.close()
        nursery.cancel_scope.cancel()
    assert cli_proxy.stop() == 0


# Supplementary groups for the proxy to start with, so that giving them up shows.
START_GROUPS = ["setpriv", "--groups=adm,daemon", "--"]


@pytest.mark.parametrize(
    ("group_args", "group"),
    [
        pytest.param([], "nogroup", id="the-users-group"),
        pytest.param(["--group", "daemon"], "daemon", id="group-option"),
    ],
)
async def test_user_option_drops_to_that_user_with_net_admin_only(
    lab: Lab, cli_proxy: CliProxy, group_args: list[str], group: str
) -> None:
    # Started as root (uid 0, gid 0) with supplementary groups: every one must be given up.
    cli_proxy.start("--user", "nobody", *group_args, wrap=START_GROUPS)
    user = pwd.getpwnam("nobody")
    if not group_args:
        assert grp.getgrgid(user.pw_gid).gr_name == group
    gid = grp.getgrnam(group).gr_gid
    # Real, effective, saved and filesystem ids.
    assert cli_proxy.status("Uid").split() == [str(user.pw_uid)] * 4
    assert cli_proxy.status("Gid").split() == [str(gid)] * 4
    assert cli_proxy.status("Groups") == ""
    assert int(cli_proxy.status("CapEff"), 16) == 1 << 12  # CAP_NET_ADMIN, nothing else
    assert int(cli_proxy.status("CapPrm"), 16) == 1 << 12
    async with trio.open_nursery() as nursery:
        listener = await listen(lab.server, SERVER_V4, 9090)
        await nursery.start(echo_server, listener)
        with trio.fail_after(10):
            client = await connect(lab.client, SERVER_V4, 9090)
            await roundtrip(client, b"still transparent")
            client.close()
        nursery.cancel_scope.cancel()
    assert cli_proxy.stop() == 0
    assert "running as nobody with CAP_NET_ADMIN only" in cli_proxy.log


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--user", "no-such-user-here"], "no such user 'no-such-user-here'"),
        (["--group", "nogroup"], "--group needs --user"),
        (["--max-flows", "0"], "'--max-flows'"),
        (["--grace", "-1"], "'--grace'"),
    ],
)
def test_bad_lifecycle_options_are_usage_errors(lab: Lab, args: list[str], message: str) -> None:
    done = run_uproxy("serve", *args, namespace=lab.proxy)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1
    assert message in done.stderr
