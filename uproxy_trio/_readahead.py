"""Reading a chunk stream ahead of a consumer that holds chunks back, each stamped with the
time it was read.

A link's latency delays each byte from the moment it was sent; it does not slow the link down.
An interceptor that slept before passing each chunk on, and only then asked for the next one,
would add its delay once per chunk in a row: a pipelined protocol, or a bulk transfer, would
see its latency pile up. So the latency toxic reads ahead in a task of its own, and passes each
chunk on once its own delay has run from its own arrival.

Reading ahead is bounded in bytes: past ``limit`` held, the reader stops reading, the socket's
receive buffer fills, and TCP's flow control slows the sender, as a full link would.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from typing import Self

import trio


class ReadAhead:
    """Chunks read from ``fill``'s stream as they come, for one consumer iterating this.

    Whatever ended the stream (its EOF, or an exception such as ``CloseFlow`` from an earlier
    interceptor, or a source's reset) reaches the consumer after the chunks read before it:
    iteration stops there, and ``raise_failure`` re-raises the exception, so that the consumer
    can raise it outside its nursery, unwrapped.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._held = 0
        self._room = trio.Event()
        self._send, self._receive = trio.open_memory_channel[tuple[float, bytes]](math.inf)
        self._failure: Exception | None = None

    async def fill(self, chunks: AsyncIterator[bytes]) -> None:
        """Read ``chunks`` to their end, holding at most about ``limit`` bytes unconsumed."""
        with self._send:
            try:
                async for chunk in chunks:
                    self._held += len(chunk)
                    self._send.send_nowait((trio.current_time(), chunk))
                    while self._held >= self._limit:
                        self._room = trio.Event()
                        await self._room.wait()
            except Exception as exc:  # noqa: BLE001 - handed to the consumer, in order
                self._failure = exc

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> tuple[float, bytes]:
        """The next chunk and the ``trio.current_time()`` it was read at."""
        try:
            arrived, chunk = await self._receive.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None
        self._held -= len(chunk)
        self._room.set()
        return arrived, chunk

    def raise_failure(self) -> None:
        """Raise what ended the stream, if it was not its EOF."""
        if self._failure is not None:
            raise self._failure
