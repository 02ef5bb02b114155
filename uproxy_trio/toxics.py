"""Toxiproxy's toxics as interceptors, and the means to add toxic types of your own.

``make_toxic`` builds one toxic as Toxiproxy's API describes it (type, name, stream,
toxicity, attributes); the factories (``latency``, ``bandwidth``, ...) also work alone, on
both directions of every flow, from Python or ``--interceptor 'uproxy_trio.toxics:latency(
latency=300)'``. A toxic type of your own is a factory marked with ``toxic_type(name)``;
``toxic_types`` makes a registry that knows it, for ``make_toxic(..., types=...)``.
"""

from ._make_toxic import STREAMS, make_toxic, toxic_types
from ._toxic import UNSEEDED, FlowRandom, ToxicFactory, seeded, toxic_type, toxic_type_name
from ._toxics import (
    TOXICS,
    bandwidth,
    latency,
    limit_data,
    reset_peer,
    slicer,
    slow_close,
    timeout,
)

__all__ = [
    "STREAMS",
    "TOXICS",
    "UNSEEDED",
    "FlowRandom",
    "ToxicFactory",
    "bandwidth",
    "latency",
    "limit_data",
    "make_toxic",
    "reset_peer",
    "seeded",
    "slicer",
    "slow_close",
    "timeout",
    "toxic_type",
    "toxic_type_name",
    "toxic_types",
]
