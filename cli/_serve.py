"""``uproxy serve``: run the proxy until signalled, then drain it."""

from __future__ import annotations

import logging
import resource
import signal
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVarTuple

import trio

from uproxy_trio import Address, Proxy, format_address

LOGGER = logging.getLogger("uproxy")

Args = TypeVarTuple("Args")

# Exit codes of `uproxy serve` after a signal: every flow finished within the grace period,
# or some had to be reset.
EXIT_DRAINED = 0
EXIT_FLOWS_RESET = 1


def run_unwrapped(async_fn: Callable[[*Args], Awaitable[int]], *args: *Args) -> int:
    """``trio.run``, but a failure that is alone in its nursery's exception group is raised bare,
    so the command line can report it in one line."""
    try:
        return trio.run(async_fn, *args)
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


def raise_fd_limit() -> None:
    """Every flow costs two descriptors; the usual soft limit of 1024 would cap a proxy at
    about 500 flows although the hard limit allows far more."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        LOGGER.info("open-file limit raised from %d to %s", soft, hard)


async def run_proxy(
    proxy: Proxy,
    listen: Sequence[Address],
    grace: float,
    after_bind: Callable[[], None],
) -> int:
    """Serve until SIGINT or SIGTERM, then drain: no new flows, ``grace`` seconds for those in
    flight, then reset the rest. A second signal resets them at once.

    The signal receiver is opened before the listeners, so a signal that arrives while they
    are being bound still stops the proxy cleanly instead of raising KeyboardInterrupt.
    """
    flows_reset = 0
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(proxy.serve, listen)
            after_bind()
            LOGGER.info("ready on %s", ", ".join(format_address(a) for a in bound))
            first = await anext(aiter(signals))
            LOGGER.info(
                "%s received: draining %d flows for up to %ss (a second signal resets them)",
                signal.Signals(first).name,
                proxy.active_flows,
                grace,
            )
            with trio.CancelScope() as waiting_for_second:

                async def drain() -> None:
                    nonlocal flows_reset
                    flows_reset = await proxy.drain(grace)
                    waiting_for_second.cancel()

                nursery.start_soon(drain)
                async for second in signals:
                    flows_reset = proxy.active_flows
                    LOGGER.warning(
                        "%s received again: resetting %d flows",
                        signal.Signals(second).name,
                        flows_reset,
                    )
                    nursery.cancel_scope.cancel()
                    break
    if flows_reset:
        LOGGER.warning("stopped; %d flows were reset", flows_reset)
        return EXIT_FLOWS_RESET
    LOGGER.info("stopped; every flow finished")
    return EXIT_DRAINED
