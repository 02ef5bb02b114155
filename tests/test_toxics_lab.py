"""Toxics in the whole proxy, in the lab: the proxy runs a toxic on its stream, on the flows its
seeded toxicity picks (the others stay on the plain path), and its timers fire on flows that
send nothing."""

from __future__ import annotations

import socket

import pytest
import trio
from lab_tools import (
    EventLog,
    open_flow,
    recv_exactly,
    recv_until_eof,
    run_library_proxy,
    send_all,
)

from uproxy_netns import SERVER_V4, Lab
from uproxy_trio import FlowClosed
from uproxy_trio._interceptor import wants
from uproxy_trio.toxics import make_toxic

pytestmark = pytest.mark.lab


async def test_the_flows_a_seeded_toxicity_picks_get_the_toxic_on_its_stream_only(
    inside_proxy: Lab,
) -> None:
    toxic = make_toxic(
        "latency", name="lag", stream="upstream", toxicity=0.5, seed=3, attributes={"latency": 300}
    )
    events = EventLog()
    delayed = []
    async with trio.open_nursery() as nursery:
        await nursery.start(run_library_proxy, events, {"interceptors": [toxic]})
        for _ in range(8):
            with trio.fail_after(10):
                async with open_flow(inside_proxy, SERVER_V4) as (client, server, _):
                    started = trio.current_time()
                    await send_all(client, b"ping")
                    assert await recv_exactly(server, 4) == b"ping"
                    upstream_s = trio.current_time() - started
                    started = trio.current_time()
                    await send_all(server, b"pong")
                    assert await recv_exactly(client, 4) == b"pong"
                    assert trio.current_time() - started < 0.3
                    delayed.append(upstream_s >= 0.3)
                    client.shutdown(socket.SHUT_WR)
                    assert await recv_until_eof(server) == b""
                    server.close()
                    assert await recv_until_eof(client) == b""
        closed = await events.wait_for(FlowClosed, count=8)
        nursery.cancel_scope.cancel()
    picked = [wants(toxic, event.flow) for event in closed]
    assert delayed == picked
    assert 0 < sum(picked) < 8, "seed 3 should pick some of the eight flows, not all"
    # The flows it spared never left the plain path.
    assert [event.intercepted for event in closed] == picked


async def test_reset_peer_resets_a_flow_that_sends_nothing(inside_proxy: Lab) -> None:
    toxic = make_toxic("reset_peer", name="rst", stream="upstream", attributes={"timeout": 300})
    events = EventLog()
    async with trio.open_nursery() as nursery:
        await nursery.start(run_library_proxy, events, {"interceptors": [toxic]})
        with trio.fail_after(10):
            async with open_flow(inside_proxy, SERVER_V4) as (client, server, _):
                for side in (client, server):
                    with pytest.raises(ConnectionResetError):
                        await recv_until_eof(side)
            (closed,) = await events.wait_for(FlowClosed)
        nursery.cancel_scope.cancel()
    assert closed.reason == "interceptor_reset"
    assert closed.duration_s >= 0.3
