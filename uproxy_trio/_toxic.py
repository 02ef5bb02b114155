"""What a toxic is: a named type of fault, made from Toxiproxy-style attributes.

A toxic type is a factory marked with ``toxic_type(name)``: called with the toxic's
attributes as keyword arguments (Toxiproxy's names and units), it returns an ``Interceptor``
that works on both directions of every flow. ``make_toxic`` then narrows that interceptor to
one stream and to a share of the flows, and names it.

A factory that draws random numbers (jitter, slice sizes) takes a keyword argument ``rng``: a
``FlowRandom`` that gives each flow and direction a ``random.Random`` of its own. Seeded, it
is derived from the seed, the toxic's name, the flow's id and the direction alone, so what a
flow gets does not depend on which flows came first or how the tasks were scheduled.

Attribute checks live here too, so that every toxic refuses bad input with the same kind of
one-line ``ValueError`` naming the attribute (the control API turns it into a 400).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from typing import TypeAlias, TypeVar

from ._flow import Direction, Flow
from ._interceptor import Interceptor, interceptor_factory

ToxicFactory: TypeAlias = Callable[..., Interceptor]
ToxicFactoryT = TypeVar("ToxicFactoryT", bound=ToxicFactory)

FlowRandom: TypeAlias = Callable[[Flow, Direction], random.Random]
"""Gives one flow and direction its own random number generator."""

RNG_PARAMETER = "rng"
"""The keyword argument through which ``make_toxic`` hands a factory its ``FlowRandom``."""

_TYPE_ATTR = "__uproxy_toxic_type__"
# Toxiproxy's type names are words with underscores; dashes and dots do no harm in a URL or a
# config file either.
_TYPE_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def toxic_type(name: str) -> Callable[[ToxicFactoryT], ToxicFactoryT]:
    """Mark a factory as the toxic type ``name``.

    The factory takes the toxic's attributes as keyword arguments with defaults (Toxiproxy
    leaves a missing attribute at zero), checks them with one-line ``ValueError``s that name
    the attribute, and returns a new interceptor on every call. It may also take ``rng`` (see
    ``FlowRandom``). The mark makes it an ``interceptor_factory`` too, so ``--interceptor
    'module:name(attribute=...)'`` can use it as a plain interceptor on both directions.

    Marking registers nothing anywhere: pass the factory to ``toxic_types`` to get a registry
    that knows it (the config file's ``toxic_type`` list and ``--toxic-type`` do exactly that).
    """
    if not isinstance(name, str) or not _TYPE_NAME.fullmatch(name):
        raise ValueError(f"toxic type name {name!r}: use letters, digits, '_', '.' or '-'")

    def mark(factory: ToxicFactoryT) -> ToxicFactoryT:
        setattr(factory, _TYPE_ATTR, name)
        return interceptor_factory(factory)

    return mark


def toxic_type_name(candidate: object) -> str | None:
    """The name ``candidate`` was marked with by ``toxic_type``, or ``None``."""
    name = getattr(candidate, _TYPE_ATTR, None)
    return name if isinstance(name, str) else None


def seeded(seed: int | None, *labels: str) -> FlowRandom:
    """A ``FlowRandom`` for the given ``labels`` (a toxic's name, and what the numbers are
    for): reproducible from ``seed``, or fresh from the system's entropy when it is ``None``."""
    if seed is None:
        return _unseeded
    prefix = "\0".join((str(seed), *labels))

    def for_flow(flow: Flow, direction: Direction) -> random.Random:
        # A string seed goes through SHA-512 in Random.seed: the same on every run and every
        # machine, unlike hash().
        return random.Random(f"{prefix}\0{flow.id}\0{direction.value}")

    return for_flow


def _unseeded(flow: Flow, direction: Direction) -> random.Random:
    return random.Random()


UNSEEDED: FlowRandom = _unseeded
"""The default ``rng`` of the built-in factories: different on every run."""


# -- attribute checks ---------------------------------------------------------------------------


def whole(attribute: str, value: object, unit: str, minimum: int = 0) -> int:
    """``value`` as an attribute holding a whole number of ``unit`` (Toxiproxy's are
    integers: a fraction is refused as its JSON decoder refuses it), at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{attribute}: {value!r} is not a whole number of {unit}")
    if value < minimum:
        least = "negative" if minimum == 0 else f"less than {minimum}"
        raise ValueError(f"{attribute}: {value} {unit} is {least}")
    return value


def probability(attribute: str, value: object) -> float:
    """``value`` as a probability, from 0 to 1."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{attribute}: {value!r} is not a number")
    if not 0 <= value <= 1:  # NaN fails this too
        raise ValueError(f"{attribute}: {value} is not between 0 and 1")
    return float(value)


def seconds_from_ms(milliseconds: int) -> float:
    return milliseconds / 1000
