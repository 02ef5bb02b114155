"""Slowing a flow down on purpose, to test how clients and servers cope with slow links.

Both work by not asking for the next chunk: the relay then stops reading that side, the
kernel's receive buffer fills and TCP's own flow control slows the sender. Nothing queues up
in the proxy. On a UDP session the kernel drops what the receive buffer cannot hold, as a
slow link would; a datagram is never cut into slices.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import trio

from ._flow import Direction, Flow
from ._interceptor import Interceptor, directions, interceptor_factory

# A throttled chunk is sent in slices of this much time's worth of bytes, so the rate is
# smooth at the scale a test watches rather than one burst per 64 KiB read.
_SLICE_S = 0.05


@interceptor_factory
def throttle(bytes_per_second: float, *, direction: Direction | str | None = None) -> Interceptor:
    """Pass at most ``bytes_per_second`` on average in each direction of a flow."""
    if bytes_per_second <= 0:
        raise ValueError("throttle() needs a positive rate")
    slice_size = max(1, int(bytes_per_second * _SLICE_S))

    async def limit_rate(
        flow: Flow, direction: Direction, chunks: AsyncIterator[bytes]
    ) -> AsyncIterator[bytes]:
        # The time at which everything yielded so far has been "paid for".
        paid_until = trio.current_time()
        if flow.transport == "udp":
            async for datagram in chunks:  # whole datagrams, each paid for before it goes
                paid_until = max(paid_until, trio.current_time()) + len(datagram) / bytes_per_second
                await trio.sleep_until(paid_until)
                yield datagram
            return
        async for chunk in chunks:
            for start in range(0, len(chunk), slice_size):
                piece = chunk[start : start + slice_size]
                paid_until = max(paid_until, trio.current_time()) + len(piece) / bytes_per_second
                await trio.sleep_until(paid_until)
                yield piece

    return limit_rate if direction is None else directions(direction)(limit_rate)


@interceptor_factory
def delay(seconds: float, *, direction: Direction | str | None = None) -> Interceptor:
    """Hold every chunk back for ``seconds`` before passing it on, like a long link's latency.

    Chunks are delayed one after another, so a bulk transfer also slows to one read per
    ``seconds``; that is what a window-limited long link looks like too.
    """
    if seconds < 0:
        raise ValueError("delay() needs a non-negative delay")

    async def add_latency(
        flow: Flow, direction: Direction, chunks: AsyncIterator[bytes]
    ) -> AsyncIterator[bytes]:
        async for chunk in chunks:
            await trio.sleep(seconds)
            yield chunk

    return add_latency if direction is None else directions(direction)(add_latency)
