"""Toxiproxy's toxics as interceptors: each one's effect on real sockets in both streams, the
bytes intact wherever a toxic does not cut them, and ``make_toxic``'s checks, marks, toxicity
and seeding.

The socket tests run the proxy's own relay over loopback TCP (``relay_tools``), each
direction's chain built as the proxy builds it (``chain_for``, then ``wants`` per flow), and
measure with loose bounds only: a toxic must add at least its time, and not many times more.
"""

from __future__ import annotations

import itertools
import random
import re
import socket
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from relay_tools import FLOW, LoopbackFlow, loopback_flows, pattern, read_to_eof, relayed, write_all

from uproxy_cli._spec import SpecError, load_interceptor
from uproxy_trio import CloseFlow, Direction, Flow, Interceptor, directions, for_flows
from uproxy_trio._interceptor import chain_for, picks_flows, run_chain, wants
from uproxy_trio._toxics import slice_bounds
from uproxy_trio.toxics import (
    TOXICS,
    FlowRandom,
    bandwidth,
    latency,
    make_toxic,
    toxic_type,
    toxic_type_name,
    toxic_types,
)

STREAMS = ["upstream", "downstream"]
C2S, S2C = Direction.CLIENT_TO_SERVER, Direction.SERVER_TO_CLIENT


def chains(*interceptors: Interceptor, flow: Flow = FLOW) -> dict[Direction, Sequence[Interceptor]]:
    """Each direction's chain for ``flow``, as the proxy builds it from the marks."""
    return {
        direction: tuple(i for i in chain_for(interceptors, direction) if wants(i, flow))
        for direction in Direction
    }


def toxic_ends(flow: LoopbackFlow, stream: str) -> tuple[socket.socket, socket.socket]:
    """``(source, sink)`` of the toxic's stream: upstream is what the client sends."""
    return (flow.client, flow.server) if stream == "upstream" else (flow.server, flow.client)


def other_ends(flow: LoopbackFlow, stream: str) -> tuple[socket.socket, socket.socket]:
    source, sink = toxic_ends(flow, stream)
    return sink, source


async def recv_some(sock: socket.socket) -> bytes:
    while True:
        try:
            return sock.recv(65536)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)


async def recv_exactly(sock: socket.socket, size: int) -> bytes:
    received = bytearray()
    while len(received) < size:
        data = await recv_some(sock)
        assert data, f"EOF after {len(received)} of {size} bytes"
        received += data
    return bytes(received)


async def read_until_reset(sock: socket.socket) -> bytes:
    """What arrives before the connection is reset; fails if it ends any other way."""
    received = bytearray()
    try:
        while data := await recv_some(sock):
            received += data
    except ConnectionResetError:
        return bytes(received)
    pytest.fail(f"a clean EOF after {len(received)} bytes, where a reset was expected")


async def read_to_end(sock: socket.socket) -> bytes | None:
    """What arrives before EOF, or ``None`` if the connection was reset."""
    try:
        return await read_to_eof(sock)
    except ConnectionResetError:
        return None


def nothing_waiting(sock: socket.socket) -> bool:
    try:
        sock.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return True
    return False


async def round_trip(source: socket.socket, sink: socket.socket, data: bytes) -> float:
    """Seconds from writing ``data`` at ``source`` to having it all at ``sink``."""
    started = trio.current_time()
    await write_all(source, data)
    assert await recv_exactly(sink, len(data)) == data
    return trio.current_time() - started


# -- latency ------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", STREAMS)
async def test_latency_delays_its_stream_only_and_keeps_every_byte(stream: str) -> None:
    toxic = make_toxic("latency", name="lag", stream=stream, attributes={"latency": 400})
    with loopback_flows(1) as (flow,):
        async with relayed(flow, chains=chains(toxic)):
            with trio.fail_after(30):
                source, sink = toxic_ends(flow, stream)
                took = await round_trip(source, sink, b"ping")
                assert 0.4 <= took < 4
                assert await round_trip(*other_ends(flow, stream), b"pong") < 0.4
                size = 3 << 20
                await write_all(source, pattern(size))
                source.shutdown(socket.SHUT_WR)
                assert await read_to_eof(sink) == pattern(size)


@pytest.mark.parametrize("stream", STREAMS)
async def test_latency_counts_from_each_chunks_arrival_so_chunks_in_a_row_overlap(
    stream: str,
) -> None:
    # Eight messages 50 ms apart through 400 ms: about 0.75 s in all. Holding each chunk
    # 400 ms after the one before (as the plain delay() does) would take 3.2 s.
    toxic = make_toxic("latency", name="lag", stream=stream, attributes={"latency": 400})
    with loopback_flows(1) as (flow,):
        async with relayed(flow, chains=chains(toxic)):
            with trio.fail_after(30):
                source, sink = toxic_ends(flow, stream)
                started = trio.current_time()
                async with trio.open_nursery() as nursery:

                    async def send() -> None:
                        for index in range(8):
                            await write_all(source, b"%d" % index)
                            await trio.sleep(0.05)

                    nursery.start_soon(send)
                    assert await recv_exactly(sink, 8) == b"01234567"
                took = trio.current_time() - started
    assert 0.75 <= took < 2.5


# -- bandwidth ----------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", STREAMS)
async def test_bandwidth_keeps_its_stream_to_the_rate(stream: str) -> None:
    toxic = make_toxic("bandwidth", name="narrow", stream=stream, attributes={"rate": 200})
    data = pattern(200_000)  # one second's worth at 200 KB/s
    with loopback_flows(1) as (flow,):
        async with relayed(flow, chains=chains(toxic)):
            with trio.fail_after(30):
                took = await round_trip(*toxic_ends(flow, stream), data)
                assert 0.8 <= took < 5
                assert await round_trip(*other_ends(flow, stream), data) < 0.8


async def test_bandwidth_counts_a_kb_as_1000_bytes_and_rate_zero_as_no_limit(
    autojump_clock: trio.testing.MockClock,
) -> None:
    started = trio.current_time()
    narrow = make_toxic("bandwidth", name="narrow", attributes={"rate": 10})
    assert b"".join(await drive(narrow, S2C, [b"x" * 25_000] * 2)) == b"x" * 50_000
    assert trio.current_time() - started == pytest.approx(5.0, rel=0.005)  # virtual time
    started = trio.current_time()
    unlimited = make_toxic("bandwidth", name="wide", attributes={"rate": 0})
    assert await drive(unlimited, S2C, [b"x" * 25_000] * 2) == [b"x" * 25_000] * 2
    assert trio.current_time() == started


# -- slow_close ---------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", STREAMS)
async def test_slow_close_passes_bytes_at_once_and_the_fin_late(stream: str) -> None:
    toxic = make_toxic("slow_close", name="linger", stream=stream, attributes={"delay": 400})
    with loopback_flows(1) as (flow,):
        async with relayed(flow, chains=chains(toxic)):
            with trio.fail_after(30):
                source, sink = toxic_ends(flow, stream)
                assert await round_trip(source, sink, b"last words") < 0.4
                closed = trio.current_time()
                source.shutdown(socket.SHUT_WR)
                assert await read_to_eof(sink) == b""
                assert 0.4 <= trio.current_time() - closed < 4
                # The other way's FIN is not delayed.
                other_source, other_sink = other_ends(flow, stream)
                closed = trio.current_time()
                other_source.shutdown(socket.SHUT_WR)
                assert await read_to_eof(other_sink) == b""
                assert trio.current_time() - closed < 0.4
                await flow.done.wait()
    assert flow.ending.reason == "closed"


# -- timeout ------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", STREAMS)
async def test_timeout_drops_its_stream_then_closes_the_flow(stream: str) -> None:
    toxic = make_toxic("timeout", name="hang", stream=stream, attributes={"timeout": 400})
    with loopback_flows(1) as (flow,):
        started = trio.current_time()
        async with relayed(flow, chains=chains(toxic)):
            with trio.fail_after(30):
                source, sink = toxic_ends(flow, stream)
                await write_all(source, b"dropped")
                # The other way flows until the close.
                assert await round_trip(*other_ends(flow, stream), b"passes") < 0.4
                # A close (FIN), with nothing of what was dropped.
                assert await read_to_eof(sink) == b""
                assert 0.4 <= trio.current_time() - started < 4
                assert await read_to_eof(source) == b""
                await flow.done.wait()
    assert flow.ending.reason == "interceptor_closed"


@pytest.mark.parametrize("stream", STREAMS)
async def test_timeout_fires_with_no_data_at_all(stream: str) -> None:
    toxic = make_toxic("timeout", name="hang", stream=stream, attributes={"timeout": 300})
    with loopback_flows(1) as (flow,):
        started = trio.current_time()
        async with relayed(flow, chains=chains(toxic)):
            with trio.fail_after(30):
                assert await read_to_eof(flow.client) == b""
                assert 0.3 <= trio.current_time() - started < 4
                assert await read_to_eof(flow.server) == b""
    assert flow.ending.reason == "interceptor_closed"


@pytest.mark.parametrize("stream", STREAMS)
async def test_timeout_zero_drops_its_stream_until_its_source_ends_then_closes(
    stream: str,
) -> None:
    toxic = make_toxic("timeout", name="black_hole", stream=stream, attributes={"timeout": 0})
    with loopback_flows(1) as (flow,):
        async with relayed(flow, chains=chains(toxic)):
            with trio.fail_after(30):
                source, sink = toxic_ends(flow, stream)
                await write_all(source, b"dropped")
                await trio.sleep(0.6)
                assert nothing_waiting(sink)
                assert await round_trip(*other_ends(flow, stream), b"still open") < 0.4
                # The source's EOF closes the whole flow, as in Toxiproxy: what was dropped
                # left a hole in the stream.
                source.shutdown(socket.SHUT_WR)
                assert await read_to_eof(sink) == b""
                assert await read_to_eof(source) == b""
                await flow.done.wait()
    assert flow.ending.reason == "interceptor_closed"


# -- reset_peer ---------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", STREAMS)
async def test_reset_peer_resets_both_sides_after_its_timeout(stream: str) -> None:
    toxic = make_toxic("reset_peer", name="rst", stream=stream, attributes={"timeout": 400})
    with loopback_flows(1) as (flow,):
        started = trio.current_time()
        async with relayed(flow, chains=chains(toxic)):
            with trio.fail_after(30):
                source, sink = toxic_ends(flow, stream)
                await write_all(source, b"never arrives")
                assert await round_trip(*other_ends(flow, stream), b"passes") < 0.4
                assert await read_until_reset(sink) == b""
                assert 0.4 <= trio.current_time() - started < 4
                await read_until_reset(source)
                await flow.done.wait()
    assert flow.ending.reason == "interceptor_reset"


@pytest.mark.parametrize("stream", STREAMS)
async def test_reset_peer_with_no_timeout_resets_at_once_with_no_data(stream: str) -> None:
    toxic = make_toxic("reset_peer", name="rst", stream=stream)
    with loopback_flows(1) as (flow,):
        started = trio.current_time()
        async with relayed(flow, chains=chains(toxic)):
            with trio.fail_after(30):
                assert await read_until_reset(flow.client) == b""
                assert await read_until_reset(flow.server) == b""
                assert trio.current_time() - started < 4
    assert flow.ending.reason == "interceptor_reset"


# -- slicer -------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", STREAMS)
async def test_slicer_sends_small_slices_apart_and_keeps_every_byte(stream: str) -> None:
    # 2000 bytes in slices of at most 80, 20 ms after each: at least 25 slices, 0.48 s.
    attributes = {"average_size": 64, "size_variation": 16, "delay": 20_000}
    toxic = make_toxic("slicer", name="bits", stream=stream, attributes=attributes)
    data = pattern(2000)
    with loopback_flows(1) as (flow,):
        async with relayed(flow, chains=chains(toxic)):
            with trio.fail_after(30):
                source, sink = toxic_ends(flow, stream)
                started = trio.current_time()
                await write_all(source, data)
                reads: list[int] = []
                while sum(reads) < len(data):
                    reads.append(len(await recv_some(sink)))
                took = trio.current_time() - started
                source.shutdown(socket.SHUT_WR)
                assert await read_to_eof(sink) == b""
                assert await round_trip(*other_ends(flow, stream), data) < 0.4
    assert took >= 0.4
    # The reader keeps up with slices 20 ms apart, bar a stall or two on a busy host.
    assert len(reads) >= 10
    assert sorted(reads)[len(reads) // 2] <= 80


# -- limit_data ---------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", STREAMS)
async def test_limit_data_passes_its_bytes_then_closes_the_flow(stream: str) -> None:
    toxic = make_toxic("limit_data", name="cap", stream=stream, attributes={"bytes": 1000})
    with loopback_flows(1) as (flow,):
        async with relayed(flow, chains=chains(toxic)):
            with trio.fail_after(30):
                source, sink = toxic_ends(flow, stream)
                assert await round_trip(*other_ends(flow, stream), b"before") < 0.4
                await write_all(source, pattern(3000))
                assert await read_to_eof(sink) == pattern(1000)
                # The source sees the close too: a FIN, or a RST if the proxy had unread bytes.
                assert await read_to_end(source) in (b"", None)
                await flow.done.wait()
    assert flow.ending.reason == "interceptor_closed"


@pytest.mark.parametrize("stream", STREAMS)
async def test_limit_data_passes_an_eof_before_the_limit(stream: str) -> None:
    toxic = make_toxic("limit_data", name="cap", stream=stream, attributes={"bytes": 1000})
    with loopback_flows(1) as (flow,):
        async with relayed(flow, chains=chains(toxic)):
            with trio.fail_after(30):
                source, sink = toxic_ends(flow, stream)
                await write_all(source, pattern(999))
                source.shutdown(socket.SHUT_WR)
                assert await read_to_eof(sink) == pattern(999)


# -- toxics set on flows in flight (live) ---------------------------------------------------------


@pytest.mark.parametrize("stream", STREAMS)
async def test_latency_set_on_an_open_flow_adds_its_time_until_it_is_removed(stream: str) -> None:
    toxic = make_toxic("latency", name="lag", stream=stream, attributes={"latency": 400})
    live: dict[str | None, tuple[Interceptor, ...]] = {}
    with loopback_flows(1) as (flow,):
        async with relayed(flow, live_chains=live):
            with trio.fail_after(30):
                source, sink = toxic_ends(flow, stream)
                assert await round_trip(source, sink, b"before") < 0.4
                live[None] = (toxic,)
                flow.changed()
                assert 0.4 <= await round_trip(source, sink, b"during") < 4
                assert await round_trip(*other_ends(flow, stream), b"other way") < 0.4
                live.clear()
                flow.changed()
                assert await round_trip(source, sink, b"after") < 0.4
                source.shutdown(socket.SHUT_WR)
                assert await read_to_eof(sink) == b""


@pytest.mark.parametrize("stream", STREAMS)
async def test_reset_peer_set_on_an_idle_flow_resets_it_after_its_timeout(stream: str) -> None:
    toxic = make_toxic("reset_peer", name="rst", stream=stream, attributes={"timeout": 300})
    live: dict[str | None, tuple[Interceptor, ...]] = {}
    with loopback_flows(1) as (flow,):
        async with relayed(flow, live_chains=live):
            with trio.fail_after(30):
                assert await round_trip(flow.client, flow.server, b"in use") < 0.3
                added = trio.current_time()
                live[None] = (toxic,)
                flow.changed()
                assert await read_until_reset(flow.client) == b""
                assert 0.3 <= trio.current_time() - added < 4
                await flow.done.wait()
    assert flow.ending.reason == "interceptor_reset"


@pytest.mark.parametrize("stream", STREAMS)
async def test_reset_peer_removed_before_its_timeout_resets_nothing(stream: str) -> None:
    toxic = make_toxic("reset_peer", name="rst", stream=stream, attributes={"timeout": 600})
    live: dict[str | None, tuple[Interceptor, ...]] = {None: (toxic,)}
    with loopback_flows(1) as (flow,):
        async with relayed(flow, live_chains=live):
            with trio.fail_after(30):
                await trio.sleep(0.2)
                live.clear()
                flow.changed()
                await trio.sleep(0.8)  # past the timeout it would have had
                source, sink = toxic_ends(flow, stream)
                assert await round_trip(source, sink, pattern(100_000)) < 4
                for sending, receiving in (toxic_ends(flow, stream), other_ends(flow, stream)):
                    sending.shutdown(socket.SHUT_WR)
                    assert await read_to_eof(receiving) == b""
                await flow.done.wait()
    assert flow.ending.reason == "closed"


@pytest.mark.parametrize("stream", STREAMS)
async def test_timeout_removed_from_a_flow_closes_it_as_toxiproxy_does(stream: str) -> None:
    toxic = make_toxic("timeout", name="hang", stream=stream, attributes={"timeout": 0})
    live: dict[str | None, tuple[Interceptor, ...]] = {None: (toxic,)}
    with loopback_flows(1) as (flow,):
        async with relayed(flow, live_chains=live):
            with trio.fail_after(30):
                source, sink = toxic_ends(flow, stream)
                await write_all(source, b"dropped")
                await trio.sleep(0.2)
                live.clear()
                flow.changed()
                assert await read_to_eof(sink) == b""
                assert await read_to_eof(source) == b""
                await flow.done.wait()
    assert flow.ending.reason == "interceptor_closed"


@pytest.mark.parametrize("stream", STREAMS)
async def test_limit_data_set_on_an_open_flow_counts_from_then(stream: str) -> None:
    toxic = make_toxic("limit_data", name="cap", stream=stream, attributes={"bytes": 1000})
    live: dict[str | None, tuple[Interceptor, ...]] = {}
    with loopback_flows(1) as (flow,):
        async with relayed(flow, live_chains=live):
            with trio.fail_after(30):
                source, sink = toxic_ends(flow, stream)
                assert await round_trip(source, sink, pattern(500)) < 4
                live[None] = (toxic,)
                flow.changed()
                await write_all(source, pattern(3000, 1))
                assert await read_to_eof(sink) == pattern(1000, 1)
                await flow.done.wait()
    assert flow.ending.reason == "interceptor_closed"


# -- toxicity, over sockets ---------------------------------------------------------------------


@pytest.mark.parametrize("toxicity", [0.0, 1.0])
async def test_toxicity_zero_spares_the_flow_and_one_hits_it(toxicity: float) -> None:
    toxic = make_toxic(
        "latency", name="lag", stream="upstream", toxicity=toxicity, attributes={"latency": 400}
    )
    with loopback_flows(1) as (flow,):
        async with relayed(flow, chains=chains(toxic)):
            with trio.fail_after(30):
                took = await round_trip(flow.client, flow.server, b"ping")
    assert (took >= 0.4) is (toxicity == 1.0)


# -- make_toxic: marks, toxicity, seeds -----------------------------------------------------------


def test_every_toxiproxy_type_is_there_under_its_name() -> None:
    expected = {"latency", "bandwidth", "slow_close", "timeout", "reset_peer", "slicer"}
    assert set(TOXICS) == expected | {"limit_data"}
    assert all(toxic_type_name(factory) == name for name, factory in TOXICS.items())


@pytest.mark.parametrize(("stream", "direction"), [("upstream", C2S), ("DownStream", S2C)])
def test_a_toxic_is_named_and_runs_on_its_stream_only(stream: str, direction: Direction) -> None:
    toxic = make_toxic("slow_close", name="my-toxic", stream=stream)
    assert toxic.__name__ == "my-toxic"
    assert chain_for([toxic], direction) == (toxic,)
    assert chain_for([toxic], C2S if direction is S2C else S2C) == ()
    assert not picks_flows(toxic)  # toxicity 1: every flow, with nothing asked per flow


def test_a_toxic_without_a_name_is_named_as_toxiproxy_does() -> None:
    assert make_toxic("latency", name="").__name__ == "latency_downstream"
    assert make_toxic("latency", name="", stream="Upstream").__name__ == "latency_upstream"


def test_toxics_of_one_shared_interceptor_keep_their_own_marks() -> None:
    # bandwidth(rate=0) hands every caller the same pass-through function.
    assert bandwidth(rate=0) is bandwidth(rate=0)
    up = make_toxic("bandwidth", name="up", stream="upstream", toxicity=0.5, seed=1)
    down = make_toxic("bandwidth", name="down", stream="downstream")
    assert (up.__name__, down.__name__) == ("up", "down")
    assert (chain_for([up, down], C2S), chain_for([up, down], S2C)) == ((up,), (down,))
    assert picks_flows(up)
    assert not picks_flows(down)


FLOWS = [
    Flow(number, ("192.0.2.2", 40000 + number), ("198.51.100.2", 9090)) for number in range(400)
]


def hit_flows(toxic: Interceptor, flows: Sequence[Flow] = FLOWS) -> set[int]:
    return {flow.id for flow in flows if wants(toxic, flow)}


def test_toxicity_zero_hits_no_flow_and_one_every_flow() -> None:
    assert hit_flows(make_toxic("latency", name="t", toxicity=0)) == set()
    assert hit_flows(make_toxic("latency", name="t", toxicity=1)) == {flow.id for flow in FLOWS}


def test_seeded_toxicity_is_reproducible_and_does_not_depend_on_the_order_of_flows() -> None:
    def toxic(seed: int | None, name: str = "t", stream: str = "downstream") -> Interceptor:
        return make_toxic("latency", name=name, stream=stream, toxicity=0.5, seed=seed)

    picked = hit_flows(toxic(7))
    assert 0.35 < len(picked) / len(FLOWS) < 0.65
    assert hit_flows(toxic(7), FLOWS[::-1]) == picked
    # Another seed, another toxic name, the other stream: other flows.
    assert hit_flows(toxic(8)) != picked
    assert hit_flows(toxic(7, name="u")) != picked
    assert hit_flows(toxic(7, stream="upstream")) != picked
    # Unseeded: a different draw every time (400 flows: equal by chance 1 time in 2**400).
    assert hit_flows(toxic(None)) != hit_flows(toxic(None))


async def delays_seen(toxic: Interceptor, flow: Flow, count: int) -> list[float]:
    """Virtual milliseconds from each of ``count`` chunks, 200 ms apart, to its delivery."""
    sent: list[float] = []

    async def source() -> AsyncIterator[bytes]:
        for index in range(count):
            if index:
                await trio.sleep(0.2)
            sent.append(trio.current_time())
            yield b"%d," % index

    delays: list[float] = []

    async def deliver(chunk: bytes) -> bool:
        delays.append(round((trio.current_time() - sent[len(delays)]) * 1000, 3))
        return True

    await run_chain(flow, S2C, chain_for([toxic], S2C), source(), deliver)
    return delays


async def test_seeded_jitter_is_reproducible_per_flow(
    autojump_clock: trio.testing.MockClock,
) -> None:
    def toxic(seed: int) -> Interceptor:
        attributes = {"latency": 100, "jitter": 50}
        return make_toxic("latency", name="j", attributes=attributes, seed=seed)

    first = await delays_seen(toxic(3), FLOWS[1], 20)
    assert first == await delays_seen(toxic(3), FLOWS[1], 20)
    assert first != await delays_seen(toxic(4), FLOWS[1], 20)
    assert first != await delays_seen(toxic(3), FLOWS[2], 20)
    # Each chunk waits its own 50 to 149 ms from its arrival.
    assert all(50 <= delay < 150 for delay in first)
    assert len(set(first)) > 5


def test_slices_cover_the_chunk_within_the_sizes_and_are_reproducible() -> None:
    bounds = slice_bounds(0, 5000, 100, 30, random.Random(1))
    assert bounds[0][0] == 0
    assert bounds[-1][1] == 5000
    assert all(end == start for (_, end), (start, _) in itertools.pairwise(bounds))
    sizes = [end - start for start, end in bounds]
    assert all(0 < size <= 130 for size in sizes)
    assert len(set(sizes)) > 3
    assert bounds == slice_bounds(0, 5000, 100, 30, random.Random(1))


async def test_a_close_from_a_toxic_behind_latency_comes_out_as_itself_after_the_bytes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # latency reads ahead in a task of its own: what ended its source must reach the relay
    # as the CloseFlow it was (not wrapped in an exception group), after the bytes before it.
    cap = make_toxic("limit_data", name="cap", attributes={"bytes": 3})
    lag = make_toxic("latency", name="lag", attributes={"latency": 100})

    async def source() -> AsyncIterator[bytes]:
        yield b"abcdef"

    delivered: list[tuple[bytes, float]] = []
    started = trio.current_time()

    async def deliver(chunk: bytes) -> bool:
        delivered.append((chunk, trio.current_time() - started))
        return True

    with pytest.raises(CloseFlow):
        await run_chain(FLOW, S2C, chain_for([lag, cap], S2C), source(), deliver)
    ((chunk, at),) = delivered
    assert chunk == b"abc"
    assert at == pytest.approx(0.1)


# -- make_toxic: bad input ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("type_", "options", "names"),
    [
        ("lag", {}, "unknown toxic type 'lag'"),
        ("latency", {"stream": "sideways"}, "stream"),
        ("latency", {"toxicity": 1.5}, "toxicity"),
        ("latency", {"toxicity": -0.1}, "toxicity"),
        ("latency", {"toxicity": float("nan")}, "toxicity"),
        ("latency", {"toxicity": "half"}, "toxicity"),
        ("latency", {"attributes": {"latncy": 10}}, "'latncy'"),
        ("latency", {"attributes": {"latency": -1}}, "latency"),
        ("latency", {"attributes": {"latency": 2.5}}, "latency"),
        ("latency", {"attributes": {"jitter": "5"}}, "jitter"),
        ("latency", {"attributes": {"rng": 5}}, "'rng'"),
        ("bandwidth", {"attributes": {"rate": True}}, "rate"),
        ("slow_close", {"attributes": {"delay": None}}, "delay"),
        ("timeout", {"attributes": {"timeout": -5}}, "timeout"),
        ("reset_peer", {"attributes": {"timeout": [1]}}, "timeout"),
        ("slicer", {"attributes": {"average_size": 0}}, "average_size"),
        ("slicer", {"attributes": {"average_size": 10, "size_variation": 10}}, "size_variation"),
        ("slicer", {"attributes": {"average_size": 10, "delay": -1}}, "delay"),
        ("limit_data", {"attributes": {"bytes": -1}}, "bytes"),
    ],
)
def test_bad_input_is_one_line_that_names_what_is_wrong(
    type_: str, options: dict[str, object], names: str
) -> None:
    with pytest.raises(ValueError, match=names) as caught:
        make_toxic(type_, name="t", **options)  # type: ignore[arg-type]
    assert "\n" not in str(caught.value)


# -- toxic types of your own ----------------------------------------------------------------------


@toxic_type("flip")
def flip(every: int = 1, *, rng: FlowRandom) -> Interceptor:
    """A user's toxic: swaps the case of random bytes, one in ``every``."""
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"every: {every!r} is not a whole number of at least 1")

    async def flip_case(
        flow: Flow, direction: Direction, chunks: AsyncIterator[bytes]
    ) -> AsyncIterator[bytes]:
        draws = rng(flow, direction)
        async for chunk in chunks:
            yield bytes(b ^ 0x20 if draws.randrange(every) == 0 else b for b in chunk)

    return flip_case


def test_a_toxic_type_of_your_own_is_made_by_name_from_its_registry() -> None:
    registry = toxic_types(flip)
    assert set(registry) == set(TOXICS) | {"flip"}
    toxic = make_toxic("flip", name="f", stream="upstream", attributes={"every": 1}, types=registry)
    assert toxic.__name__ == "f"
    assert trio.run(drive, toxic, C2S, [b"Hello"]) == [b"hELLO"]
    with pytest.raises(ValueError, match="every"):
        make_toxic("flip", name="f", attributes={"every": 0}, types=registry)
    with pytest.raises(ValueError, match="has no attribute 'often'"):
        make_toxic("flip", name="f", attributes={"often": 2}, types=registry)
    # The built-in registry is not changed by any of this.
    with pytest.raises(ValueError, match="unknown toxic type 'flip'"):
        make_toxic("flip", name="f")


def test_a_toxic_type_of_your_own_gets_seeded_draws() -> None:
    registry = toxic_types(flip)

    def run_once(seed: int) -> list[bytes]:
        toxic = make_toxic("flip", name="f", attributes={"every": 2}, seed=seed, types=registry)
        return trio.run(drive, toxic, S2C, [b"abcdefghijklmnopqrstuvwxyz"])

    assert run_once(5) == run_once(5)
    assert run_once(5) != run_once(6)


def test_a_registry_refuses_unmarked_factories_and_names_taken_twice() -> None:
    def unmarked() -> Interceptor:
        return latency()

    with pytest.raises(ValueError, match="not a toxic type"):
        toxic_types(unmarked)

    @toxic_type("latency")
    def my_latency() -> Interceptor:
        return latency()

    with pytest.raises(ValueError, match="'latency' exists already"):
        toxic_types(my_latency)
    with pytest.raises(ValueError, match="toxic type name"):
        toxic_type("no spaces")


def test_a_toxic_keeps_the_flows_its_factory_picks() -> None:
    @toxic_type("odd_only")
    def odd_only() -> Interceptor:
        @for_flows(lambda flow: flow.id % 2 == 1)
        @directions(C2S)
        async def tag(
            flow: Flow, direction: Direction, chunks: AsyncIterator[bytes]
        ) -> AsyncIterator[bytes]:
            async for chunk in chunks:
                yield chunk

        return tag

    registry = toxic_types(odd_only)
    every = make_toxic("odd_only", name="o", types=registry)
    assert hit_flows(every) == {flow.id for flow in FLOWS if flow.id % 2}
    half = make_toxic("odd_only", name="o", toxicity=0.5, seed=1, types=registry)
    assert hit_flows(half) < hit_flows(every)
    # The toxic's stream decides its direction, whatever the factory marked.
    assert chain_for([every], S2C) == (every,)


async def drive(toxic: Interceptor, direction: Direction, chunks: Sequence[bytes]) -> list[bytes]:
    async def source() -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield chunk

    delivered: list[bytes] = []

    async def deliver(chunk: bytes) -> bool:
        delivered.append(chunk)
        return True

    await run_chain(FLOW, direction, chain_for([toxic], direction), source(), deliver)
    return delivered


# -- the README's examples ----------------------------------------------------------------------


def readme_toxics_blocks() -> list[str]:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("\n## Toxics\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.DOTALL)


def test_the_readmes_toxic_examples_work_as_written() -> None:
    make_block, own_type_block = readme_toxics_blocks()
    made: dict[str, Any] = {}
    exec(make_block, made)
    assert made["slow"].__name__ == "slow-replies"
    own: dict[str, Any] = {}
    exec(own_type_block, own)
    assert own["flaky"].__name__ == "flaky"
    types = own["types"]
    assert set(types) == set(TOXICS) | {"drop_connection"}

    def made_with(percent: int) -> Interceptor:
        attributes = {"probability_pct": percent}
        return make_toxic("drop_connection", name="d", attributes=attributes, types=types)

    assert trio.run(drive, made_with(0), S2C, [b"a", b"b"]) == [b"a", b"b"]
    with pytest.raises(CloseFlow):
        trio.run(drive, made_with(100), S2C, [b"a"])
    with pytest.raises(ValueError, match="probability_pct"):
        made_with(101)


def test_a_toxic_type_loads_from_the_command_line_as_an_interceptor() -> None:
    interceptor = load_interceptor("uproxy_trio.toxics:slicer(average_size=2, delay=0)")
    assert trio.run(drive, interceptor, C2S, [b"abcd"]) == [b"ab", b"cd"]
    with pytest.raises(SpecError, match="average_size"):
        load_interceptor("uproxy_trio.toxics:slicer(average_size=0)")
