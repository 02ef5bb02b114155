"""The interceptor contract and how a chain of interceptors is put together.

An interceptor is an async generator function::

    async def f(
        flow: Flow, direction: Direction, chunks: AsyncIterator[bytes]
    ) -> AsyncIterator[bytes]

One generator runs per direction per flow. Chaining is plain generator nesting (each one's
output is the next one's ``chunks``): no tasks and no channels, so a chunk costs one
``__anext__`` per interceptor, and backpressure is free because nothing is read from a socket
until the outermost interceptor asks for it.

Three markers change how one interceptor is driven, without changing its signature:
``directions`` restricts it to one way (the other way then pays nothing for it, and keeps the
zero-copy path), ``for_flows`` to the flows a predicate picks (likewise), and ``in_own_task``
runs it behind ``trio.as_safe_channel`` so its body may hold a nursery or a cancel scope across
``yield``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from typing import Any, TypeAlias, TypeVar, cast

import trio

from ._flow import Direction, Flow

Interceptor: TypeAlias = Callable[[Flow, Direction, AsyncIterator[bytes]], AsyncIterator[bytes]]
InterceptorT = TypeVar("InterceptorT", bound=Interceptor)

_DIRECTIONS_ATTR = "__uproxy_directions__"
_OWN_TASK_ATTR = "__uproxy_own_task__"
_FOR_FLOWS_ATTR = "__uproxy_for_flows__"


def directions(*wanted: Direction | str) -> Callable[[InterceptorT], InterceptorT]:
    """Mark an interceptor to run only for ``wanted`` directions (values or their names, such
    as ``"client_to_server"``); the others pass through untouched and unpaid for."""
    chosen = frozenset(_as_direction(item) for item in wanted)
    if not chosen:
        raise ValueError("directions() needs at least one direction")

    def mark(interceptor: InterceptorT) -> InterceptorT:
        setattr(interceptor, _DIRECTIONS_ATTR, chosen)
        return interceptor

    return mark


def for_flows(wanted: Callable[[Flow], bool]) -> Callable[[InterceptorT], InterceptorT]:
    """Mark an interceptor to run only on the flows for which ``wanted(flow)`` is true; the
    others pass through untouched and unpaid for.

    ``wanted`` is asked once per flow and direction, when the interceptor first reaches it, so
    a random choice (a fault that hits a given share of the flows) stays put for the flow.
    """

    def mark(interceptor: InterceptorT) -> InterceptorT:
        setattr(interceptor, _FOR_FLOWS_ATTR, wanted)
        return interceptor

    return mark


def picks_flows(interceptor: Interceptor) -> bool:
    """Whether ``interceptor`` was marked with ``for_flows``."""
    return hasattr(interceptor, _FOR_FLOWS_ATTR)


def wants(interceptor: Interceptor, flow: Flow) -> bool:
    """Whether ``interceptor`` runs on ``flow`` (always, unless marked with ``for_flows``)."""
    wanted: Callable[[Flow], bool] | None = getattr(interceptor, _FOR_FLOWS_ATTR, None)
    return wanted is None or bool(wanted(flow))


def in_own_task(interceptor: InterceptorT) -> InterceptorT:
    """Mark an interceptor to run in a task of its own, behind ``trio.as_safe_channel``.

    Plain nesting forbids what Trio forbids in any async generator: a ``yield`` inside a
    nursery, ``move_on_after`` or ``fail_after``. An interceptor that needs a nursery across
    ``yield`` (a helper task) takes this marker instead. A cancel scope that expires while the
    generator waits at a ``yield`` still ends it there, as a clean end of its stream, so a
    timer belongs in a helper task or around the reads alone. It costs a task switch and a
    channel hand-off per chunk (see "Interceptor cost" in the README), so it is opt-in.
    """
    setattr(interceptor, _OWN_TASK_ATTR, True)
    return interceptor


def _as_direction(item: Direction | str) -> Direction:
    if isinstance(item, Direction):
        return item
    try:
        return Direction(item.lower())
    except ValueError:
        names = ", ".join(direction.value for direction in Direction)
        raise ValueError(f"{item!r} is not a direction ({names})") from None


def chain_for(interceptors: Sequence[Interceptor], direction: Direction) -> tuple[Interceptor, ...]:
    """The interceptors one direction passes through, nearest to its source first.

    They form an onion around the flow: the first one listed sits closest to the client, so
    client-to-server bytes meet them in the listed order and server-to-client bytes in reverse.
    Interceptors marked for the other direction only are left out.
    """
    ordered = interceptors if direction is Direction.CLIENT_TO_SERVER else interceptors[::-1]
    return tuple(
        interceptor
        for interceptor in ordered
        if direction in getattr(interceptor, _DIRECTIONS_ATTR, Direction)
    )


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
        if getattr(interceptor, _OWN_TASK_ATTR, False):
            safe = trio.as_safe_channel(cast(Any, interceptor))
            channel = await stack.enter_async_context(safe(flow, direction, stream))
            stream = cast(AsyncIterator[bytes], channel)
        else:
            stream = interceptor(flow, direction, stream)
            _close_with(stack, stream)
    return stream


async def run_chain(
    flow: Flow,
    direction: Direction,
    chain: Sequence[Interceptor],
    source: AsyncIterator[bytes],
    deliver: Callable[[bytes], Awaitable[bool]],
) -> bool:
    """Drive one direction's ``chain`` over ``source`` to its end, handing every chunk it
    yields to ``deliver``; false as soon as ``deliver`` says the sink is gone.

    Empty chunks are not delivered: an interceptor may yield ``b""`` to say "nothing now".
    Every generator is closed when this returns or raises, whatever the reason.
    """
    async with AsyncExitStack() as generators:
        chunks = await build_chain(generators, flow, direction, chain, source)
        async for chunk in chunks:
            if chunk and not await deliver(chunk):
                return False
    return True


def _close_with(stack: AsyncExitStack, stream: AsyncIterator[bytes]) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        stack.push_async_callback(aclose)


_FACTORY_ATTR = "__uproxy_interceptor_factory__"
FactoryT = TypeVar("FactoryT", bound=Callable[..., Interceptor])


def interceptor_factory(factory: FactoryT) -> FactoryT:
    """Mark a function that makes interceptors from its arguments, so that ``uproxy serve
    --interceptor 'module:factory(ARGS)'`` may call it.

    A SPEC is typed by whoever starts the proxy, and ``name(ARGS)`` calls ``name``: the
    command line calls only what carries this mark, and decides that before calling
    anything, so ``os:system("...")`` is refused without running. The arguments are Python
    literals only (``ast.literal_eval``); nothing in a SPEC is evaluated.
    """
    setattr(factory, _FACTORY_ATTR, True)
    return factory


def is_interceptor_factory(candidate: object) -> bool:
    """Whether ``candidate`` was marked with ``interceptor_factory``."""
    return getattr(candidate, _FACTORY_ATTR, False) is True
