"""Corrupt every Nth byte of a stream, for testing how a protocol copes with bad data.

    uproxy serve --interceptor 'examples/corrupt.py:corrupt_every(1000, "client_to_server")'

The Nth, 2Nth, ... byte of the direction (counted over the whole stream, wherever the reads
fall) has all its bits flipped. TCP checksums cannot catch this: the proxy re-sends the bytes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from uproxy_trio import Direction, Flow, Interceptor, directions, interceptor_factory


@interceptor_factory
def corrupt_every(n: int, direction: str | None = None) -> Interceptor:
    if n < 1:
        raise ValueError("corrupt_every() needs n >= 1")

    async def corrupt(
        flow: Flow, direction: Direction, chunks: AsyncIterator[bytes]
    ) -> AsyncIterator[bytes]:
        offset = 0  # stream offset of the chunk's first byte
        async for chunk in chunks:
            data = bytearray(chunk)
            # Stream positions n-1, 2n-1, ... that fall in this chunk.
            for index in range((n - 1 - offset) % n, len(data), n):
                data[index] ^= 0xFF
            offset += len(data)
            yield bytes(data)

    return corrupt if direction is None else directions(direction)(corrupt)
