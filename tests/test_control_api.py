"""The control API's HTTP side over a real socket, on a fake of the proxy: each Toxiproxy
endpoint's status code and JSON shape, what it asks of the proxy, and bad input refused with
Toxiproxy's status and error body, changing nothing."""

from __future__ import annotations

import stat
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from uproxy_cli._control import ApiError, Control
from uproxy_cli._control_app import control_app
from uproxy_cli._http import serve_http
from uproxy_trio import Address, Direction, Flow, FlowInfo, Forward, Interceptor, Route, Routes


class FakeProxy:
    """The calls the control API makes, recorded; forwards bind nothing."""

    def __init__(self) -> None:
        self.routes: Routes | None = Routes(
            [Route("slow-db", server="198.51.100.0/24", port="5432")]
        )
        self.addresses: list[Address] = [("127.0.0.1", 9091), ("::1", 9091)]
        self.forwards: dict[str, tuple[Forward, Address]] = {}
        self.live: dict[str | None, list[Interceptor]] = {}
        self.enabled: dict[str, bool] = {}
        self.reset: list[int] = []
        self.next_port = 40000

    def set_routes(self, routes: Routes | None) -> None:
        self.routes = routes

    async def add_forward(self, forward: Forward) -> Address:
        if forward.listen[1] == 1:
            raise OSError(13, "cannot listen on 127.0.0.1:1: permission denied")
        port = forward.listen[1] or self.next_port
        self.forwards[forward.name] = (forward, (forward.listen[0], port))
        return self.forwards[forward.name][1]

    async def remove_forward(self, name: str) -> None:
        del self.forwards[name]

    def flows(self) -> list[FlowInfo]:
        flow = Flow(7, ("192.0.2.2", 40000), ("2001:db8::2", 5432))
        return [FlowInfo(flow, "slow-db", ("slow",), 10, 20, 1.5)]

    def reset_flow(self, flow_id: int) -> bool:
        self.reset.append(flow_id)
        return flow_id == 7

    def set_live_interceptors(self, route: str | None, interceptors: Sequence[Interceptor]) -> None:
        self.live[route] = list(interceptors)

    def set_enabled(self, route: str, enabled: bool) -> None:
        self.enabled[route] = enabled


def fake_make_toxic(
    type: str,
    *,
    name: str,
    stream: str,
    toxicity: float,
    attributes: Mapping[str, Any],
    seed: int | None,
) -> Interceptor:
    """A stand-in for uproxy_trio.toxics.make_toxic: checks its one attribute, and names the
    interceptor it makes after what it was asked for."""
    if set(attributes) - {"latency", "jitter"}:
        raise ValueError(f"latency has no attribute {sorted(attributes)[0]!r}")

    async def toxic(
        flow: Flow, direction: Direction, chunks: AsyncIterator[bytes]
    ) -> AsyncIterator[bytes]:
        async for chunk in chunks:
            yield chunk

    toxic.__name__ = f"{name}:{stream}:{dict(attributes)}:{seed}"
    return toxic


def names(interceptors: Sequence[Interceptor]) -> list[str]:
    return [getattr(interceptor, "__name__", "?") for interceptor in interceptors]


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, FakeProxy]]:
    proxy = FakeProxy()
    control = Control(proxy, fake_make_toxic, ("latency",), seed=5)
    socket_path = tmp_path / "control.sock"
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_http, socket_path, control_app(control), "the control API")
        transport = httpx.AsyncHTTPTransport(uds=str(socket_path))
        async with httpx.AsyncClient(transport=transport, base_url="http://uproxy") as client:
            yield client, proxy
        nursery.cancel_scope.cancel()


async def test_a_forward_is_made_shown_and_deleted(
    api: tuple[httpx.AsyncClient, FakeProxy],
) -> None:
    client, proxy = api
    made = await client.post(
        "/proxies", json={"name": "redis", "listen": "localhost:0", "upstream": "127.0.0.1:6379"}
    )
    assert made.status_code == 201
    shown = {
        "name": "redis",
        "listen": "127.0.0.1:40000",
        "upstream": "127.0.0.1:6379",
        "enabled": True,
        "toxics": [],
    }
    assert made.json() == shown
    assert proxy.forwards["redis"][0] == Forward("redis", ("127.0.0.1", 0), ("127.0.0.1", 6379))
    listed = (await client.get("/proxies")).json()
    assert listed["redis"] == shown
    # A route is a proxy too: its server match is its upstream, the transparent listeners
    # its listen.
    assert listed["slow-db"] == {
        "name": "slow-db",
        "listen": "127.0.0.1:9091, [::1]:9091",
        "upstream": "198.51.100.0/24:5432",
        "enabled": True,
        "toxics": [],
    }
    assert (await client.delete("/proxies/redis")).status_code == 204
    assert proxy.forwards == {}
    assert (await client.get("/proxies/redis")).status_code == 404


async def test_toxics_are_pushed_whole_to_the_proxys_live_chain(
    api: tuple[httpx.AsyncClient, FakeProxy],
) -> None:
    client, proxy = api
    latency = {"type": "latency", "attributes": {"latency": 300}}
    added = await client.post("/proxies/slow-db/toxics", json=latency)
    assert added.status_code == 200  # not 201: Toxiproxy's answer
    assert added.json() == {
        "name": "latency_downstream",
        "type": "latency",
        "stream": "downstream",
        "toxicity": 1.0,
        "attributes": {"latency": 300},
    }
    upstream = {**latency, "name": "up", "stream": "upstream", "toxicity": 0.5}
    assert (await client.post("/proxies/slow-db/toxics", json=upstream)).status_code == 200
    assert names(proxy.live["slow-db"]) == [
        "latency_downstream:downstream:{'latency': 300}:5",
        "up:upstream:{'latency': 300}:5",
    ]
    listed = (await client.get("/proxies/slow-db/toxics")).json()
    assert [toxic["name"] for toxic in listed] == ["latency_downstream", "up"]
    assert (await client.get("/proxies/slow-db/toxics/up")).json()["toxicity"] == 0.5

    changed = await client.post("/proxies/slow-db/toxics/up", json={"attributes": {"jitter": 10}})
    assert changed.json()["attributes"] == {"latency": 300, "jitter": 10}
    assert names(proxy.live["slow-db"])[1] == "up:upstream:{'latency': 300, 'jitter': 10}:5"

    assert (await client.delete("/proxies/slow-db/toxics/latency_downstream")).status_code == 204
    assert names(proxy.live["slow-db"]) == ["up:upstream:{'latency': 300, 'jitter': 10}:5"]
    assert (await client.post("/reset")).status_code == 204
    assert proxy.live["slow-db"] == []
    assert (await client.get("/proxies/slow-db")).json()["toxics"] == []


async def test_enabled_false_takes_the_proxy_down_and_reset_brings_it_back(
    api: tuple[httpx.AsyncClient, FakeProxy],
) -> None:
    client, proxy = api
    down = await client.post("/proxies/slow-db", json={"enabled": False})
    assert down.status_code == 200
    assert down.json()["enabled"] is False
    assert proxy.enabled == {"slow-db": False}
    await client.post("/reset")
    assert proxy.enabled == {"slow-db": True}
    assert (await client.get("/proxies/slow-db")).json()["enabled"] is True


async def test_flows_are_listed_and_one_is_reset(
    api: tuple[httpx.AsyncClient, FakeProxy],
) -> None:
    client, proxy = api
    assert (await client.get("/flows")).json() == [
        {
            "id": 7,
            "transport": "tcp",
            "client": "192.0.2.2:40000",
            "server": "[2001:db8::2]:5432",
            "route": "slow-db",
            "interceptors": ["slow"],
            "bytes_client_to_server": 10,
            "bytes_server_to_client": 20,
            "age_s": 1.5,
        }
    ]
    assert (await client.delete("/flows/7")).status_code == 204
    gone = await client.delete("/flows/8")
    assert (gone.status_code, gone.json()) == (404, {"error": "flow not found", "status": 404})
    assert proxy.reset == [7, 8]
    assert (await client.delete("/flows/x")).status_code == 404
    assert (await client.get("/version")).json() == {"version": "0.1.0"}


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "error"),
    [
        ("POST", "/proxies", b"{not json", 400, "bad request body: "),
        ("POST", "/proxies", [1], 400, "bad request body: expected a JSON object"),
        ("POST", "/proxies", {"upstream": "127.0.0.1:1"}, 400, "missing required field: name"),
        ("POST", "/proxies", {"name": "x"}, 400, "missing required field: upstream"),
        (
            "POST",
            "/proxies",
            {"name": "x", "upstream": "db.example:5432"},
            400,
            "bad request body: upstream: 'db.example:5432': 'db.example' is not an IP address",
        ),
        ("POST", "/proxies", {"name": "slow-db", "upstream": "127.0.0.1:1"}, 409, "proxy already"),
        (
            "POST",
            "/proxies",
            {"name": "x", "listen": "127.0.0.1:1", "upstream": "127.0.0.1:2"},
            500,
            "cannot listen on 127.0.0.1:1: permission denied",
        ),
        ("GET", "/proxies/nope", None, 404, "proxy not found"),
        ("DELETE", "/proxies/nope", None, 404, "proxy not found"),
        ("POST", "/proxies/nope/toxics", {"type": "latency"}, 404, "proxy not found"),
        (
            "POST",
            "/proxies/slow-db/toxics",
            {"type": "lag"},
            400,
            "invalid toxic type: 'lag' (known: latency)",
        ),
        ("POST", "/proxies/slow-db/toxics", {}, 400, "invalid toxic type"),
        (
            "POST",
            "/proxies/slow-db/toxics",
            {"type": "latency", "stream": "sideways"},
            400,
            "stream was invalid, can be either upstream or downstream",
        ),
        (
            "POST",
            "/proxies/slow-db/toxics",
            {"type": "latency", "attributes": {"latnecy": 1}},
            400,
            "bad toxic attributes: latency has no attribute 'latnecy'",
        ),
        (
            "POST",
            "/proxies/slow-db/toxics",
            {"type": "latency", "toxicity": 2},
            400,
            "bad request body: toxicity: 2 is not a number from 0 to 1",
        ),
        ("POST", "/proxies/slow-db/toxics", b"[", 400, "bad request body: "),
        ("GET", "/proxies/slow-db/toxics/nope", None, 404, "toxic not found"),
        ("DELETE", "/proxies/slow-db/toxics/nope", None, 404, "toxic not found"),
        ("POST", "/reload", None, 409, "no config file to reload"),
    ],
)
async def test_bad_input_gets_toxiproxys_status_and_error_body_and_changes_nothing(
    api: tuple[httpx.AsyncClient, FakeProxy],
    method: str,
    path: str,
    body: object,
    status: int,
    error: str,
) -> None:
    client, proxy = api
    content = body if isinstance(body, bytes) else None
    payload = None if isinstance(body, bytes) else body
    answer = await client.request(method, path, content=content, json=payload)
    assert answer.status_code == status
    assert answer.headers["content-type"] == "application/json"
    assert answer.json()["status"] == status
    assert answer.json()["error"].startswith(error)
    assert (proxy.live, proxy.enabled, proxy.forwards) == ({}, {}, {})


async def test_a_duplicate_toxic_is_a_conflict_and_the_first_stays(
    api: tuple[httpx.AsyncClient, FakeProxy],
) -> None:
    client, proxy = api
    toxic = {"type": "latency", "name": "slow", "attributes": {"latency": 1}}
    assert (await client.post("/proxies/slow-db/toxics", json=toxic)).status_code == 200
    again = await client.post(
        "/proxies/slow-db/toxics", json={**toxic, "attributes": {"latency": 2}}
    )
    assert again.json() == {"error": "toxic already exists", "status": 409}
    assert names(proxy.live["slow-db"]) == ["slow:downstream:{'latency': 1}:5"]


async def test_browsers_are_refused(api: tuple[httpx.AsyncClient, FakeProxy]) -> None:
    client, _ = api
    answer = await client.get("/proxies", headers={"User-Agent": "Mozilla/5.0 (X11)"})
    assert answer.status_code == 403


async def test_a_unix_socket_is_its_owners_only_and_removed_at_the_end(tmp_path: Path) -> None:
    socket_path = tmp_path / "control.sock"
    async with trio.open_nursery() as nursery:
        await nursery.start(
            serve_http,
            socket_path,
            control_app(Control(FakeProxy(), fake_make_toxic, ())),
            "the control API",
        )
        assert stat.S_IMODE(socket_path.stat().st_mode) == 0o600
        nursery.cancel_scope.cancel()
    assert not socket_path.exists()


async def test_populate_creates_each_proxy_once(api: tuple[httpx.AsyncClient, FakeProxy]) -> None:
    client, proxy = api
    wanted = [
        {"name": "a", "listen": "127.0.0.1:7001", "upstream": "127.0.0.1:7000"},
        {"name": "b", "listen": "127.0.0.1:7002", "upstream": "127.0.0.1:7000"},
    ]
    made = await client.post("/populate", json=wanted)
    assert made.status_code == 201
    assert [shown["name"] for shown in made.json()["proxies"]] == ["a", "b"]
    first = dict(proxy.forwards)
    # The same again changes nothing; a new upstream replaces that forward.
    wanted[1]["upstream"] = "127.0.0.1:7003"
    assert (await client.post("/populate", json=wanted)).status_code == 201
    assert proxy.forwards["a"] is first["a"]
    assert proxy.forwards["b"][0].upstream == ("127.0.0.1", 7003)
    refused = await client.post("/populate", json=[{"name": "c"}])
    assert refused.json() == {"error": "missing required field: upstream at proxy 1", "status": 400}
    assert "c" not in proxy.forwards


def test_a_reload_keeps_the_toxics_of_the_routes_that_stay_and_drops_the_others() -> None:
    proxy = FakeProxy()
    files = iter(
        [
            Routes([Route("slow-db", port=5432), Route("new")]),
            Routes([Route("new")]),
            Routes([Route("slow-db"), Route("new")]),
        ]
    )

    def reload() -> str | None:
        proxy.set_routes(next(files))
        return None

    control = Control(proxy, fake_make_toxic, ("latency",), reload=reload)
    control.add_toxic("slow-db", {"type": "latency", "name": "slow"})
    assert control.reload() == {"routes": 2}
    assert names(proxy.live["slow-db"]) == ["slow:downstream:{}:None"]
    control.reload()  # slow-db goes: its toxic goes too, from the proxy's live chains
    assert proxy.live["slow-db"] == []
    assert list(control.proxies()) == ["new"]
    control.reload()  # and comes back without it
    assert control.proxy("slow-db")["toxics"] == []


def test_a_refused_reload_is_a_400_that_says_why() -> None:
    control = Control(FakeProxy(), fake_make_toxic, (), reload=lambda: "reload refused: no")
    with pytest.raises(ApiError) as refused:
        control.reload()
    assert (refused.value.status, refused.value.message) == (400, "reload refused: no")


async def test_a_forward_moves_to_a_new_listen_or_upstream_with_its_toxics(
    api: tuple[httpx.AsyncClient, FakeProxy],
) -> None:
    client, proxy = api
    body = {"name": "db", "listen": "127.0.0.1:7001", "upstream": "127.0.0.1:7000"}
    await client.post("/proxies", json=body)
    await client.post("/proxies/db/toxics", json={"type": "latency", "name": "slow"})
    moved = await client.post("/proxies/db", json={"upstream": "127.0.0.1:7002"})
    assert moved.status_code == 200
    shown = moved.json()
    assert (shown["listen"], shown["upstream"]) == ("127.0.0.1:7001", "127.0.0.1:7002")
    assert proxy.forwards["db"][0].upstream == ("127.0.0.1", 7002)
    assert [toxic["name"] for toxic in shown["toxics"]] == ["slow"]
    assert names(proxy.live["db"]) == ["slow:downstream:{}:5"]
    # A listen that cannot bind is refused, and the forward stays where it was.
    refused = await client.post("/proxies/db", json={"listen": "127.0.0.1:1"})
    assert refused.status_code == 500
    assert proxy.forwards["db"][1] == ("127.0.0.1", 7001)
    # A route's listen and upstream are the config file's.
    route = await client.post("/proxies/slow-db", json={"upstream": "127.0.0.1:1"})
    assert route.status_code == 400
