"""What an operator watches: Prometheus metrics (one process and --workers) and JSON logs."""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path

import pytest
import trio
from cli_tools import run_uproxy
from lab_tools import (
    CliProxy,
    connect,
    connect_expecting_reset,
    echo_server,
    eventually,
    eventually_async,
    listen,
    listeners,
    open_flow,
    recv_exactly,
    recv_until_eof,
    send_all,
)

from uproxy_netns import SERVER_V4, Lab

pytestmark = pytest.mark.lab

METRICS_PORT = 9200


async def scrape(lab: Lab, path: str = "/metrics") -> str:
    sock = trio.socket.from_stdlib_socket(lab.proxy.socket(socket.AF_INET))
    with sock:
        await sock.connect(("127.0.0.1", METRICS_PORT))
        request = f"GET {path} HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n\r\n"
        await send_all(sock, request.encode())
        return (await recv_until_eof(sock)).decode()


def value(text: str, sample: str) -> float:
    """The value of one sample line, e.g. ``uproxy_bytes_total{direction="client_to_server"}``."""
    for line in text.splitlines():
        name, _, number = line.rpartition(" ")
        if name == sample:
            return float(number)
    raise AssertionError(f"{sample} not in the metrics:\n{text}")


async def one_of_each(lab: Lab) -> int:
    """A bulk flow, a short one and a refused one; returns the bulk size."""
    size = 1 << 20
    async with trio.open_nursery() as nursery:
        listener = await listen(lab.server, SERVER_V4, 9090)
        await nursery.start(echo_server, listener)
        with trio.fail_after(20):
            for payload in (bytes(size), b"short"):
                client = await connect(lab.client, SERVER_V4, 9090)
                with client:
                    await send_all(client, payload)
                    client.shutdown(socket.SHUT_WR)
                    assert await recv_until_eof(client, limit=size) == payload
            await connect_expecting_reset(lab.client, SERVER_V4, 9092)
        nursery.cancel_scope.cancel()
    return size


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_metrics_count_flows_bytes_failures_and_durations(
    lab: Lab, cli_proxy: CliProxy, workers: str
) -> None:
    cli_proxy.start("--metrics", f"127.0.0.1:{METRICS_PORT}", "--workers", workers)
    with trio.fail_after(20):
        before = await scrape(lab)
        assert value(before, "uproxy_flows_total") == 0
        assert value(before, "uproxy_flows_active") == 0

        # While a flow is open it is active, and its bytes count before it ends.
        async with trio.open_nursery() as nursery:
            listener = await listen(lab.server, SERVER_V4, 9090)
            await nursery.start(echo_server, listener)
            held = await connect(lab.client, SERVER_V4, 9090)
            await send_all(held, b"x" * 1000)
            await recv_exactly(held, 1000)

            async def shows_the_open_flow() -> bool:
                text = await scrape(lab)
                return value(text, "uproxy_flows_active") == 1 and (
                    value(text, 'uproxy_bytes_total{direction="client_to_server"}') == 1000
                )

            await eventually_async(shows_the_open_flow)
            held.close()
            nursery.cancel_scope.cancel()

        size = await one_of_each(lab)

        async def shows_everything() -> bool:
            text = await scrape(lab)
            # Bytes and the active gauge are sampled twice a second: wait for the sample. A
            # flow's close is counted just after its client saw it end, so its sample may
            # not be there yet either.
            if 'uproxy_flows_closed_total{reason="upstream_refused"}' not in text:
                return False
            return (
                value(text, 'uproxy_flows_closed_total{reason="upstream_refused"}') == 1
                and value(text, "uproxy_flow_duration_seconds_count") == 4
                and value(text, "uproxy_flows_active") == 0
                and all(
                    value(text, f'uproxy_bytes_total{{direction="{direction}"}}') == 1000 + size + 5
                    for direction in ("client_to_server", "server_to_client")
                )
            )

        await eventually_async(shows_everything)
        text = await scrape(lab)
    assert value(text, "uproxy_flows_total") == 4
    assert value(text, "uproxy_flows_active") == 0
    assert value(text, 'uproxy_connect_failures_total{reason="refused"}') == 1
    for direction in ("client_to_server", "server_to_client"):
        assert value(text, f'uproxy_bytes_total{{direction="{direction}"}}') == 1000 + size + 5
    assert value(text, 'uproxy_flows_closed_total{reason="closed"}') == 3
    assert "HTTP/1.1 404" in await scrape(lab, "/other")
    assert cli_proxy.stop() == 0


async def test_json_logs_are_one_object_per_line(lab: Lab, cli_proxy: CliProxy) -> None:
    cli_proxy.start("--log-format", "json")
    size = await one_of_each(lab)
    assert cli_proxy.stop() == 0
    entries = [json.loads(line) for line in cli_proxy.log.splitlines()]  # all of them JSON
    closes = [entry for entry in entries if entry.get("event") == "flow_close"]
    assert [entry["reason"] for entry in closes] == ["closed", "closed", "upstream_refused"]
    bulk = closes[0]
    assert re.fullmatch(r"192\.0\.2\.2:\d+", bulk["client"])
    assert bulk["server"] == "198.51.100.2:9090"
    assert bulk["bytes_client_to_server"] == bulk["bytes_server_to_client"] == size
    assert isinstance(bulk["duration_s"], float)
    assert [entry["intercepted"] for entry in closes] == [False] * 3
    assert {entry["level"] for entry in entries} <= {"info", "warning"}
    failed = next(entry for entry in entries if entry.get("event") == "upstream_failed")
    assert failed["reason"] == "refused"
    assert failed["detail"].startswith("cannot connect to 198.51.100.2:9092: econnrefused")
    # By default the steps of a flow's life are not logged; its close and failures are.
    events = {entry["event"] for entry in entries if "event" in entry}
    assert events == {"flow_close", "upstream_failed"}


async def test_json_flow_close_says_interceptors_ran(lab: Lab, cli_proxy: CliProxy) -> None:
    cli_proxy.start("--log-format", "json", "--interceptor", "uproxy_netns.interceptors:identity")
    await one_flow(lab, b"short")
    assert cli_proxy.stop() == 0
    entries = [json.loads(line) for line in cli_proxy.log.splitlines()]
    (closed,) = [entry for entry in entries if entry.get("event") == "flow_close"]
    assert closed["bytes_client_to_server"] == 5
    assert closed["intercepted"] is True


async def one_flow(lab: Lab, payload: bytes) -> None:
    """One echoed flow through the proxy, closed cleanly by the client first."""
    async with trio.open_nursery() as nursery:
        listener = await listen(lab.server, SERVER_V4, 9090)
        await nursery.start(echo_server, listener)
        with trio.fail_after(20):
            client = await connect(lab.client, SERVER_V4, 9090)
            with client:
                await send_all(client, payload)
                client.shutdown(socket.SHUT_WR)
                assert await recv_until_eof(client) == payload
        nursery.cancel_scope.cancel()


def flow_lines(log: str) -> list[str]:
    """The lines of the ``uproxy_trio.flow`` logger, from ``LEVEL`` on."""
    marker = " uproxy_trio.flow: "
    return [line.split(" ", 2)[2] for line in log.splitlines() if marker in line]


# The default access-log line: who, where to, how it ended, bytes each way, how long, and
# whether interceptors ran.
CLOSE_LINE = (
    r"INFO uproxy_trio\.flow: flow (?P<flow>\d+) close reason=(?P<reason>\w+) "
    r"client=192\.0\.2\.2:\d+ server=198\.51\.100\.2:(?P<port>\d+) first=(?P<first>\w+|-) "
    r"client_to_server=(?P<up>\d+) server_to_client=(?P<down>\d+) duration=\d+\.\d{3}s "
    r"intercepted=false"
)


async def test_by_default_a_flow_is_one_line_written_at_its_close(
    lab: Lab, cli_proxy: CliProxy
) -> None:
    cli_proxy.start()
    size = await one_of_each(lab)
    assert cli_proxy.stop() == 0
    lines = flow_lines(cli_proxy.log)
    # Three flows, three lines at their close; the refused upstream adds its warning.
    assert len(lines) == 4, "\n".join(lines)
    assert re.fullmatch(
        r"WARNING uproxy_trio\.flow: flow 3 upstream 198\.51\.100\.2:9092 failed: refused: "
        r"cannot connect to 198\.51\.100\.2:9092: econnrefused \(Connection refused\); "
        r"resetting client",
        lines[2],
    )
    closes = [re.fullmatch(CLOSE_LINE, line) for line in (lines[0], lines[1], lines[3])]
    assert all(closes), "\n".join(lines)
    figures = [
        (m["flow"], m["reason"], m["port"], m["first"], int(m["up"]), int(m["down"]))
        for m in closes
        if m is not None
    ]
    assert figures == [
        ("1", "closed", "9090", "client", size, size),
        ("2", "closed", "9090", "client", 5, 5),
        ("3", "upstream_refused", "9092", "-", 0, 0),
    ]


async def test_at_debug_the_steps_of_a_flow_are_logged_too(lab: Lab, cli_proxy: CliProxy) -> None:
    cli_proxy.start("--log-level", "debug")
    await one_flow(lab, b"short")
    assert cli_proxy.stop() == 0
    lines = flow_lines(cli_proxy.log)
    assert len(lines) == 5, "\n".join(lines)
    assert re.fullmatch(
        r"DEBUG uproxy_trio\.flow: flow 1 open client=192\.0\.2\.2:\d+ "
        r"server=198\.51\.100\.2:9090",
        lines[0],
    )
    assert re.fullmatch(r"DEBUG uproxy_trio\.flow: flow 1 upstream connected in [\d.]+s", lines[1])
    # The client's FIN goes first; the echo server's follows it.
    assert lines[2:4] == [
        "DEBUG uproxy_trio.flow: flow 1 client closed its side",
        "DEBUG uproxy_trio.flow: flow 1 server closed its side",
    ]
    assert re.fullmatch(CLOSE_LINE, lines[4])


EXPLODE = """
async def explode(flow, direction, chunks):
    async for chunk in chunks:
        1 / 0
        yield chunk
"""


async def test_json_logs_name_the_worker_and_carry_the_traceback(
    lab: Lab, cli_proxy: CliProxy, tmp_path: Path
) -> None:
    interceptor = tmp_path / "explode.py"
    interceptor.write_text(EXPLODE)
    cli_proxy.start("--log-format", "json", "--workers", "2", "-i", f"{interceptor}:explode")
    await eventually(lambda: listeners(lab.proxy) == 4)
    with trio.fail_after(20):
        async with open_flow(lab, SERVER_V4) as (client, server, _):
            await send_all(client, b"boom")
            for side in (client, server):  # the flow is reset on both sides
                with pytest.raises(ConnectionResetError):
                    await recv_until_eof(side)
    assert cli_proxy.stop() == 0
    entries = [json.loads(line) for line in cli_proxy.log.splitlines()]  # all of them JSON
    # Each worker's lines say which worker wrote them; the supervisor's say nothing.
    assert {entry.get("worker") for entry in entries} == {"worker 1/2", "worker 2/2", None}
    assert all("worker" not in entry for entry in entries if entry["logger"] == "uproxy.workers")
    (failed,) = [entry for entry in entries if entry.get("event") == "interceptor_failed"]
    assert failed["worker"] in {"worker 1/2", "worker 2/2"}
    assert failed["error"] == "ZeroDivisionError: division by zero"
    assert failed["traceback"].startswith("Traceback (most recent call last):")
    assert failed["traceback"].rstrip().endswith("ZeroDivisionError: division by zero")
    assert "1 / 0" in failed["traceback"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--metrics", "nowhere"], "Invalid value for '--metrics'"),
        (["--log-format", "xml"], "'xml' is not one of text, json"),
    ],
)
def test_bad_observability_options_are_usage_errors(
    lab: Lab, cli_proxy: CliProxy, args: list[str], message: str
) -> None:
    with pytest.raises(AssertionError, match="exited 2"):
        cli_proxy.start(*args)
    assert message in cli_proxy.log


@pytest.mark.parametrize("workers", ["1", "2"])
def test_metrics_on_an_address_in_use_fail_in_one_line_that_names_it(
    lab: Lab, workers: str
) -> None:
    taken = lab.proxy.socket(socket.AF_INET)
    with taken:
        # Scrapes by the tests above may have left the port in TIME_WAIT.
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", METRICS_PORT))
        taken.listen()
        done = run_uproxy(
            *("serve", "--metrics", f"127.0.0.1:{METRICS_PORT}", "--workers", workers),
            namespace=lab.proxy,
            timeout=60,
        )
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"uproxy: error: cannot serve metrics on 127.0.0.1:{METRICS_PORT}: address already in use"
    ]
