"""Interceptors set on a route while its flows run (Toxiproxy's toxics): how a direction takes
them on and lets them go mid-stream, at a chunk boundary, without losing or reordering a byte.

A direction running live interceptors reads its source through a ``LiveSegment``: a stack of
stages, one per live interceptor, the newest nearest the source. Each stage runs its
generator behind ``trio.as_safe_channel`` in a task of the flow's nursery, so that the
stages come and go independently, and a stage's timers (a toxic that resets the flow after a
while) run from when it reached the flow, whatever happens to the stages around it. What a
stage's generator raises is raised in the direction's task, where its data would have gone,
so it ends the flow as a static interceptor's exception would. The
route's static interceptors, if any, read the segment's output as their source, and never
notice a change below them.

Every stage reads through a ``_Reader``, which can be pointed elsewhere and interrupted while
it waits (a channel receive or a socket wait, both of which lose nothing when cancelled):

* **adding** a stage puts it at the bottom: the reader that was reading the source now reads
  the new stage, which reads the source;
* **removing** a stage ends its input: its generator sees the end of its chunks and flushes
  what it holds, then the reader above, on the stage's end, reads what the stage read.

When the last live interceptor goes and the route has no static one, the segment ends with
``switched`` set, and the direction goes back to the plain path.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, cast

import trio

from ._flow import Direction, Flow
from ._interceptor import Interceptor, chain_for, picks_flows, wants
from ._readiness import POKED, Readiness


class Source(Protocol):
    async def read(self) -> bytes | None:
        """The next chunk, or ``None`` at the end; losing nothing if cancelled."""
        ...


class Tap(Source, Protocol):
    async def read(self, interruptible: bool = False) -> bytes | None:
        """The next chunk, or ``None`` at the end; ``interruptible``: raises ``Interrupted``
        when poked (see ``LiveSegment.changed``)."""
        ...


class _StageOutput:
    """What a stage yields, as the reader above it sees it."""

    __slots__ = ("stage",)

    def __init__(self, stage: _Stage) -> None:
        self.stage = stage

    async def read(self) -> bytes | None:
        stage = self.stage
        assert stage.output is not None
        if not stage.finished.is_set():
            try:
                return await stage.output.receive()
            except trio.EndOfChannel:
                stage.finished.set()
        # The generator is over: once its task has closed it, its end is the reader's, or
        # what it raised is raised here, in the direction's task, as a static one's would be.
        await stage.done.wait()
        if stage.error is not None:
            raise stage.error
        return None


# The bit a change pokes, to interrupt a direction's task reading its source directly.
POKED_BITS = {Direction.CLIENT_TO_SERVER: POKED, Direction.SERVER_TO_CLIENT: POKED << 1}


class Switchable(Protocol):
    """A direction with a pump that can take live interceptors on and let them go: TCP's
    ``Way`` and UDP's ``DatagramWay``."""

    direction: Direction
    readiness: Readiness
    switching: bool
    """A change waits to be taken: the pump's next turn ends its time with the reactor, and
    the direction's task looks again."""
    segment: LiveSegment | None
    """Set while the direction runs its interceptors."""
    picked: dict[int, bool] | None
    """What the interceptors that pick their flows (``for_flows``) said of this one."""


def changed(way: Switchable) -> None:
    """The live interceptors of ``way``'s route have changed: it takes them on (or lets them
    go) at its next chunk (or datagram)."""
    way.switching = True
    segment = way.segment
    if segment is not None:
        segment.changed()
        way.readiness.poke(POKED_BITS[way.direction])
    else:
        way.readiness.release(way)  # the plain path: wake the task from the reactor


def live_picks(
    way: Switchable, flow: Flow, interceptors: Sequence[Interceptor]
) -> tuple[Interceptor, ...]:
    """Which of a route's live ``interceptors`` run on ``way``, a direction of ``flow``."""
    if not interceptors:
        return ()
    if way.picked is None:
        way.picked = {}
    return picks(flow, way.direction, interceptors, way.picked)


def running_names(
    flow: Flow,
    ways: Sequence[Switchable],
    chains: Mapping[Direction, Sequence[Interceptor]],
    live: Sequence[Interceptor],
) -> tuple[str, ...]:
    """The names of the interceptors ``flow``'s ``ways`` run now, each once, as ``flows()``
    lists them: each way's static chain, then the route's ``live`` ones it picked."""
    names: dict[str, None] = {}
    for way in ways:
        for interceptor in (*chains[way.direction], *live_picks(way, flow, live)):
            names[getattr(interceptor, "__name__", type(interceptor).__name__)] = None
    return tuple(names)


# A tap (TCP's ``_direction._Tap``, UDP's ``_udp_way._DatagramTap``) whose source never runs
# dry yields to the other tasks after this many reads in a row, as Trio's fairness asks.
FAIRNESS_READS = 16


async def until_readable(readiness: Readiness, readable: int, poked: int) -> bool:
    """Return once ``readable`` may be set (true if that took a wait); raise ``Interrupted``
    if ``poked`` is set first (``poked`` 0: never)."""
    waited = False
    while True:
        bits = readiness.bits
        if bits & poked:
            readiness.clear(poked)
            raise Interrupted
        if bits & readable:
            return waited
        await readiness.wait(readable | poked)
        waited = True


class _Gated:
    """The direction's source, closed while a change waits to be taken: a chunk that arrives
    just after a change goes the new way, not the old."""

    __slots__ = ("closed", "source")

    def __init__(self, source: Source) -> None:
        self.source = source
        self.closed: trio.Event | None = None

    async def read(self) -> bytes | None:
        while self.closed is not None:
            await self.closed.wait()
        return await self.source.read()

    def close(self) -> None:
        if self.closed is None:
            self.closed = trio.Event()

    def open(self) -> None:
        closed, self.closed = self.closed, None
        if closed is not None:
            closed.set()


class Interrupted(Exception):
    """A wait was interrupted by a change: look again. Never leaves the direction's code."""


class _Reader:
    """Reads a source for a stage (or for the segment's output): can be pointed at another
    source, told to end, or interrupted while it waits."""

    __slots__ = ("below", "ending", "waiting")

    def __init__(self, below: Source) -> None:
        self.below = below
        self.ending = False
        self.waiting: trio.CancelScope | None = None

    async def read(self) -> bytes | None:
        """The next chunk; ``None`` at the end (or once told to end). Raises ``Interrupted``
        when interrupted, after which the caller may look again."""
        while True:
            if self.ending:
                return None
            below = self.below
            with trio.CancelScope() as waiting:
                self.waiting = waiting
                data = await below.read()
            self.waiting = None
            if waiting.cancelled_caught:
                raise Interrupted
            if data is None and isinstance(below, _StageOutput) and below.stage.removed:
                # A stage taken away has flushed and ended: read what it was reading (the
                # caller looks again first: the direction may be leaving the live path).
                self.below = below.stage.reader.below
                raise Interrupted
            return data

    def interrupt(self) -> None:
        if self.waiting is not None:
            self.waiting.cancel()


class _Inlet:
    """A stage's ``chunks``: its reader, as the async iterator an interceptor takes."""

    __slots__ = ("reader",)

    def __init__(self, reader: _Reader) -> None:
        self.reader = reader

    def __aiter__(self) -> _Inlet:
        return self

    async def __anext__(self) -> bytes:
        while True:
            try:
                data = await self.reader.read()
            except Interrupted:
                continue  # re-pointed, or told to end: look again
            if data is None:
                raise StopAsyncIteration
            return data


class _Stage:
    """One live interceptor running on one direction of one flow."""

    __slots__ = (
        "done",
        "error",
        "finished",
        "interceptor",
        "output",
        "reader",
        "removed",
        "scope",
    )

    def __init__(self, interceptor: Interceptor, below: Source) -> None:
        self.interceptor = interceptor
        self.reader = _Reader(below)
        self.output: trio.abc.ReceiveChannel[bytes] | None = None
        self.removed = False
        self.finished = trio.Event()  # the reader above has seen its end
        self.done = trio.Event()  # and its generator is closed
        self.error: Exception | None = None  # what it raised, if it did
        self.scope = trio.CancelScope()  # cancelled if its direction ends with it running

    async def run(
        self, flow: Flow, direction: Direction, task_status: trio.TaskStatus[None]
    ) -> None:
        safe = trio.as_safe_channel(cast(Any, self.interceptor))
        try:
            with self.scope:
                async with safe(flow, direction, _Inlet(self.reader)) as output:
                    self.output = output
                    task_status.started()
                    await self.finished.wait()
        except Exception as exc:  # noqa: BLE001 - handed to the reader, in the direction's task
            self.error = exc
        self.done.set()

    def remove(self) -> None:
        """End this stage's input: its generator flushes and ends."""
        self.removed = True
        self.reader.ending = True
        self.reader.interrupt()


class LiveSegment:
    """A direction's live interceptors, between its source and its static chain (or sink).

    ``wanted`` says which live interceptors the direction should run now (in the order they
    were set); ``keep_going`` whether the direction stays on the interceptor path when none
    is left (it has static interceptors).
    """

    def __init__(
        self,
        flow: Flow,
        tap: Tap,
        direction: Direction,
        wanted: Callable[[], Sequence[Interceptor]],
        keep_going: bool,
        nursery: trio.Nursery,
    ) -> None:
        self._flow = flow
        self._direction = direction
        self._tap = tap
        self._source = _Gated(tap)
        self._wanted = wanted
        self._keep_going = keep_going
        self._nursery = nursery
        self._stages: list[_Stage] = []  # nearest the source first
        self._top = _Reader(self._source)
        self._changed = True
        self.switched = False
        """The segment ended because nothing intercepts the direction any more, not at an EOF."""

    def __aiter__(self) -> LiveSegment:
        return self

    def close(self) -> None:
        """The direction is over (or leaves this segment): end the stages still running."""
        for stage in self._stages:
            stage.scope.cancel()

    def changed(self) -> None:
        """The wanted interceptors may have changed: look at the next chunk boundary.

        The caller also pokes the tap, which the segment reads directly while no live
        interceptor runs (that read is the direction's hot path, so it waits on a readiness
        bit rather than in a cancel scope of its own)."""
        self._changed = True
        source = self._source
        source.close()
        self._top.interrupt()
        for stage in self._stages:  # a reader waiting on the source goes back to the gate
            if stage.reader.below is source:
                stage.reader.interrupt()

    async def __anext__(self) -> bytes:
        while True:
            if self._changed:
                self._changed = False
                await self._reconcile()
                self._source.open()
            if not self._stages and self._top.below is self._source:
                # No live interceptor: the route's own read the source directly.
                if not self._keep_going:
                    self.switched = True
                    raise StopAsyncIteration
                try:
                    data = await self._tap.read(interruptible=True)
                except Interrupted:
                    continue
            else:
                try:
                    data = await self._top.read()
                except Interrupted:
                    self._stages = [stage for stage in self._stages if not stage.done.is_set()]
                    continue
            if data is None:
                raise StopAsyncIteration
            return data

    async def _reconcile(self) -> None:
        wanted = list(self._wanted())
        running = [stage for stage in self._stages if not stage.removed]
        for stage in running:
            if stage.interceptor not in wanted:
                stage.remove()
        present = {id(stage.interceptor) for stage in running}
        for interceptor in wanted:
            if id(interceptor) not in present:
                await self._add(interceptor)

    async def _add(self, interceptor: Interceptor) -> None:
        """Put a stage for ``interceptor`` between the source and whoever reads it now."""
        source = self._source
        stage = _Stage(interceptor, source)
        await self._nursery.start(stage.run, self._flow, self._direction)
        output = _StageOutput(stage)
        for reader in (self._top, *(s.reader for s in self._stages)):
            if reader.below is source:
                reader.below = output
                reader.interrupt()
        self._stages.insert(0, stage)


def picks(
    flow: Flow,
    direction: Direction,
    interceptors: Sequence[Interceptor],
    picked: dict[int, bool],
) -> tuple[Interceptor, ...]:
    """Which of a route's live ``interceptors`` run on ``direction`` of ``flow``.

    An interceptor that picks its flows (``for_flows``) is asked once, when it first reaches
    the direction; ``picked`` keeps the answers (by the interceptor's id) for as long as the
    direction runs.
    """
    mine = []
    for interceptor in chain_for(interceptors, direction):
        if picks_flows(interceptor):
            key = id(interceptor)
            if key not in picked:
                picked[key] = wants(interceptor, flow)
            if not picked[key]:
                continue
        mine.append(interceptor)
    return tuple(mine)
