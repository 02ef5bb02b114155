"""Toxiproxy's seven toxics, as interceptor factories.

Each is named as its Toxiproxy type and takes that type's attributes, names and units as
keyword arguments, each defaulting to zero as in Toxiproxy. Each returns an interceptor for
both directions of every flow; ``make_toxic`` narrows it to one stream and a share of flows.

Where Toxiproxy closes the connection (``timeout``, ``limit_data``), the interceptor raises
``CloseFlow``; where it resets it (``reset_peer``), ``ResetFlow``. A source's EOF is passed on
after the bytes before it (a FIN, the other direction going on), except where a toxic delays
it (``slow_close``, and ``latency`` which delays everything) or closes the flow (``timeout``).

A toxic set on a live flow is removed by ending its chunks, which it cannot tell from its
source's EOF: each does on removal what it does at an EOF. For all but ``slow_close`` (which
then holds the stream back ``delay`` once) that is what Toxiproxy does on removal too.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator

import trio

from ._ending import CloseFlow, ResetFlow
from ._flow import Direction, Flow
from ._interceptor import Interceptor, in_own_task
from ._pacing import throttle
from ._readahead import ReadAhead
from ._toxic import UNSEEDED, FlowRandom, ToxicFactory, seconds_from_ms, toxic_type, whole

# How much the latency toxic reads ahead of what it has passed on, per direction of a flow:
# 300 ms of latency on a 100 Mbit/s link holds about 4 MiB. Past it, the sender is slowed
# by TCP's flow control. (Toxiproxy holds up to 1024 reads of up to 32 KiB.)
LATENCY_READ_AHEAD = 4 << 20

# Toxiproxy's bandwidth unit: a KB is 1000 bytes (its rate is bytes per millisecond).
_KB = 1000


@toxic_type("latency")
def latency(latency: int = 0, jitter: int = 0, *, rng: FlowRandom = UNSEEDED) -> Interceptor:
    """Delay every chunk by ``latency`` ms, plus or minus up to ``jitter`` ms, counted from when
    it was read: the delay does not slow a bulk transfer down, as Toxiproxy's does not.

    Each chunk draws its own jitter (from ``-jitter`` to ``jitter - 1``, as Toxiproxy does);
    chunks stay in order, so one drawn short waits for the one before it. The EOF is passed on
    after the last chunk.
    """
    base_ms = whole("latency", latency, "ms")
    jitter_ms = whole("jitter", jitter, "ms")

    @in_own_task  # its reader task runs while the chunks wait
    async def add_latency(
        flow: Flow, direction: Direction, chunks: AsyncIterator[bytes]
    ) -> AsyncIterator[bytes]:
        draws = rng(flow, direction)
        ahead = ReadAhead(LATENCY_READ_AHEAD)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ahead.fill, chunks)
            async for arrived, chunk in ahead:
                delay_ms = base_ms + (draws.randrange(-jitter_ms, jitter_ms) if jitter_ms else 0)
                await trio.sleep_until(arrived + seconds_from_ms(delay_ms))
                yield chunk
        ahead.raise_failure()

    return add_latency


@toxic_type("bandwidth")
def bandwidth(rate: int = 0) -> Interceptor:
    """Pass at most ``rate`` KB (1000 bytes) per second; a ``rate`` of 0 does not limit, as in
    Toxiproxy. The bytes are held back by not reading, so TCP slows the sender."""
    limit = whole("rate", rate, "KB/s")
    if limit == 0:
        return _pass_through
    return throttle(limit * _KB)


async def _pass_through(
    flow: Flow, direction: Direction, chunks: AsyncIterator[bytes]
) -> AsyncIterator[bytes]:
    async for chunk in chunks:
        yield chunk


@toxic_type("slow_close")
def slow_close(delay: int = 0) -> Interceptor:
    """Pass the source's EOF on ``delay`` ms late; every byte goes through at once."""
    wait_s = seconds_from_ms(whole("delay", delay, "ms"))

    async def delay_close(
        flow: Flow, direction: Direction, chunks: AsyncIterator[bytes]
    ) -> AsyncIterator[bytes]:
        _streams_only("slow_close", "has no close to delay", flow)
        async for chunk in chunks:
            yield chunk
        await trio.sleep(wait_s)

    return delay_close


@toxic_type("timeout")
def timeout(timeout: int = 0) -> Interceptor:
    """Let nothing through, and close the flow ``timeout`` ms after the toxic reaches it,
    whether or not anything came; with 0, only when the toxic goes.

    The data is read and dropped, as Toxiproxy drops it, so the sender is not held up. When
    the toxic's input ends (it is removed from a live flow, or its source sends EOF) the flow
    is closed too, as Toxiproxy closes it: what was dropped has left a hole in the stream.
    """
    wait_ms = whole("timeout", timeout, "ms")
    wait_s = seconds_from_ms(wait_ms) if wait_ms else float("inf")

    async def drop_then_close(
        flow: Flow, direction: Direction, chunks: AsyncIterator[bytes]
    ) -> AsyncIterator[bytes]:
        yield b""  # passes nothing (and makes this an async generator)
        await _drop_for(chunks, wait_s)
        raise CloseFlow

    return drop_then_close


@toxic_type("reset_peer")
def reset_peer(timeout: int = 0) -> Interceptor:
    """Reset the flow (a RST to both sides) ``timeout`` ms after the toxic reaches it, whether
    or not anything came; 0 resets it at once. Nothing passes in the meantime: it is read and
    dropped.

    A toxic removed before its time (its input ends) lets the flow go on without a reset; so
    does a source's EOF, which is then passed on. Toxiproxy starts this timer at the first
    chunk after the toxic was added (and drops that chunk); here it starts when the toxic
    reaches the flow, so that an idle connection (one in a pool, say) is reset too.
    """
    wait_s = seconds_from_ms(whole("timeout", timeout, "ms"))

    async def reset_later(
        flow: Flow, direction: Direction, chunks: AsyncIterator[bytes]
    ) -> AsyncIterator[bytes]:
        yield b""  # passes nothing (and makes this an async generator)
        if await _drop_for(chunks, wait_s):
            raise ResetFlow

    return reset_later


async def _drop_for(chunks: AsyncIterator[bytes], seconds: float) -> bool:
    """Read and drop ``chunks`` for ``seconds``: true if the time ran out, false if they
    ended first. (No ``yield`` inside the timer's cancel scope, so a plain generator may
    call this.)"""
    with trio.move_on_after(seconds):
        async for _dropped in chunks:
            pass
        return False
    return True


@toxic_type("slicer")
def slicer(
    average_size: int = 0, size_variation: int = 0, delay: int = 0, *, rng: FlowRandom = UNSEEDED
) -> Interceptor:
    """Cut every chunk into slices of about ``average_size`` bytes, give or take
    ``size_variation`` (less than ``average_size``), with ``delay`` µs after each slice.

    Slicing halves a chunk, moved by up to ``size_variation``, until each part is at most
    ``average_size + size_variation`` long, as Toxiproxy does, so slices from a long chunk are
    often nearer half the average than the average.
    """
    average = whole("average_size", average_size, "bytes", minimum=1)
    variation = whole("size_variation", size_variation, "bytes")
    if variation >= average:
        raise ValueError(
            f"size_variation: {variation} bytes is not less than average_size ({average})"
        )
    pause_s = whole("delay", delay, "µs") / 1_000_000

    async def slice_chunks(
        flow: Flow, direction: Direction, chunks: AsyncIterator[bytes]
    ) -> AsyncIterator[bytes]:
        _streams_only("slicer", "would cut each datagram into several", flow)
        draws = rng(flow, direction)
        async for chunk in chunks:
            for start, end in slice_bounds(0, len(chunk), average, variation, draws):
                yield chunk[start:end]
                await trio.sleep(pause_s)

    return slice_chunks


class StreamsOnly(ValueError):
    """A toxic that only makes sense on a byte stream met a UDP session."""


def _streams_only(toxic: str, why: str, flow: Flow) -> None:
    """Refuse a UDP session, whose chunks are datagrams, for a toxic made for byte streams:
    the session ends (``interceptor_failed``) with this error in the log."""
    if flow.transport != "tcp":
        raise StreamsOnly(
            f"the {toxic} toxic is for TCP: on UDP session {flow.id} it {why}; "
            'give it a route with transport = "tcp"'
        )


def slice_bounds(
    start: int, end: int, average: int, variation: int, draws: random.Random
) -> list[tuple[int, int]]:
    """Where ``slicer`` cuts ``[start, end)``: halve it, the cut moved by up to ``variation``
    either way, until each part is short enough. ``variation < average`` keeps every cut
    strictly inside the part it cuts."""
    if end - start - average <= variation:
        return [(start, end)]
    middle = start + (end - start) // 2
    if variation:
        middle += draws.randrange(-variation, variation)
    return [
        *slice_bounds(start, middle, average, variation, draws),
        *slice_bounds(middle, end, average, variation, draws),
    ]


@toxic_type("limit_data")
def limit_data(bytes: int = 0) -> Interceptor:
    """Pass the first ``bytes`` bytes, then close the flow. With 0, the flow is closed when
    its first chunk comes, as in Toxiproxy. An EOF before the limit is passed on."""
    return _close_after(whole("bytes", bytes, "bytes"))


def _close_after(limit: int) -> Interceptor:
    async def limit_bytes(
        flow: Flow, direction: Direction, chunks: AsyncIterator[bytes]
    ) -> AsyncIterator[bytes]:
        passed = 0
        async for chunk in chunks:
            piece = chunk[: limit - passed]
            passed += len(piece)
            yield piece
            if passed >= limit:
                raise CloseFlow

    return limit_bytes


TOXICS: dict[str, ToxicFactory] = {
    "latency": latency,
    "bandwidth": bandwidth,
    "slow_close": slow_close,
    "timeout": timeout,
    "reset_peer": reset_peer,
    "slicer": slicer,
    "limit_data": limit_data,
}
"""Toxiproxy's toxic types, by name. A fresh dict with your own types added: ``toxic_types``."""
