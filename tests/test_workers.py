"""``uproxy serve --workers N``: several processes on one set of addresses, supervised."""

from __future__ import annotations

import os
import re
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
    open_flow,
    recv_exactly,
    recv_until_eof,
    send_all,
    waiting_to_be_accepted,
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
    assert cli_proxy.stop(signal.SIGTERM) == 0
    log = cli_proxy.log
    # Each flow's line is written at its close, which the drain waited for.
    assert "worker 1/2 uproxy_trio.flow: flow 1 close" in log
    assert "worker 2/2 uproxy_trio.flow: flow 1 close" in log  # the kernel spread them
    assert "SIGTERM received: passing it to 2 workers" in log
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


async def both_workers_serving(lab: Lab, proxy: CliProxy) -> list[int]:
    """Wait until two workers run and both listen; return their pids."""
    await eventually(lambda: listeners(lab.proxy) == 4 and len(children(proxy.pid)) == 2)
    return children(proxy.pid)


async def test_more_than_five_deaths_in_a_minute_stop_the_proxy(
    lab: Lab, cli_proxy: CliProxy
) -> None:
    cli_proxy.start("--workers", "2")
    # The README's promise: up to five deaths within a minute are restarted...
    for death in range(1, 6):
        victim = (await both_workers_serving(lab, cli_proxy))[0]
        os.kill(victim, signal.SIGKILL)
        await eventually(lambda: cli_proxy.log.count("restarting worker") == death)  # noqa: B023
    workers = await both_workers_serving(lab, cli_proxy)
    # ...and the sixth stops the whole proxy, the other worker too, with exit code 1.
    os.kill(workers[0], signal.SIGKILL)
    assert cli_proxy.wait_exit() == 1
    assert cli_proxy.log.count("restarting worker") == 5
    assert "workers died 6 times within 60.0s: stopping all of them" in cli_proxy.log
    assert gone(workers)


async def test_the_exit_code_is_the_worst_of_the_workers(lab: Lab, cli_proxy: CliProxy) -> None:
    cli_proxy.start("--workers", "2", "--grace", "0.5")
    await both_workers_serving(lab, cli_proxy)
    with trio.fail_after(20):
        async with open_flow(lab, SERVER_V4) as (client, server, _):
            await send_all(client, b"x")
            assert await recv_exactly(server, 1) == b"x"
            cli_proxy.send(signal.SIGTERM)
            # The worker with the flow resets it after the grace period (its exit code 1);
            # the other has nothing to drain (0).
            with pytest.raises(ConnectionResetError):
                await recv_until_eof(client)
    assert cli_proxy.wait_exit() == 1
    assert cli_proxy.log.count("stopped; 1 flows were reset") == 1
    assert cli_proxy.log.count("stopped; every flow finished") == 1


@pytest.mark.parametrize("cpus", ["0", "0,1"])
async def test_auto_starts_one_worker_per_cpu_it_may_run_on(
    lab: Lab, cli_proxy: CliProxy, cpus: str
) -> None:
    allowed = {int(cpu) for cpu in cpus.split(",")}
    if not allowed <= os.sched_getaffinity(0):
        pytest.skip(f"this machine does not offer CPUs {cpus}")
    cli_proxy.start("--workers", "auto", wrap=["taskset", "-c", cpus])
    if len(allowed) == 1:  # one process, no supervisor
        assert children(cli_proxy.pid) == []
        assert listeners(lab.proxy) == 2
    else:
        await both_workers_serving(lab, cli_proxy)
        cli_proxy.wait_for_log("2 workers ready")
    await flows_through(lab, 10)
    assert cli_proxy.stop() == 0


# A flow opened, in a worker's log line: the worker's number.
OPENED_BY_WORKER = re.compile(r"worker (\d+)/\d+ uproxy_trio\.flow: flow \d+ open")


async def test_max_flows_is_shared_out_between_the_workers(lab: Lab, cli_proxy: CliProxy) -> None:
    # At debug each flow logs its opening, with the worker that took it.
    cli_proxy.start("--workers", "2", "--max-flows", "2", "--log-level", "debug")
    await both_workers_serving(lab, cli_proxy)
    served: dict[int, trio.socket.SocketType] = {}  # by the client's port
    finishing = False

    async def serve(listener: trio.socket.SocketType) -> None:
        while True:
            sock, peer = await listener.accept()
            served[peer[1]] = sock
            if finishing:
                sock.close()

    with await listen(lab.server, SERVER_V4, 9090) as listener:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve, listener)
            with trio.fail_after(20):
                # Six: however the kernel spreads them, one worker gets three or more.
                clients = {}
                for _ in range(6):
                    client = await connect(lab.client, SERVER_V4, 9090)
                    clients[client.getsockname()[1]] = client
                await eventually(lambda: len(served) + waiting_to_be_accepted(lab.proxy) == 6)
                # Bytes through each flow served: its worker has run since all six came.
                for port, server in served.items():
                    await send_all(clients[port], b"hi")
                    assert await recv_exactly(server, 2) == b"hi"
                assert len(served) + waiting_to_be_accepted(lab.proxy) == 6
                # Each worker took one flow at most: two in all, the limit given.
                opened = OPENED_BY_WORKER.findall(cli_proxy.log)
                assert max(opened.count(worker) for worker in ("1", "2")) == 1
                assert len(opened) == len(served) <= 2

                # Every connection becomes a flow and ends, so none is in flight at the stop.
                finishing = True
                for sock in [*clients.values(), *served.values()]:
                    sock.close()
                await eventually(lambda: cli_proxy.log.count("close reason=closed") == 6)
            nursery.cancel_scope.cancel()
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


def test_a_signal_while_a_worker_starts_reaches_it_too(lab: Lab, cli_proxy: CliProxy) -> None:
    # Ready means the first worker's listeners; the second one is still starting then.
    cli_proxy.start("--workers", "2")
    cli_proxy.send(signal.SIGTERM)
    assert cli_proxy.wait_exit(timeout=15) == 0
    assert lab.proxy.pids() == []
