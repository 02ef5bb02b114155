"""``uproxy serve --config`` in the lab: routes choose which flows are intercepted, the
command line overrides the file, and SIGHUP reloads the routes without losing a flow."""

from __future__ import annotations

import os
import re
import signal
import socket
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import trio
from lab_tools import (
    CliProxy,
    connect,
    echo_server,
    eventually,
    listen,
    open_flow,
    recv_exactly,
    recv_until_eof,
    send_all,
)

from uproxy_netns import SERVER_V4, Lab

pytestmark = pytest.mark.lab

# A route that turns every x into its letter, both ways: whether a flow went through it, and
# through which version of the file, shows in the bytes, however the reads fall.
ROUTE = """
[[routes]]
name = "{name}"
port = 9090
interceptors = ['uproxy_trio.interceptors:replace(b"x", b"{letter}")']
"""


def write_config(path: Path, text: str) -> None:
    """Replace the file at once, as an editor or a config manager would: a SIGHUP never
    reads half a file."""
    staging = path.with_suffix(".new")
    staging.write_text(text)
    os.replace(staging, path)


def close_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if " close reason=" in line]


async def echoed(client: trio.socket.SocketType, sent: bytes = b"xxxx") -> bytes:
    """Send ``sent`` to an echo server through the proxy; what comes back."""
    await send_all(client, sent)
    return await recv_exactly(client, len(sent))


async def test_a_routed_flow_is_intercepted_and_an_unrouted_one_is_spliced(
    lab: Lab, cli_proxy: CliProxy, tmp_path: Path
) -> None:
    config = tmp_path / "uproxy.toml"
    write_config(config, ROUTE.format(name="marked", letter="y"))
    cli_proxy.start("--config", str(config))
    download = bytes(8 << 20)  # no x in it: the interceptor leaves it as it is
    with trio.fail_after(30):
        for port, expected in ((9090, b"yyyy"), (9092, b"xxxx")):
            async with open_flow(lab, SERVER_V4, port) as (client, server, _):
                await send_all(client, b"xxxx")
                assert await recv_exactly(server, 4) == expected  # the interceptor ran or not
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(send_all, server, download)
                    assert await recv_exactly(client, len(download)) == download
            if port == 9090:
                # 8 MiB went through the routed flow's chain and never through a pipe...
                assert cli_proxy.open_pipes() == 0
        # ...while the unrouted flow spliced it (the pool keeps the pipes it used).
        assert cli_proxy.open_pipes() > 0
    assert cli_proxy.stop() == 0
    routed, unrouted = close_lines(cli_proxy.log)
    assert "server=198.51.100.2:9090 " in routed
    assert routed.endswith(" intercepted=true route=marked")
    assert "server=198.51.100.2:9092 " in unrouted
    assert unrouted.endswith(" intercepted=false")


async def test_the_command_line_overrides_the_file(
    lab: Lab, cli_proxy: CliProxy, tmp_path: Path
) -> None:
    config = tmp_path / "uproxy.toml"
    write_config(config, 'log_level = "warning"\nidle_timeout = 0.2\n')
    cli_proxy.start("--config", str(config), "--idle-timeout", "30")
    with trio.fail_after(10):
        async with open_flow(lab, SERVER_V4) as (client, server, _):
            await trio.sleep(1)  # five times the file's idle timeout: the command line's holds
            await send_all(client, b"still here")
            assert await recv_exactly(server, 10) == b"still here"
    assert cli_proxy.stop() == 0
    # The file's log level, which the command line left alone, holds: no close line at INFO.
    assert close_lines(cli_proxy.log) == []
    assert " INFO " not in cli_proxy.log


# Clients opening short flows at once while the file is reloaded.
LOADERS = 4


async def test_a_sighup_reload_under_load_loses_no_flow(
    lab: Lab, cli_proxy: CliProxy, tmp_path: Path
) -> None:
    config = tmp_path / "uproxy.toml"
    write_config(config, ROUTE.format(name="version-a", letter="A"))
    cli_proxy.start("--config", str(config))
    # (whether the flow started after the reload was done, what came back)
    outcomes: list[tuple[bool, bytes]] = []
    reloaded = trio.Event()

    async def load() -> None:
        """Short flows one after the other, until the reload is done and 20 more."""
        after = 0
        while after < 20:
            started_after = reloaded.is_set()
            with await connect(lab.client, SERVER_V4, 9090) as client:
                await send_all(client, b"xxxx")
                client.shutdown(socket.SHUT_WR)
                outcomes.append((started_after, await recv_until_eof(client)))
            after += started_after

    async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
        listener = await listen(lab.server, SERVER_V4, 9090)
        await nursery.start(echo_server, listener)
        with trio.fail_after(60):
            before = [
                stack.enter_context(await connect(lab.client, SERVER_V4, 9090)) for _ in range(20)
            ]
            for client in before:
                assert await echoed(client) == b"AAAA"
            async with trio.open_nursery() as loading:
                for _ in range(LOADERS):
                    loading.start_soon(load)
                await eventually(lambda: len(outcomes) >= 40)
                write_config(config, ROUTE.format(name="version-b", letter="B"))
                cli_proxy.send(signal.SIGHUP)
                await eventually(lambda: "reloaded 1 routes from" in cli_proxy.log)
                reloaded.set()
            # Flows opened before the reload keep the chain they started with.
            for client in before:
                assert await echoed(client) == b"AAAA"
            with await connect(lab.client, SERVER_V4, 9090) as client:
                assert await echoed(client) == b"BBBB"
            for client in before:
                client.close()
        nursery.cancel_scope.cancel()
    assert cli_proxy.stop() == 0
    # Every flow of the load got its bytes back whole, through one version or the other, and
    # the ones that started after the reload through the new one.
    assert {echo for _, echo in outcomes} <= {b"AAAA", b"BBBB"}
    assert [echo for after, echo in outcomes if after] == [b"BBBB"] * (20 * LOADERS)
    lines = close_lines(cli_proxy.log)
    assert len(lines) == len(outcomes) + len(before) + 1
    assert not [line for line in lines if "reason=closed" not in line]
    assert f"reloaded 1 routes from {config}" in cli_proxy.log


BROKEN = [
    pytest.param('[[routes]]\nname = "db"\nport = 99999\n', "port: '99999'", id="bad-port"),
    pytest.param("[[routes\n", "not TOML: ", id="not-toml"),
    pytest.param(
        '[[routes]]\nname = "db"\ninterceptors = ["no_such_module_xyz:f"]\n',
        "interceptors: 'no_such_module_xyz:f': no module named",
        id="unloadable-spec",
    ),
]


@pytest.mark.parametrize(("broken", "reason"), BROKEN)
async def test_a_broken_file_on_sighup_is_refused_in_one_line_and_the_routes_stay(
    lab: Lab, cli_proxy: CliProxy, tmp_path: Path, broken: str, reason: str
) -> None:
    config = tmp_path / "uproxy.toml"
    write_config(config, ROUTE.format(name="kept", letter="K"))
    cli_proxy.start("--config", str(config))
    async with trio.open_nursery() as nursery:
        listener = await listen(lab.server, SERVER_V4, 9090)
        await nursery.start(echo_server, listener)
        with trio.fail_after(20):
            with await connect(lab.client, SERVER_V4, 9090) as before:
                assert await echoed(before) == b"KKKK"
                write_config(config, broken)
                cli_proxy.send(signal.SIGHUP)
                await eventually(lambda: "reload refused" in cli_proxy.log)
                assert await echoed(before) == b"KKKK"
            with await connect(lab.client, SERVER_V4, 9090) as after:
                assert await echoed(after) == b"KKKK"
        nursery.cancel_scope.cancel()
    assert cli_proxy.stop() == 0
    (refused,) = [line for line in cli_proxy.log.splitlines() if "reload" in line]
    assert re.search(
        rf"ERROR uproxy: reload refused, the 1 routes in use stay: {re.escape(str(config))}: .*"
        + re.escape(reason),
        refused,
    )
    assert [line.endswith("route=kept") for line in close_lines(cli_proxy.log)] == [True] * 2


async def test_workers_load_the_file_and_each_reloads_it_on_sighup(
    lab: Lab, cli_proxy: CliProxy, tmp_path: Path
) -> None:
    config = tmp_path / "uproxy.toml"
    write_config(config, ROUTE.format(name="version-a", letter="A"))
    cli_proxy.start("--config", str(config), "--workers", "2")
    cli_proxy.wait_for_log("2 workers ready")  # start() returns once the first one listens

    async def through_each(expected: bytes, count: int = 40) -> None:
        # The kernel spreads flows over the workers: 40 reach both all but surely.
        for _ in range(count):
            with await connect(lab.client, SERVER_V4, 9090) as client:
                assert await echoed(client) == expected

    async with trio.open_nursery() as nursery:
        listener = await listen(lab.server, SERVER_V4, 9090)
        await nursery.start(echo_server, listener)
        with trio.fail_after(60):
            await through_each(b"AAAA")
            write_config(config, ROUTE.format(name="version-b", letter="B"))
            cli_proxy.send(signal.SIGHUP)
            await eventually(lambda: cli_proxy.log.count("reloaded 1 routes from") == 2)
            await through_each(b"BBBB")
        nursery.cancel_scope.cancel()
    assert cli_proxy.stop() == 0
    assert "SIGHUP received: passing it to 2 workers" in cli_proxy.log
    for worker in ("worker 1/2", "worker 2/2"):
        assert re.search(rf"{worker} uproxy: reloaded 1 routes from ", cli_proxy.log)
        # Each worker took flows before the reload and after it.
        for version in ("version-a", "version-b"):
            assert re.search(rf"{worker} uproxy_trio\.flow: .* route={version}\n", cli_proxy.log)


async def test_a_reload_says_which_keys_besides_the_routes_wait_for_a_restart(
    lab: Lab, cli_proxy: CliProxy, tmp_path: Path
) -> None:
    config = tmp_path / "uproxy.toml"
    write_config(config, "grace = 5\n" + ROUTE.format(name="a", letter="A"))
    cli_proxy.start("--config", str(config))
    write_config(config, "grace = 1\nmax_flows = 3\n" + ROUTE.format(name="b", letter="B"))
    cli_proxy.send(signal.SIGHUP)
    async with trio.open_nursery() as nursery:
        listener = await listen(lab.server, SERVER_V4, 9090)
        await nursery.start(echo_server, listener)
        with trio.fail_after(20):
            await eventually(lambda: "from the next start" in cli_proxy.log)
            with await connect(lab.client, SERVER_V4, 9090) as client:
                assert await echoed(client) == b"BBBB"  # the routes were reloaded all the same
        nursery.cancel_scope.cancel()
    assert cli_proxy.stop() == 0
    assert (
        f"WARNING uproxy: {config}: grace, max_flows changed: from the next start "
        "(SIGHUP reloads [[routes]] only)"
    ) in cli_proxy.log
