"""Where the control API gets its toxics: ``uproxy_trio.toxics`` (``make_toxic``, the
``TOXICS`` registry) and the user's own toxic types, ``--toxic-type SPEC`` (a factory marked
``@uproxy_trio.toxics.toxic_type(name)``, loaded as ``--interceptor`` loads its SPECs).

Until that module lands (it is built on a branch of its own), a stand-in with Toxiproxy's
``latency`` alone keeps the API usable; it goes when the module is there.
"""

from __future__ import annotations

import importlib
import random
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import trio

from uproxy_trio import Direction, Flow, Interceptor, directions

from ._control import MakeToxic
from ._spec import load_named


@dataclass(frozen=True)
class ToxicKit:
    """``make_toxic`` bound to a registry, and the names of the types in it."""

    make: MakeToxic
    types: tuple[str, ...]


def toxic_kit(specs: Sequence[str] = ()) -> ToxicKit:
    """Toxiproxy's toxic types and the ones ``specs`` name; ``ValueError`` in one line for a
    SPEC that does not load or is not a toxic type, or a type name taken twice."""
    try:
        module: Any = importlib.import_module("uproxy_trio.toxics")
    except ModuleNotFoundError:
        if specs:
            raise ValueError("toxic types of your own need uproxy_trio.toxics") from None
        return ToxicKit(_standin_make_toxic, ("latency",))
    factories = []
    for spec in specs:
        factory = load_named(spec)
        if module.toxic_type_name(factory) is None:
            raise ValueError(
                f"{spec!r} is not a toxic type (mark it @uproxy_trio.toxics.toxic_type(name))"
            )
        factories.append(factory)
    registry = module.toxic_types(*factories)
    return ToxicKit(partial(module.make_toxic, types=registry), tuple(registry))


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
