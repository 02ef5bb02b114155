"""Per-chunk cost of the interceptor machinery, without sockets.

    .venv/bin/python tests/perf_interceptor_chain.py

Drives N chunks through ``build_chain`` as the relay does, for: the source alone, one identity
interceptor nested as a plain generator, four of them, and one run ``in_own_task`` (behind
``trio.as_safe_channel``). Prints microseconds per chunk; compare the rows of one run only.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack

import trio

from uproxy_trio import Direction, Flow, Interceptor, in_own_task
from uproxy_trio._interceptor import build_chain

FLOW = Flow(1, ("192.0.2.2", 1), ("198.51.100.2", 2))
CHUNK = bytes(65536)
CHUNKS = 50_000


async def identity(
    flow: Flow, direction: Direction, chunks: AsyncIterator[bytes]
) -> AsyncIterator[bytes]:
    async for chunk in chunks:
        yield chunk


@in_own_task
async def identity_in_own_task(
    flow: Flow, direction: Direction, chunks: AsyncIterator[bytes]
) -> AsyncIterator[bytes]:
    async for chunk in chunks:
        yield chunk


async def source() -> AsyncIterator[bytes]:
    for _ in range(CHUNKS):
        yield CHUNK


async def per_chunk_us(chain: Sequence[Interceptor]) -> float:
    started = time.perf_counter()
    async with AsyncExitStack() as stack:
        stream = await build_chain(stack, FLOW, Direction.CLIENT_TO_SERVER, chain, source())
        async for _chunk in stream:
            pass
    return (time.perf_counter() - started) / CHUNKS * 1e6


async def main() -> None:
    rows = [
        ("source only", []),
        ("1 identity, nested", [identity]),
        ("4 identities, nested", [identity] * 4),
        ("1 identity, in_own_task", [identity_in_own_task]),
    ]
    results = {name: await per_chunk_us(chain) for name, chain in rows}
    base = results["source only"]
    for name, cost in results.items():
        print(f"{name:<26} {cost:7.2f} us/chunk   (+{cost - base:.2f} us over the source)")


if __name__ == "__main__":
    trio.run(main)
