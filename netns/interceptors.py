"""Interceptors the bench loads into ``uproxy serve``:
``--interceptor uproxy_netns.interceptors:identity``."""

from __future__ import annotations

from collections.abc import AsyncIterator

from uproxy_trio import Direction, Flow


async def identity(
    flow: Flow, direction: Direction, chunks: AsyncIterator[bytes]
) -> AsyncIterator[bytes]:
    """Pass every chunk on unchanged: what the interceptor machinery itself costs per chunk."""
    async for chunk in chunks:
        yield chunk
