"""``uproxy serve``: run the proxy until SIGINT or SIGTERM."""

from __future__ import annotations

import logging
import signal
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVarTuple

import trio

import uproxy_trio
from uproxy_trio import Address, Interceptor, format_address

LOGGER = logging.getLogger("uproxy")

Args = TypeVarTuple("Args")


def run_unwrapped(async_fn: Callable[[*Args], Awaitable[object]], *args: *Args) -> None:
    """``trio.run``, but a failure that is alone in its nursery's exception group is raised bare,
    so the command line can report it in one line."""
    try:
        trio.run(async_fn, *args)
    except BaseExceptionGroup as group:
        leaf = _only_leaf(group)
        if leaf is None:
            raise
        raise leaf from None


def _only_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    if len(group.exceptions) != 1:
        return None
    (inner,) = group.exceptions
    return _only_leaf(inner) if isinstance(inner, BaseExceptionGroup) else inner


async def run_proxy(
    listen: Sequence[Address],
    interceptors: Sequence[Interceptor],
    connect_timeout: float,
) -> None:
    """Serve until the first SIGINT or SIGTERM, then stop.

    The signal receiver is opened before the listeners, so a signal that arrives while they
    are being bound still stops the proxy cleanly instead of raising KeyboardInterrupt.
    """
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(
                lambda task_status: uproxy_trio.serve(
                    listen,
                    interceptors=interceptors,
                    connect_timeout=connect_timeout,
                    task_status=task_status,
                )
            )
            LOGGER.info("ready on %s", ", ".join(format_address(a) for a in bound))
            async for signum in signals:
                LOGGER.info("%s received: stopping", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break
