"""From a toxic as Toxiproxy's API describes it (type, name, stream, toxicity, attributes) to
an interceptor, and the registries of toxic types that this looks the type up in.

Everything a caller can get wrong is refused here, before anything runs, with a one-line
``ValueError`` that names what is wrong: the control API answers it with Toxiproxy's 400.
"""

from __future__ import annotations

import inspect
import types as pytypes
from collections.abc import Callable, Mapping

from ._flow import Direction, Flow
from ._interceptor import Interceptor, directions, for_flows, picks_flows, wants
from ._toxic import (
    RNG_PARAMETER,
    FlowRandom,
    ToxicFactory,
    probability,
    seeded,
    toxic_type_name,
)
from ._toxics import TOXICS

# Toxiproxy's streams: upstream carries what the client sends, downstream what it receives.
STREAMS = {"upstream": Direction.CLIENT_TO_SERVER, "downstream": Direction.SERVER_TO_CLIENT}


def toxic_types(*factories: ToxicFactory) -> dict[str, ToxicFactory]:
    """A registry for ``make_toxic``: Toxiproxy's types (``TOXICS``) and ``factories``, each
    marked with ``toxic_type(name)``, under their names. A name taken twice is refused."""
    registry = dict(TOXICS)
    for factory in factories:
        name = toxic_type_name(factory)
        if name is None:
            raise ValueError(f"{factory!r} is not a toxic type (mark it with @toxic_type(name))")
        if registry.get(name, factory) is not factory:
            raise ValueError(f"toxic type {name!r} exists already")
        registry[name] = factory
    return registry


def make_toxic(
    type: str,
    *,
    name: str,
    stream: str = "downstream",
    toxicity: float = 1.0,
    attributes: Mapping[str, object] | None = None,
    seed: int | None = None,
    types: Mapping[str, ToxicFactory] = TOXICS,
) -> Interceptor:
    """The interceptor for one toxic: ``types[type]`` made from ``attributes``, on ``stream``
    (``"upstream"``: client to server; ``"downstream"``: server to client) only, for a
    ``toxicity`` share of the flows (0: none, 1: all), named ``name`` (``"TYPE_STREAM"`` when
    empty, as in Toxiproxy).

    Which flows it hits, and what a factory draws at random (jitter, slice sizes), is
    reproducible from ``seed``: each comes from a generator of its own per seed, toxic name,
    flow id and direction, so the outcome does not depend on the order flows come in.
    """
    factory = types.get(type) if isinstance(type, str) else None
    if factory is None:
        raise ValueError(f"unknown toxic type {type!r} (known: {', '.join(sorted(types))})")
    direction = _direction(stream)
    share = probability("toxicity", toxicity)
    if not isinstance(name, str):
        raise ValueError(f"name: {name!r} is not a string")
    name = name or f"{type}_{stream.lower()}"
    made = _call(type, factory, attributes or {}, seeded(seed, name, type))
    interceptor = _own_copy(made)
    if share < 1:
        for_flows(_picker(made, share, seeded(seed, name, "toxicity"), direction))(interceptor)
    interceptor.__name__ = interceptor.__qualname__ = name
    return directions(direction)(interceptor)


def _direction(stream: object) -> Direction:
    direction = STREAMS.get(stream.lower()) if isinstance(stream, str) else None
    if direction is None:
        raise ValueError(f"stream: {stream!r} is neither upstream nor downstream")
    return direction


def _call(
    type: str, factory: ToxicFactory, attributes: Mapping[str, object], rng: FlowRandom
) -> Interceptor:
    """``factory`` called with ``attributes`` (and ``rng``, if it takes it), every mistake in
    them as a one-line ``ValueError``."""
    parameters = inspect.signature(factory).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    known = {
        key
        for key, p in parameters.items()
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        and key != RNG_PARAMETER
    }
    for attribute in attributes:
        if not isinstance(attribute, str) or (attribute not in known and not takes_any):
            names = ", ".join(sorted(known)) or "none"
            raise ValueError(f"{type} has no attribute {attribute!r} (it has: {names})")
    extra = {RNG_PARAMETER: rng} if RNG_PARAMETER in parameters else {}
    try:
        return factory(**attributes, **extra)
    except (TypeError, ValueError) as exc:
        reason = " ".join(str(exc).split())  # one line, whatever the factory wrote
        raise ValueError(f"{type}: {reason}") from None


def _own_copy(interceptor: Interceptor) -> pytypes.FunctionType:
    """A function object of its own for ``interceptor`` (same code, same closure, same marks),
    for ``make_toxic`` to mark and name: a factory may hand out one function to every caller
    (as ``bandwidth(rate=0)`` does), and one toxic's marks must not change another's."""
    if not isinstance(interceptor, pytypes.FunctionType) or not inspect.isasyncgenfunction(
        interceptor
    ):
        raise TypeError(f"a toxic type must make an async generator function, not {interceptor!r}")
    copy = pytypes.FunctionType(
        interceptor.__code__,
        interceptor.__globals__,
        interceptor.__name__,
        interceptor.__defaults__,
        interceptor.__closure__,
    )
    copy.__kwdefaults__ = interceptor.__kwdefaults__
    copy.__module__ = interceptor.__module__
    copy.__doc__ = interceptor.__doc__
    copy.__dict__.update(interceptor.__dict__)
    return copy


def _picker(
    made: Interceptor, share: float, rng: FlowRandom, direction: Direction
) -> Callable[[Flow], bool]:
    """Whether a flow gets the toxic: a ``share`` of the flows, drawn once per flow and
    direction, among those ``made`` picks itself if its factory marked it ``for_flows``."""
    picky = picks_flows(made)

    def hit(flow: Flow) -> bool:
        if picky and not wants(made, flow):
            return False
        return rng(flow, direction).random() < share

    return hit
