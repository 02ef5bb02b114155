"""The interceptor contract and how a chain of interceptors is put together.

An interceptor is an async generator function::

    async def f(
        flow: Flow, direction: Direction, chunks: AsyncIterator[bytes]
    ) -> AsyncIterator[bytes]

One generator runs per direction per flow. Chaining is plain generator nesting (each one's
output is the next one's ``chunks``): no tasks and no channels, so a chunk costs one
``__anext__`` per interceptor, and backpressure is free because nothing is read from a socket
until the outermost interceptor asks for it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack
from typing import TypeAlias

from ._flow import Direction, Flow

Interceptor: TypeAlias = Callable[[Flow, Direction, AsyncIterator[bytes]], AsyncIterator[bytes]]


def chain_for(interceptors: Sequence[Interceptor], direction: Direction) -> tuple[Interceptor, ...]:
    """The interceptors one direction passes through, nearest to its source first.

    They form an onion around the flow: the first one listed sits closest to the client, so
    client-to-server bytes meet them in the listed order and server-to-client bytes in reverse.
    """
    if direction is Direction.CLIENT_TO_SERVER:
        return tuple(interceptors)
    return tuple(reversed(interceptors))


async def build_chain(
    stack: AsyncExitStack,
    flow: Flow,
    direction: Direction,
    chain: Sequence[Interceptor],
    source: AsyncIterator[bytes],
) -> AsyncIterator[bytes]:
    """Nest ``chain`` around ``source`` and register every generator to be closed with ``stack``.

    Trio's rules for async generators want each one closed by the task that drives it, not left
    to the garbage collector: ``stack`` closes them outermost first when the direction ends,
    whatever the reason.
    """
    stream = source
    _close_with(stack, stream)
    for interceptor in chain:
        stream = interceptor(flow, direction, stream)
        _close_with(stack, stream)
    return stream


def _close_with(stack: AsyncExitStack, stream: AsyncIterator[bytes]) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        stack.push_async_callback(aclose)
