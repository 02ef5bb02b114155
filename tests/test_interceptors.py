"""Interceptors without sockets: built-ins against their specifications, chains in onion order.

``drive`` runs a direction's chain through the relay's own ``run_chain``, with a list for the
source and the sink, so what holds here holds per direction in a flow.
"""

from __future__ import annotations

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


# Three letters make matches, overlaps and near misses common.
LETTERS = b"abc"


def in_letters(raw: bytes) -> bytes:
    return bytes(LETTERS[byte % len(LETTERS)] for byte in raw)


letters = st.binary(min_size=1, max_size=6).map(in_letters)


def chunk_lists(
    piece: st.SearchStrategy[bytes], cut: bytes = b""
) -> st.SearchStrategy[list[bytes]]:
    """The reads of a stream, drawn directly, in ten to eighty draws: each a read of one to
    three pieces or, given ``cut``, often ``cut`` split between two reads. The stream is what
    the reads add up to, typically a hundred bytes or so."""
    read = st.lists(piece, min_size=1, max_size=3).map(lambda pieces: [b"".join(pieces)])
    if len(cut) > 1:
        halves = st.integers(1, len(cut) - 1).map(lambda at: [cut[:at], cut[at:]])
        read = st.one_of(read, halves)
    return st.lists(read, min_size=10, max_size=80).map(
        lambda groups: [chunk for group in groups for chunk in group]
    )


def pieces_around(needle: bytes) -> st.SearchStrategy[bytes]:
    """The needle, a beginning or an end of it, or a few letters: read by read, matches form,
    overlap and nearly happen."""
    return st.one_of(
        st.just(needle),
        st.integers(1, len(needle)).map(lambda size: needle[:size]),
        st.integers(1, len(needle)).map(lambda size: needle[-size:]),
        letters,
    )


@settings(max_examples=400, deadline=None)
@given(data=st.data(), old=st.binary(min_size=1, max_size=5).map(in_letters))
def test_replace_matches_bytes_replace_for_any_split(data: st.DataObject, old: bytes) -> None:
    chunks = data.draw(chunk_lists(pieces_around(old), cut=old), label="chunks")
    new = data.draw(st.binary(max_size=4), label="new")
    out = run([replace(old, new)], C2S, chunks)
    assert b"".join(out) == b"".join(chunks).replace(old, new)


def test_replace_holds_back_only_a_possible_match() -> None:
    # "GET / HTTP/1.1\r\n" ends with nothing that starts "Host-X": it passes at once.
    out = run([replace(b"Host-X", b"Host-Y")], C2S, [b"GET / HTTP/1.1\r\n", b"Ho", b"st-X!"])
    assert out == [b"GET / HTTP/1.1\r\n", b"Host-Y!"]


REGEX_PATTERNS = [
    # Bounded: no match is longer than a few bytes.
    rb"a{2,3}",
    rb"(c)(a|b)",
    rb"b[ac]b",
    rb"abc",
    # Unbounded: a match is as long as the stream makes it, greedy or lazy.
    rb"ab+a",
    rb"a+",
    rb"(?:ab)+",
    rb"b[^b]*b",
    rb"c[ab]*c",
    rb"a+?b",
    rb"(?:a|ab)(?:c|bc)",
]


@settings(max_examples=600, deadline=None)
@given(
    chunks=chunk_lists(letters),
    pattern=st.sampled_from(REGEX_PATTERNS),
    slack=st.integers(min_value=0, max_value=3),
)
def test_regex_replace_matches_re_sub_for_any_split(
    chunks: list[bytes], pattern: bytes, slack: int
) -> None:
    stream = b"".join(chunks)
    # The promise covers matches of up to max_match bytes: give it this stream's longest
    # match, or a little more, so that it holds back as little as it may.
    longest = max((len(match[0]) for match in re.finditer(pattern, stream)), default=1)
    interceptor = regex_replace(pattern, rb"<\g<0>>", max_match=longest + slack)
    out = run([interceptor], C2S, chunks)
    assert b"".join(out) == re.sub(pattern, rb"<\g<0>>", stream)


def test_regex_replace_waits_for_the_bytes_a_lookahead_reads() -> None:
    # a(?!bb) reads three bytes from where a match starts: max_match counts what the pattern
    # reads, lookahead included, not only the one byte it matches.
    out = run([regex_replace(rb"a(?!bb)", b"X", max_match=3)], C2S, [b"xab", b"b"])
    assert b"".join(out) == re.sub(rb"a(?!bb)", b"X", b"xabb") == b"xabb"


@pytest.mark.parametrize(
    ("pattern", "max_match", "complaint"),
    [
        (rb"a*", 4096, "cannot match empty"),
        (rb"(?:ab)?", 4096, "cannot match empty"),
        (rb"a+", 0, "max_match must be at least 1"),
    ],
)
def test_regex_replace_refuses_what_it_cannot_do(
    pattern: bytes, max_match: int, complaint: str
) -> None:
    with pytest.raises(ValueError, match=complaint):
        regex_replace(pattern, b"", max_match=max_match)


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


def test_an_empty_chunk_an_interceptor_yields_is_not_delivered() -> None:
    async def now_and_then(
        flow: Flow, direction: Direction, chunks: AsyncIterator[bytes]
    ) -> AsyncIterator[bytes]:
        async for chunk in chunks:
            yield b""  # "nothing now", which the relay does not pass on as a write
            yield chunk

    assert run([now_and_then], C2S, [b"a", b"b"]) == [b"a", b"b"]


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
