"""``uproxy serve --workers N``: several processes on one set of addresses, supervised."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest
import trio
from cli_tools import run_uproxy
from lab_tools import (
    CliProxy,
    connect,
    echo_server,
    eventually,
    listen,
    listeners,
    recv_exactly,
    send_all,
)

from uproxy_netns import SERVER_V4, Lab

pytestmark = pytest.mark.lab


def children(pid: int) -> list[int]:
    # Not /proc/PID/task/PID/children: trio starts processes from a helper thread.
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(child) for child in found.stdout.split()]


def gone(pids: list[int]) -> bool:
    return all(not Path(f"/proc/{pid}").exists() for pid in pids)


async def flows_through(lab: Lab, count: int) -> None:
    async def one() -> None:
        client = await connect(lab.client, SERVER_V4, 9090)
        with client:
            await send_all(client, b"hello")
            assert await recv_exactly(client, 5) == b"hello"

    async with trio.open_nursery() as nursery:
        listener = await listen(lab.server, SERVER_V4, 9090)
        await nursery.start(echo_server, listener)
        with trio.fail_after(30):
            async with trio.open_nursery() as clients:
                for _ in range(count):
                    clients.start_soon(one)
        nursery.cancel_scope.cancel()


async def test_two_workers_share_the_flows_and_stop_together(lab: Lab, cli_proxy: CliProxy) -> None:
    cli_proxy.start("--workers", "2")
    await eventually(lambda: listeners(lab.proxy) == 4)  # two per address
    workers = children(cli_proxy.pid)
    assert len(workers) == 2
    await flows_through(lab, 200)
    log = cli_proxy.log
    assert "worker 1/2 uproxy_trio.flow: flow 1 open" in log
    assert "worker 2/2 uproxy_trio.flow: flow 1 open" in log  # the kernel spread them
    assert cli_proxy.stop(signal.SIGTERM) == 0
    assert "SIGTERM received: passing it to 2 workers" in cli_proxy.log
    assert gone(workers)


async def test_a_dead_worker_is_restarted_loudly(lab: Lab, cli_proxy: CliProxy) -> None:
    cli_proxy.start("--workers", "2")
    await eventually(lambda: listeners(lab.proxy) == 4)
    victim = children(cli_proxy.pid)[0]
    subprocess.run(["kill", "-9", str(victim)], check=True)
    cli_proxy.wait_for_log("exited with code -9 on its own")
    cli_proxy.wait_for_log("restarting worker")
    await eventually(lambda: listeners(lab.proxy) == 4 and victim not in children(cli_proxy.pid))
    await flows_through(lab, 50)
    assert cli_proxy.stop() == 0


def test_a_bind_error_is_reported_once(lab: Lab, cli_proxy: CliProxy) -> None:
    cli_proxy.start()
    done = run_uproxy("serve", "--listen", "127.0.0.1:9091", "--workers", "2", namespace=lab.proxy)
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("uproxy: error")]
    assert errors == ["uproxy: error: cannot listen on 127.0.0.1:9091: address already in use"]


@pytest.mark.parametrize("value", ["0", "many", "-1"])
def test_bad_worker_counts_are_usage_errors(value: str) -> None:
    done = run_uproxy("serve", "--workers", value)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"uproxy: error: Invalid value for '--workers': '{value}' is not a number of workers "
        "(1 or more, or auto)"
    ]
