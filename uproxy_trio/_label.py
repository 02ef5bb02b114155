"""The seed proxy's label: mark every read so a reader of the stream can see where reads fell."""

from __future__ import annotations

from collections.abc import AsyncIterator

from ._flow import Direction, Flow
from ._interceptor import Interceptor, interceptor_factory


@interceptor_factory
def label(text: str | bytes) -> Interceptor:
    """An interceptor that appends ``text`` and a newline to every chunk, in both directions.

    A chunk is one read from the socket, so the labels show how TCP segmented the stream on its
    way through the proxy, as in the seed proxy's ``liproxy``.
    """
    suffix = (text.encode() if isinstance(text, str) else bytes(text)) + b"\n"

    async def add_label(
        flow: Flow, direction: Direction, chunks: AsyncIterator[bytes]
    ) -> AsyncIterator[bytes]:
        async for chunk in chunks:
            yield chunk + suffix

    return add_label
