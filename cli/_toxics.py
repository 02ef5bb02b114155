"""The toxic types the control API knows: Toxiproxy's (``uproxy_trio.toxics.TOXICS``) and the
user's own, ``--toxic-type SPEC`` (a factory marked ``@uproxy_trio.toxics.toxic_type(name)``,
loaded as ``--interceptor`` loads its SPECs)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

from uproxy_trio.toxics import make_toxic, toxic_type_name, toxic_types

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
    factories = []
    for spec in specs:
        factory = load_named(spec)
        if toxic_type_name(factory) is None:
            raise ValueError(
                f"{spec!r} is not a toxic type (mark it @uproxy_trio.toxics.toxic_type(name))"
            )
        factories.append(factory)
    registry = toxic_types(*factories)
    return ToxicKit(partial(make_toxic, types=registry), tuple(registry))
