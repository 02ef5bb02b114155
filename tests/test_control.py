"""The control API of a real ``uproxy serve --control``, in the lab's proxy namespace: driven
by Toxiproxy's own Python client, by ``uproxy flows`` and ``uproxy toxic``, and out of reach
of the client and server hosts.

Timings are loose ratios against a baseline measured on the same connection, never tight
bounds: the host is shared.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import statistics
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio
from cli_tools import NO_CAPABILITIES, run_uproxy
from lab_tools import (
    CliProxy,
    connect,
    connect_expecting_reset,
    echo_server,
    eventually,
    listen,
    listeners,
    recv_exactly,
    recv_until_eof,
    send_all,
)
from toxiproxy import Toxiproxy  # type: ignore[import-untyped]

from uproxy_netns import (
    CLIENT_V4,
    PROXY_CLIENT_SIDE_V4,
    PROXY_CLIENT_SIDE_V6,
    PROXY_SERVER_SIDE_V4,
    PROXY_SERVER_SIDE_V6,
    SERVER_V4,
    Lab,
)

pytestmark = pytest.mark.lab

CONTROL_PORT = 8474
CONTROL = f"127.0.0.1:{CONTROL_PORT}"
# In the proxy namespace: an echo server, and the forward listener in front of it.
ECHO = ("127.0.0.1", 7000)
FORWARD = "127.0.0.1:7001"
LATENCY_MS = 200
ROUND_TRIPS = 9


def wait_for_control(lab: Lab, where: str = CONTROL, timeout: float = 10) -> None:
    """The control API comes up just after the listeners that ``CliProxy.start`` waits for."""
    if where.startswith("unix:"):
        transport = httpx.HTTPTransport(uds=where.removeprefix("unix:"))
        url = "http://uproxy/version"
    else:
        transport, url = httpx.HTTPTransport(), f"http://{where}/version"
    deadline = time.monotonic() + timeout
    with lab.proxy.entered(), httpx.Client(transport=transport) as client:
        while True:
            try:
                client.get(url).raise_for_status()
                return
            except httpx.TransportError:
                assert time.monotonic() < deadline, f"no control API at {where}"
                time.sleep(0.05)


@asynccontextmanager
async def echo_upstream(lab: Lab) -> AsyncIterator[None]:
    """An echo server on ``ECHO`` in the proxy namespace, for the forwards to relay to."""
    async with trio.open_nursery() as nursery:
        listener = await listen(lab.proxy, *ECHO)
        await nursery.start(echo_server, listener)
        yield
        nursery.cancel_scope.cancel()


async def round_trip_s(sock: trio.socket.SocketType) -> float:
    """The median time of a few one-byte round trips on ``sock``."""
    times = []
    for _ in range(ROUND_TRIPS):
        started = trio.current_time()
        await send_all(sock, b"x")
        assert await recv_exactly(sock, 1) == b"x"
        times.append(trio.current_time() - started)
    return statistics.median(times)


def host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


async def test_toxiproxys_python_client_adds_latency_to_an_open_connection_and_removes_it(
    inside_proxy: Lab, cli_proxy: CliProxy
) -> None:
    lab = inside_proxy
    cli_proxy.start("--control", CONTROL, "--seed", "1")
    wait_for_control(lab)
    server = Toxiproxy()
    server.update_api_consumer("127.0.0.1", CONTROL_PORT)
    assert server.running()
    async with echo_upstream(lab):
        proxy = server.create(upstream=f"{ECHO[0]}:{ECHO[1]}", name="echo")
        assert proxy.listen.startswith("127.0.0.1:")  # the port the kernel picked
        assert set(server.proxies()) == {"echo"}
        with trio.fail_after(30):
            sock = await connect(lab.proxy, *host_port(proxy.listen))
            with sock:
                before = await round_trip_s(sock)
                # On the connection already open: it moves onto the interceptor path.
                proxy.add_toxic(type="latency", attributes={"latency": LATENCY_MS})
                (toxic,) = proxy.toxics().values()
                assert (toxic.name, toxic.type, toxic.stream) == (
                    "latency_downstream",
                    "latency",
                    "downstream",
                )
                slowed = await round_trip_s(sock)
                proxy.destroy_toxic("latency_downstream")
                after = await round_trip_s(sock)
        assert slowed > before + 0.75 * LATENCY_MS / 1000, (before, slowed)
        assert after < before + 0.25 * LATENCY_MS / 1000, (before, slowed, after)
        assert proxy.toxics() == {}

        # disable() is Toxiproxy's "down": the forward's new connections are reset.
        with proxy.down():
            await connect_expecting_reset(lab.proxy, *host_port(proxy.listen))
        assert proxy.destroy()
        assert server.proxies() == {}


def test_bad_input_from_the_client_gets_toxiproxys_exceptions(
    inside_proxy: Lab, cli_proxy: CliProxy
) -> None:
    from toxiproxy.exceptions import InvalidToxic, NotFound, ProxyExists  # type: ignore[import-untyped]

    lab = inside_proxy
    cli_proxy.start("--control", CONTROL, "--forward", f"{FORWARD}=127.0.0.1:7000")
    wait_for_control(lab)
    server = Toxiproxy()
    server.update_api_consumer("127.0.0.1", CONTROL_PORT)
    proxy = server.get_proxy(FORWARD)
    assert (proxy.listen, proxy.upstream, proxy.enabled) == (FORWARD, "127.0.0.1:7000", True)
    with pytest.raises(InvalidToxic):
        proxy.add_toxic(type="no_such_toxic")
    with pytest.raises(InvalidToxic):
        proxy.add_toxic(type="latency", attributes={"latency": "soon"})
    proxy.add_toxic(type="latency", name="slow", attributes={"latency": 1})
    with pytest.raises(ProxyExists):  # the client's name for every 409
        proxy.add_toxic(type="latency", name="slow", attributes={"latency": 1})
    with pytest.raises(NotFound):
        proxy.destroy_toxic("nope")
    with pytest.raises(ProxyExists):
        server.create(upstream="127.0.0.1:7000", name=FORWARD)
    assert [toxic.name for toxic in proxy.toxics().values()] == ["slow"]
    # Nothing above cost the proxy its life or left a traceback in its log.
    assert cli_proxy.process is not None
    assert cli_proxy.process.poll() is None
    assert "Traceback" not in cli_proxy.log


async def test_flows_and_toxic_commands_against_a_running_serve(
    lab: Lab, cli_proxy: CliProxy, tmp_path: Path
) -> None:
    config = tmp_path / "uproxy.toml"
    config.write_text(SLOW_ROUTE.format(name="r"))
    control = f"unix:{tmp_path / 'control.sock'}"
    cli_proxy.start("--config", str(config), "--control", control)
    wait_for_control(lab, control)
    # Only the user who started the proxy may connect.
    assert stat.S_IMODE(os.stat(tmp_path / "control.sock").st_mode) == 0o600

    def uproxy(*args: str) -> str:
        done = run_uproxy(*args, "--control", control, namespace=lab.proxy)
        assert done.returncode == 0, done.stderr
        return done.stdout

    async with trio.open_nursery() as nursery:
        listener = await listen(lab.server, SERVER_V4, 9090)
        await nursery.start(echo_server, listener)
        with trio.fail_after(30), await connect(lab.client, SERVER_V4, 9090) as sock:
            await send_all(sock, b"hello")
            assert await recv_exactly(sock, 5) == b"hello"
            (flow,) = json.loads(uproxy("flows", "--json"))
            assert flow["route"] == "r"
            assert flow["client"] == f"{CLIENT_V4}:{sock.getsockname()[1]}"
            assert flow["server"] == f"{SERVER_V4}:9090"
            assert flow["bytes_client_to_server"] == flow["bytes_server_to_client"] == 5
            assert flow["interceptors"] == []
            header, row = uproxy("flows").splitlines()
            assert header.split()[:5] == ["ID", "TRANSPORT", "CLIENT", "SERVER", "ROUTE"]
            assert row.split()[:5] == [str(flow["id"]), "tcp", flow["client"], flow["server"], "r"]

            latency = ("-t", "latency", "-n", "slow", "-a", "latency=5")
            added = uproxy("toxic", "add", *latency, "r")
            assert added.strip() == "Added downstream latency toxic 'slow' on proxy 'r'"
            listed = uproxy("toxic", "list", "r")
            assert "slow  latency  downstream  toxicity=1.0  latency=5" in listed
            (flow,) = json.loads(uproxy("flows", "--json"))
            assert flow["interceptors"] == ["slow"]
            uproxy("toxic", "update", "-n", "slow", "-a", "latency=6", "r")
            assert "latency=6" in uproxy("toxic", "list")
            await send_all(sock, b"still")
            assert await recv_exactly(sock, 5) == b"still"
            uproxy("toxic", "remove", "-n", "slow", "r")
            assert "no toxics" in uproxy("toxic", "list", "r")
            uproxy("toxic", "add", *latency, "r")
            uproxy("toxic", "delete", "-n", "slow", "r")  # toxiproxy-cli's word for it
            assert "no toxics" in uproxy("toxic", "list", "r")

            assert uproxy("flows", "kill", str(flow["id"])).strip() == f"flow {flow['id']} reset"
            with pytest.raises(ConnectionResetError):
                await recv_until_eof(sock)
        nursery.cancel_scope.cancel()
    await eventually(lambda: uproxy("flows").strip() == "no flows in flight")
    assert "reason=reset_requested" in cli_proxy.log


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("flows",), "cannot reach the control API at 127.0.0.1:1: connection refused"),
        (("flows", "kill", "1"), "cannot reach the control API at 127.0.0.1:1: "),
        (("toxic", "list"), "cannot reach the control API at 127.0.0.1:1: "),
    ],
)
def test_a_control_api_that_is_not_there_is_one_line(
    lab: Lab, args: tuple[str, ...], message: str
) -> None:
    done = run_uproxy(*args, "--control", "127.0.0.1:1", namespace=lab.proxy)
    assert done.returncode == 1
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"uproxy: error: {message}")


def test_a_toxic_the_server_refuses_is_one_line(lab: Lab, cli_proxy: CliProxy) -> None:
    cli_proxy.start("--control", CONTROL)
    wait_for_control(lab)
    done = run_uproxy(
        "toxic", "add", "-t", "latency", "nowhere", "--control", CONTROL, namespace=lab.proxy
    )
    assert (done.returncode, done.stderr) == (1, "uproxy: error: proxy not found (404)\n")
    done = run_uproxy("toxic", "add", "-t", "latency", "-a", "latency", "x", namespace=lab.proxy)
    assert done.returncode == 2
    assert done.stderr == "uproxy: error: --attribute 'latency': expected KEY=VALUE\n"


def test_control_with_workers_is_refused_in_one_line(lab: Lab, cli_proxy: CliProxy) -> None:
    with pytest.raises(AssertionError, match="exited 2"):
        cli_proxy.start("--control", CONTROL, "--workers", "2")
    assert "--control works with one worker only" in cli_proxy.log


def test_metrics_are_served_by_the_control_api_too(lab: Lab, cli_proxy: CliProxy) -> None:
    cli_proxy.start("--control", CONTROL)
    wait_for_control(lab)
    with lab.proxy.entered():
        scraped = httpx.get(f"http://{CONTROL}/metrics", timeout=10)
    assert scraped.status_code == 200
    assert "uproxy_flows_active 0.0" in scraped.text


@pytest.mark.parametrize(
    ("namespace", "addresses"),
    [
        ("client", (PROXY_CLIENT_SIDE_V4, PROXY_CLIENT_SIDE_V6)),
        ("server", (PROXY_SERVER_SIDE_V4, PROXY_SERVER_SIDE_V6)),
    ],
)
async def test_the_control_api_is_out_of_reach_of_the_client_and_the_server(
    lab: Lab, cli_proxy: CliProxy, namespace: str, addresses: tuple[str, ...]
) -> None:
    cli_proxy.start("--control", CONTROL)
    wait_for_control(lab)
    host = lab.client if namespace == "client" else lab.server
    for address in addresses:
        with trio.fail_after(10), pytest.raises(ConnectionRefusedError):
            await connect(host, address, CONTROL_PORT)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--forward", "nonsense"], "'nonsense': expected LISTEN=UPSTREAM"),
        (["--forward", "127.0.0.1:7001=db:5432"], "'db:5432': 'db' is not an IP address"),
        (
            ["--forward", f"{FORWARD}=127.0.0.1:1", "--forward", f"{FORWARD}=127.0.0.1:2"],
            f"two forwards or routes are named '{FORWARD}'",
        ),
        (["--control", "nowhere"], "Invalid value for '--control'"),
        (["--seed", "x"], "Invalid value for '--seed'"),
    ],
)
def test_bad_control_options_are_usage_errors(
    lab: Lab, cli_proxy: CliProxy, args: list[str], message: str
) -> None:
    with pytest.raises(AssertionError, match="exited 2"):
        cli_proxy.start(*args)
    assert message in cli_proxy.log
    assert "Traceback" not in cli_proxy.log


def api(lab: Lab, method: str, path: str, body: object = None) -> httpx.Response:
    """One call to the control API on ``CONTROL``, from the proxy namespace."""
    with lab.proxy.entered(), httpx.Client(base_url=f"http://{CONTROL}", timeout=10) as client:
        return client.request(method, path, json=body)


SLOW_ROUTE = """
[[routes]]
name = "{name}"
port = 9090
"""


async def test_a_toxic_on_a_route_slows_a_transparent_flow_in_flight_and_survives_a_reload(
    lab: Lab, cli_proxy: CliProxy, tmp_path: Path
) -> None:
    config = tmp_path / "uproxy.toml"
    config.write_text(SLOW_ROUTE.format(name="slow"))
    cli_proxy.start("--config", str(config), "--control", CONTROL)
    wait_for_control(lab)
    shown = api(lab, "GET", "/proxies/slow").json()
    assert shown["upstream"] == "*:9090"
    assert shown["listen"] == "127.0.0.1:9091, [::1]:9091"
    async with trio.open_nursery() as nursery:
        listener = await listen(lab.server, SERVER_V4, 9090)
        await nursery.start(echo_server, listener)
        with trio.fail_after(30), await connect(lab.client, SERVER_V4, 9090) as client:
            before = await round_trip_s(client)
            toxic = {"type": "latency", "stream": "upstream", "attributes": {"latency": LATENCY_MS}}
            assert api(lab, "POST", "/proxies/slow/toxics", toxic).status_code == 200
            slowed = await round_trip_s(client)

            # A reload that keeps the route keeps its toxic, on this flow and new ones.
            config.write_text(SLOW_ROUTE.format(name="slow") + SLOW_ROUTE.format(name="other"))
            assert api(lab, "POST", "/reload").json() == {"routes": 2}
            assert [t["name"] for t in api(lab, "GET", "/proxies/slow/toxics").json()] == [
                "latency_upstream"
            ]
            assert await round_trip_s(client) > before + 0.75 * LATENCY_MS / 1000
            # A file that does not load is refused, and says why.
            config.write_text("[[routes]]\nport = 1\n")
            refused = api(lab, "POST", "/reload")
            assert refused.status_code == 400
            assert "reload refused, the 2 routes in use stay" in refused.json()["error"]

            assert api(lab, "DELETE", "/proxies/slow/toxics/latency_upstream").status_code == 204
            after = await round_trip_s(client)
        nursery.cancel_scope.cancel()
    assert slowed > before + 0.75 * LATENCY_MS / 1000, (before, slowed)
    assert after < before + 0.25 * LATENCY_MS / 1000, (before, slowed, after)
    assert cli_proxy.stop() == 0


async def test_forwards_and_the_api_need_no_capability_and_no_transparent_listener(
    inside_proxy: Lab, cli_proxy: CliProxy
) -> None:
    lab = inside_proxy
    forward = ("--forward", f"{FORWARD}=127.0.0.1:7000")
    cli_proxy.start("--control", CONTROL, *forward, listen=(), wrap=NO_CAPABILITIES)
    wait_for_control(lab)
    assert listeners(lab.proxy) == 0  # nothing on the TPROXY port
    async with echo_upstream(lab):
        with trio.fail_after(20), await connect(lab.proxy, *host_port(FORWARD)) as sock:
            await send_all(sock, b"hello")
            assert await recv_exactly(sock, 5) == b"hello"
        # Toxiproxy's way: a proxy made over the API, on a port the kernel picks.
        made = api(lab, "POST", "/proxies", {"name": "made", "upstream": "127.0.0.1:7000"})
        assert made.status_code == 201
        made_at = host_port(made.json()["listen"])
        with trio.fail_after(20), await connect(lab.proxy, *made_at) as sock:
            await send_all(sock, b"again")
            assert await recv_exactly(sock, 5) == b"again"
    assert cli_proxy.stop() == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("--control", "127.0.0.1:7001"),
            "cannot serve the control API on 127.0.0.1:7001: address already in use",
        ),
        (
            ("--forward", f"{FORWARD}=127.0.0.1:7000"),
            f"cannot listen on {FORWARD}: address already in use",
        ),
    ],
)
def test_an_address_in_use_is_one_line_that_names_it(
    lab: Lab, args: tuple[str, ...], message: str
) -> None:
    taken = lab.proxy.socket(socket.AF_INET)
    with taken:
        taken.bind(host_port(FORWARD))
        taken.listen()
        done = run_uproxy("serve", *args, namespace=lab.proxy, timeout=60)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [f"uproxy: error: {message}"]


SHOUT = """
from uproxy_trio.toxics import toxic_type


@toxic_type("shout")
def shout():
    async def shouting(flow, direction, chunks):
        async for chunk in chunks:
            yield chunk.upper()

    return shouting
"""


async def test_a_toxic_type_of_ones_own_is_added_by_name(
    inside_proxy: Lab, cli_proxy: CliProxy, tmp_path: Path
) -> None:
    lab = inside_proxy
    (tmp_path / "my_toxics.py").write_text(SHOUT)
    forward = ("--forward", f"{FORWARD}=127.0.0.1:7000")
    own = ("--toxic-type", f"{tmp_path}/my_toxics.py:shout")
    cli_proxy.start("--control", CONTROL, *forward, *own)
    wait_for_control(lab)
    async with echo_upstream(lab):
        with trio.fail_after(20), await connect(lab.proxy, *host_port(FORWARD)) as sock:
            await send_all(sock, b"quiet")
            assert await recv_exactly(sock, 5) == b"quiet"
            added = api(lab, "POST", f"/proxies/{FORWARD}/toxics", {"type": "shout"})
            assert added.json()["name"] == "shout_downstream"
            await send_all(sock, b"quiet")
            assert await recv_exactly(sock, 5) == b"QUIET"


def test_a_toxic_type_spec_that_is_not_one_is_a_usage_error(lab: Lab, cli_proxy: CliProxy) -> None:
    with pytest.raises(AssertionError, match="exited 2"):
        cli_proxy.start("--control", CONTROL, "--toxic-type", "uproxy_trio.interceptors:label")
    assert "is not a toxic type (mark it @uproxy_trio.toxics.toxic_type(name))" in cli_proxy.log


def test_the_clients_find_the_api_at_uproxy_control_else_at_toxiproxys_port(lab: Lab) -> None:
    env = {**os.environ, "UPROXY_CONTROL": "127.0.0.1:2"}
    done = run_uproxy("flows", namespace=lab.proxy, env=env)
    assert done.stderr.startswith("uproxy: error: cannot reach the control API at 127.0.0.1:2:")
    env.pop("UPROXY_CONTROL")
    done = run_uproxy("toxic", "list", namespace=lab.proxy, env=env)
    assert done.stderr.startswith("uproxy: error: cannot reach the control API at 127.0.0.1:8474")
    done = run_uproxy("flows", "--control", "unix:/nonexistent/uproxy.sock", namespace=lab.proxy)
    assert done.stderr == (
        "uproxy: error: cannot reach the control API at unix:/nonexistent/uproxy.sock: "
        "no such file or directory\n"
    )
