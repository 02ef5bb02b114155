"""``uproxy serve --config`` in the lab: routes choose which flows are intercepted, the
command line overrides the file, and workers load the file too."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import trio
from lab_tools import (
    CliProxy,
    connect,
    echo_server,
    listen,
    open_flow,
    recv_exactly,
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


async def test_workers_load_the_file(lab: Lab, cli_proxy: CliProxy, tmp_path: Path) -> None:
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
        nursery.cancel_scope.cancel()
    assert cli_proxy.stop() == 0
    for worker in ("worker 1/2", "worker 2/2"):
        assert re.search(rf"{worker} uproxy_trio\.flow: .* route=version-a\n", cli_proxy.log)
