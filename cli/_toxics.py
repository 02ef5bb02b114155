"""Where the control API gets its toxics: ``uproxy_trio.toxics`` (``make_toxic`` and the
``TOXICS`` registry).

Until that module lands (it is built on a branch of its own), a stand-in with Toxiproxy's
``latency`` alone keeps the API usable; it goes when the module is there.
"""

from __future__ import annotations

import importlib
import random
from collections.abc import AsyncIterator, Collection, Mapping
from typing import Any

import trio

from uproxy_trio import Direction, Flow, Interceptor, directions

from ._control import MakeToxic


def toxic_kit() -> tuple[MakeToxic, Collection[str]]:
    """``make_toxic`` and the toxic types it knows."""
    try:
        module = importlib.import_module("uproxy_trio.toxics")
    except ModuleNotFoundError:
        return _standin_make_toxic, ("latency",)
    make_toxic: MakeToxic = module.make_toxic
    return make_toxic, tuple(module.TOXICS)


def _standin_make_toxic(
    type: str,
    *,
    name: str,
    stream: str,
    toxicity: float,
    attributes: Mapping[str, Any],
    seed: int | None,
) -> Interceptor:
    if type != "latency":
        raise ValueError(f"unknown toxic type {type!r}")
    unknown = set(attributes) - {"latency", "jitter"}
    if unknown:
        raise ValueError(f"latency has no attribute {sorted(unknown)[0]!r}")
    latency, jitter = attributes.get("latency", 0), attributes.get("jitter", 0)
    for key, value in (("latency", latency), ("jitter", jitter)):
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ValueError(f"{key}: {value!r} is not a number of milliseconds")
    rng = random.Random(seed)
    way = Direction.CLIENT_TO_SERVER if stream == "upstream" else Direction.SERVER_TO_CLIENT

    @directions(way)
    async def latency_toxic(
        flow: Flow, direction: Direction, chunks: AsyncIterator[bytes]
    ) -> AsyncIterator[bytes]:
        hit = rng.random() < toxicity
        async for chunk in chunks:
            if hit:
                await trio.sleep(max(0.0, latency + rng.uniform(-jitter, jitter)) / 1000)
            yield chunk

    latency_toxic.__name__ = name
    return latency_toxic
