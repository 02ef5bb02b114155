"""Interceptors without sockets: built-ins against their specifications, chains in onion order.

``drive`` runs a direction's chain through the relay's own ``run_chain``, with a list for the
source and the sink, so what holds here holds per direction in a flow.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import AsyncIterator, Sequence

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from uproxy_trio import Direction, Flow, Interceptor, directions, in_own_task
from uproxy_trio._interceptor import chain_for, run_chain
from uproxy_trio.interceptors import (
    delay,
    format_hexdump,
    hexdump,
    label,
    regex_replace,
    replace,
    throttle,
)

FLOW = Flow(7, ("192.0.2.2", 40000), ("198.51.100.2", 9090))
C2S, S2C = Direction.CLIENT_TO_SERVER, Direction.SERVER_TO_CLIENT


async def drive(
    interceptors: Sequence[Interceptor], direction: Direction, chunks: Sequence[bytes]
) -> list[bytes]:
    """What the relay does with a direction's chain (``run_chain``), over ``chunks``."""

    async def source() -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield chunk

    delivered: list[bytes] = []

    async def deliver(chunk: bytes) -> bool:
        delivered.append(bytes(chunk))
        return True

    await run_chain(FLOW, direction, chain_for(interceptors, direction), source(), deliver)
    return delivered


def run(
    interceptors: Sequence[Interceptor], direction: Direction, chunks: Sequence[bytes]
) -> list[bytes]:
    return trio.run(drive, interceptors, direction, chunks)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(cut, len(data)) for cut in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


# Small alphabets make matches, overlaps and near misses common.
streams = st.binary(max_size=300).map(lambda raw: bytes(b % 3 + 97 for b in raw))
cut_lists = st.lists(st.integers(min_value=0, max_value=300), max_size=30)
patterns = st.binary(min_size=1, max_size=5).map(lambda raw: bytes(b % 3 + 97 for b in raw))


@settings(max_examples=400, deadline=None)
@given(data=streams, cuts=cut_lists, old=patterns, new=st.binary(max_size=4))
def test_replace_matches_bytes_replace_for_any_split(
    data: bytes, cuts: list[int], old: bytes, new: bytes
) -> None:
    out = run([replace(old, new)], C2S, split(data, cuts))
    assert b"".join(out) == data.replace(old, new)


def test_replace_holds_back_only_a_possible_match() -> None:
    # "GET / HTTP/1.1\r\n" ends with nothing that starts "Host-X": it passes at once.
    out = run([replace(b"Host-X", b"Host-Y")], C2S, [b"GET / HTTP/1.1\r\n", b"Ho", b"st-X!"])
    assert out == [b"GET / HTTP/1.1\r\n", b"Host-Y!"]


@settings(max_examples=300, deadline=None)
@given(
    data=streams,
    cuts=cut_lists,
    pattern=st.sampled_from([rb"ab+a", rb"a{2,3}", rb"(c)(a|b)", rb"b[ac]b", rb"abc"]),
)
def test_regex_replace_matches_re_sub_for_any_split(
    data: bytes, cuts: list[int], pattern: bytes
) -> None:
    out = run([regex_replace(pattern, rb"<\g<0>>", max_match=64)], C2S, split(data, cuts))
    assert b"".join(out) == re.sub(pattern, rb"<\g<0>>", data)


def test_regex_replace_refuses_a_pattern_that_matches_nothing_at_all() -> None:
    with pytest.raises(ValueError, match="cannot match empty"):
        regex_replace(rb"a*", b"")


@settings(max_examples=200, deadline=None)
@given(chunks=st.lists(st.binary(min_size=1, max_size=50), max_size=20))
def test_label_adds_exactly_one_label_per_chunk(chunks: list[bytes]) -> None:
    out = run([label("[L]")], S2C, chunks)
    assert out == [chunk + b"[L]\n" for chunk in chunks]


def tag(name: bytes) -> Interceptor:
    async def add_tag(
        flow: Flow, direction: Direction, chunks: AsyncIterator[bytes]
    ) -> AsyncIterator[bytes]:
        async for chunk in chunks:
            yield chunk + name

    return add_tag


@settings(max_examples=100, deadline=None)
@given(names=st.lists(st.sampled_from([b"[a]", b"[b]", b"[c]", b"[d]"]), min_size=1, max_size=4))
def test_chains_are_an_onion_with_the_first_closest_to_the_client(names: list[bytes]) -> None:
    interceptors = [tag(name) for name in names]
    (to_server,) = run(interceptors, C2S, [b"x"])
    (to_client,) = run(interceptors, S2C, [to_server])
    # Out through every layer in order, and back in through them in reverse.
    assert to_client == b"x" + b"".join(names) + b"".join(reversed(names))


def test_directions_marker_skips_the_other_way() -> None:
    only_up = directions("client_to_server")(tag(b"[up]"))
    assert run([only_up], C2S, [b"x"]) == [b"x[up]"]
    assert run([only_up], S2C, [b"x"]) == [b"x"]
    assert chain_for([only_up], S2C) == ()
    with pytest.raises(ValueError, match="not a direction"):
        directions("sideways")


def test_in_own_task_may_hold_a_cancel_scope_across_yield() -> None:
    @in_own_task
    async def flush_on_timer(
        flow: Flow, direction: Direction, chunks: AsyncIterator[bytes]
    ) -> AsyncIterator[bytes]:
        # Forbidden in a plain async generator under Trio; allowed in a task of its own.
        with trio.move_on_after(10):
            async for chunk in chunks:
                yield chunk.upper()

    assert run([flush_on_timer, tag(b"!")], C2S, [b"ab", b"cd"]) == [b"AB!", b"CD!"]


def test_in_own_task_failure_surfaces_to_the_relay() -> None:
    @in_own_task
    async def explode(
        flow: Flow, direction: Direction, chunks: AsyncIterator[bytes]
    ) -> AsyncIterator[bytes]:
        async for chunk in chunks:
            if chunk == b"x":
                raise ZeroDivisionError("boom")
            yield chunk

    with pytest.raises(ZeroDivisionError):
        run([explode], C2S, [b"x"])


async def test_throttle_keeps_the_rate(autojump_clock: trio.testing.MockClock) -> None:
    start = trio.current_time()
    out = await drive([throttle(10_000)], C2S, [b"x" * 25_000, b"y" * 25_000])
    elapsed = trio.current_time() - start
    assert b"".join(out) == b"x" * 25_000 + b"y" * 25_000
    assert elapsed == pytest.approx(5.0, rel=0.02)  # virtual time: 50 kB at 10 kB/s
    assert max(len(piece) for piece in out) <= 500  # smooth, in 50 ms slices


async def test_delay_holds_each_chunk(autojump_clock: trio.testing.MockClock) -> None:
    start = trio.current_time()
    assert await drive([delay(0.25)], S2C, [b"a", b"b"]) == [b"a", b"b"]
    assert trio.current_time() - start == pytest.approx(0.5)


def test_hexdump_passes_bytes_and_logs_them(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="uproxy_trio.hexdump")
    assert run([hexdump(16)], C2S, [b"hello, world! 0123456789"]) == [b"hello, world! 0123456789"]
    (record,) = caplog.records
    assert "flow 7 client_to_server 192.0.2.2:40000 -> 198.51.100.2:9090 24 bytes at 0" in (
        record.getMessage()
    )
    assert "68 65 6c 6c 6f 2c 20 77 6f 72 6c 64 21 20 30 31  hello, world! 01" in (
        record.getMessage()
    )
    assert record.getMessage().endswith("... 8 more bytes")


def test_format_hexdump_counts_stream_offsets() -> None:
    assert format_hexdump(b"\x00AB", offset=32) == "00000020  00 41 42" + " " * 39 + "  .AB"
