"""The data path, top to bottom: accept → connect out → a nursery with two relay tasks → close.

Each accepted connection gets a task (``_run_flow``) that connects out from the client's own
address and opens the flow's nursery; its cancel scope is how the flow is torn down, whatever
the reason: the connect timeout (the scope's deadline), the idle timeout and the end of the
grace period (the sweep and ``drain`` cancel it), a reset on either side (the relay task that
saw it cancels it). What a flow does (its interceptor chains, its timeouts) is its route's
``_Plan``, chosen once when the flow starts; a flow no route takes has the proxy's own. In the
nursery run two relay tasks, one per direction (``relay_direction``). A direction that no
interceptor touches hands its pump to the reactor and sleeps until it is over; one with
interceptors drives its chain from its task. Either way the task itself then does the
end-of-direction work: it passes an EOF on as a FIN, or decides that the flow is reset
(``FlowEnding``) and cancels the scope. Back in ``_run_flow``, both sockets close: with a FIN,
or with a RST when the flow did not end cleanly.

Sockets are plain non-blocking sockets, registered once with the proxy's ``Reactor`` (an
edge-triggered epoll): a read or write is tried at once and a task only waits when the kernel
says it would block, so a request and its response cost the relay four system calls and no
trip through the scheduler.
"""

from __future__ import annotations

import errno
import functools
import itertools
import logging
import math
import os
import socket
from collections.abc import Mapping, Sequence
from contextlib import ExitStack

import trio

from ._address import Address, format_address, from_sockaddr
from ._datagram import open_datagram_listener
from ._direction import SharedBuffers, Way, both_ways
from ._ending import DirectionEnd, EndKind, FlowEnding, Stop
from ._events import (
    EventSink,
    FlowClosed,
    FlowEvent,
    FlowOpened,
    FlowRefused,
    HalfClosed,
    InterceptorFailed,
    UpstreamConnected,
    UpstreamFailed,
    log_event,
)
from ._flow import Direction, Flow, FlowInfo
from ._forward import Forward, open_forward_listener, open_upstream
from ._interceptor import Interceptor, chain_for, picks_flows, wants
from ._live import changed, live_picks, running_names
from ._readiness import READABLE, WRITABLE, Reactor, Readiness, Side, bit
from ._routes import Route, Routes
from ._splice import SPLICE_AVAILABLE, PipePool
from ._transparent import (
    ConnectFailed,
    ConnectFailure,
    connect_out,
    is_own_listener,
    open_outgoing,
    open_transparent_listener,
    reset,
)
from ._udp import DEFAULT_MAX_UDP_SESSIONS, DEFAULT_UDP_IDLE_TIMEOUT_S, UdpSessions

# Errors accept(2) returns when the host is short of descriptors or memory: back off and
# retry, since the flows in flight will give some back.
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
ACCEPT_RETRY_S = 0.1
# Errors accept(2) returns for one connection that went wrong before we took it: Linux passes
# the new socket's pending network error on (accept(2), "Error handling"), a firewall can
# refuse it (EPERM), a client can abort it. They concern that connection only: log and go on.
ACCEPT_CONNECTION_ERRNOS = frozenset(
    {
        errno.ECONNABORTED,
        errno.EPERM,
        errno.EPROTO,
        errno.ENETDOWN,
        errno.ENOPROTOOPT,
        errno.EHOSTDOWN,
        errno.ENONET,
        errno.EHOSTUNREACH,
        errno.EOPNOTSUPP,
        errno.ENETUNREACH,
        errno.ETIMEDOUT,
        errno.ECONNRESET,
    }
)
# Connections taken per wake-up of an accept loop before it yields to the flows.
ACCEPT_BATCH = 64

# A fresh client socket can take bytes, and has most likely sent its first ones already.
_CLIENT_READY = bit(Side.CLIENT, READABLE) | bit(Side.CLIENT, WRITABLE)

DEFAULT_CONNECT_TIMEOUT_S = 10.0

# Task names, given rather than derived from the function (Trio formats a new string per task
# otherwise: 250 bytes for every idle flow).
_FLOW_TASK = "uproxy flow"
_RELAY_TASK = "uproxy relay"

LOGGER = logging.getLogger("uproxy_trio")

_NO_LIVE_CHAINS: Mapping[str | None, Sequence[Interceptor]] = {}


class _Plan:
    """What a flow does, worked out once per route (or once for the flows no route takes),
    never per flow: its chain each way and its timeouts."""

    __slots__ = ("chains", "connect_timeout", "idle_timeout", "picky", "route")

    def __init__(
        self,
        route: str | None,
        interceptors: Sequence[Interceptor],
        connect_timeout: float,
        idle_timeout: float | None,
    ) -> None:
        self.route = route
        self.chains = {direction: chain_for(interceptors, direction) for direction in Direction}
        # Some interceptors run only on the flows they pick (``for_flows``): then each flow's
        # chains are its own, else every flow shares the plan's.
        self.picky = any(picks_flows(interceptor) for interceptor in interceptors)
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout

    def chains_for(self, flow: Flow) -> dict[Direction, tuple[Interceptor, ...]]:
        """``flow``'s chain each way: the plan's, less what picks other flows."""
        if not self.picky:
            return self.chains
        return {
            direction: tuple(interceptor for interceptor in chain if wants(interceptor, flow))
            for direction, chain in self.chains.items()
        }


class _LiveFlow:
    """A flow in flight, as the metrics, the sweep, ``drain`` and ``flows`` see it: its two
    directions (for their byte counts), how it is ending, the cancel scope that tears it down,
    its plan (the sweep reads its idle timeout there), and its chains."""

    __slots__ = ("chains", "ending", "flow", "intercepted", "nursery", "plan", "started", "ways")

    def __init__(
        self, flow: Flow, started: float, nursery: trio.Nursery, ending: FlowEnding, plan: _Plan
    ) -> None:
        self.flow = flow
        self.started = started
        self.nursery = nursery  # its two relay tasks, and the tasks of its live interceptors
        self.ending = ending
        self.plan = plan
        self.ways: tuple[Way, Way] | None = None  # None while connecting
        self.chains = plan.chains
        self.intercepted = False  # whether an interceptor has run on it

    def info(self, now: float, live_chains: Sequence[Interceptor]) -> FlowInfo:
        ways = self.ways or ()
        names = running_names(self.flow, ways, self.chains, live_chains)
        written = [way.written for way in ways] or [0, 0]
        return FlowInfo(
            self.flow, self.plan.route, names, written[0], written[1], now - self.started
        )

    @property
    def connecting(self) -> bool:
        return self.ways is None

    def bytes_read(self) -> int:
        return sum(way.read for way in self.ways) if self.ways is not None else 0

    def bytes_acknowledged(self) -> int:
        """What the peers have acknowledged: it moves while a slow reader drains a full send
        buffer and nothing is read. Two ioctls, so asked only when reads have stopped."""
        return sum(way.acknowledged() for way in self.ways) if self.ways is not None else 0

    def stop(self, why: Stop) -> None:
        """End the flow now, with a reset, wherever its tasks wait (unless it is over)."""
        if self.ending.stop(why):
            self.nursery.cancel_scope.cancel()


class _ForwardRun:
    """A forward listener while it runs."""

    __slots__ = ("address", "forward", "listener", "plan", "scope")

    def __init__(
        self, forward: Forward, address: Address, plan: _Plan, listener: socket.socket
    ) -> None:
        self.forward = forward
        self.address = address
        self.plan = plan
        self.listener = listener
        self.scope = trio.CancelScope()


class _Serving:
    """What ``serve`` runs the flows in, for forward listeners started while it runs."""

    __slots__ = ("acceptors", "flows", "reactor")

    def __init__(self, reactor: Reactor, flows: trio.Nursery, acceptors: trio.Nursery) -> None:
        self.reactor = reactor
        self.flows = flows
        self.acceptors = acceptors


class Proxy:
    """A transparent proxy: its options, its listeners, and the flows it has in flight.

    ``serve`` runs it; ``drain`` stops it gently (no new flows, a grace period for the ones in
    flight, then a reset for the rest). A ``Proxy`` serves once.

    ``routes`` say what happens to the flows they take (``set_routes`` replaces them while
    the proxy runs); ``interceptors`` and the timeouts are for the flows no route takes, and
    the timeouts also for a route that leaves its own unset. ``forwards`` are plain listeners
    started beside the transparent ones (``add_forward`` starts more while it runs).

    While it runs, a route's interceptors can be changed for its flows in flight too
    (``set_live_interceptors``: Toxiproxy's toxics), a route disabled (``set_enabled``), and
    the flows listed (``flows``) and reset one by one (``reset_flow``).

    UDP sessions (``serve(udp_listen=...)``) send the datagrams they find queued in runs, one
    segmented send (GSO) each; ``udp_gso=False`` sends every datagram on its own, so that
    capture and queueing on this host's egress see datagrams rather than runs.
    """

    def __init__(
        self,
        *,
        routes: Routes | None = None,
        interceptors: Sequence[Interceptor] = (),
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
        idle_timeout: float | None = None,
        max_flows: int | None = None,
        reuse_port: bool = False,
        source_port: str = "keep",
        forwards: Sequence[Forward] = (),
        on_event: EventSink = log_event,
        udp_idle_timeout: float = DEFAULT_UDP_IDLE_TIMEOUT_S,
        max_udp_sessions: int = DEFAULT_MAX_UDP_SESSIONS,
        udp_gso: bool = True,
    ) -> None:
        if max_flows is not None and max_flows < 1:
            raise ValueError("max_flows must be at least 1")
        if connect_timeout <= 0 or (idle_timeout is not None and idle_timeout <= 0):
            raise ValueError("connect_timeout and idle_timeout must be positive")
        if source_port not in ("keep", "ephemeral"):
            raise ValueError("source_port must be 'keep' or 'ephemeral'")
        # A flow's chains and timeouts are the same as every other flow's on its route:
        # worked out once per route, here and in ``set_routes``.
        self._default = _Plan(None, interceptors, connect_timeout, idle_timeout)
        self._routes: tuple[Routes, tuple[_Plan, ...]] | None = None
        self._shortest_idle = math.inf  # of the default and of the routes now in the table
        self._idle_timeouts_changed = trio.Event()
        self._reuse_port = reuse_port
        self._keep_port = source_port == "keep"
        self._slots = trio.Semaphore(max_flows) if max_flows is not None else None
        self._emit = _safe_sink(on_event)
        self._flow_ids = itertools.count(1)
        self._listening: list[Address] = []
        self._accepting = trio.CancelScope()
        self._flows_scope: trio.CancelScope | None = None
        self._active = 0
        self._draining = False
        self._drained = trio.Event()
        self._started = False
        self._pipes = PipePool() if SPLICE_AVAILABLE else None
        self._shared = SharedBuffers(self._pipes)
        self._closed_bytes = dict.fromkeys(Direction, 0)
        self._live: dict[int, _LiveFlow] = {}
        # Interceptors set on a route (a name; None: the flows no route takes) while it runs.
        self._live_chains: dict[str | None, tuple[Interceptor, ...]] = {}
        self._disabled: set[str] = set()
        self._initial_forwards = tuple(forwards)
        self._forwards: dict[str, _ForwardRun] = {}
        self._serving: _Serving | None = None
        self.set_routes(routes)
        # UDP sessions (``serve(udp_listen=...)``): their own table, on the same reactor,
        # routes, flow ids and event sink.
        self.udp = UdpSessions(
            plan=self._plan,
            flow_ids=self._flow_ids,
            emit=self._emit,
            disabled=self._disabled,
            live_interceptors=self.live_interceptors,
            idle_timeout=udp_idle_timeout,
            max_sessions=max_udp_sessions,
            gso=udp_gso,
        )

    async def serve(
        self,
        listen: Sequence[Address],
        *,
        udp_listen: Sequence[Address] = (),
        task_status: trio.TaskStatus[list[Address]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on ``listen`` (TCP) and ``udp_listen`` and relay flows until cancelled or
        drained (UDP sessions end when the TCP flows have: they have no end to wait for).

        ``task_status.started`` receives the bound addresses once every listener is up, so
        ``await nursery.start(proxy.serve, ...)`` returns when the proxy is ready.
        """
        if self._started:
            raise RuntimeError("a Proxy serves once; make a new one")
        self._started = True
        try:
            with ExitStack() as listeners_open, Reactor() as reactor:
                # Held here so that a failure to bind the third listener closes the first two.
                listeners: list[socket.socket] = []
                for address in listen:
                    listener = open_transparent_listener(address, reuse_port=self._reuse_port)
                    listeners_open.callback(_close, listener)
                    listeners.append(listener)
                self._listening = [from_sockaddr(sock.getsockname()) for sock in listeners]
                for address in self._listening:
                    LOGGER.info("listening on %s", format_address(address))
                udp_listeners = []
                for address in udp_listen:
                    udp_listener = open_datagram_listener(address, reuse_port=self._reuse_port)
                    listeners_open.callback(_close, udp_listener)
                    udp_listeners.append(udp_listener)
                    self.udp.listening.append(from_sockaddr(udp_listener.getsockname()))
                    LOGGER.info("listening on UDP %s", format_address(self.udp.listening[-1]))
                # The services outlive every flow, since the flows wait on the reactor.
                async with trio.open_nursery() as services:
                    services.start_soon(reactor.run)
                    services.start_soon(self._sweep)
                    await services.start(self.udp.run, reactor)
                    async with trio.open_nursery() as flows:
                        self._flows_scope = flows.cancel_scope
                        with self._accepting:
                            async with trio.open_nursery() as acceptors:
                                for listener in listeners:
                                    acceptors.start_soon(
                                        self._accept_loop, listener, reactor, flows
                                    )
                                for udp_listener in udp_listeners:
                                    acceptors.start_soon(self.udp.receive, udp_listener)
                                self._serving = _Serving(reactor, flows, acceptors)
                                for forward in self._initial_forwards:
                                    await self.add_forward(forward)
                                task_status.started(self.addresses)
                                # Until ``drain``: forward listeners may come later.
                                await trio.sleep_forever()
                        # Draining: close the listeners at once, so new flows are no longer
                        # taken (the kernel refuses them), while the flows in flight go on.
                        self._serving = None
                        listeners_open.close()
                        for run in self._forwards.values():
                            _close(run.listener)
                    services.cancel_scope.cancel()
        finally:
            if self._pipes is not None:
                self._pipes.close()

    async def _accept_loop(
        self,
        listener: socket.socket,
        reactor: Reactor,
        flows: trio.Nursery,
        forward: _ForwardRun | None = None,
    ) -> None:
        while True:
            # Wait for a connection before taking a slot, so an idle listener never holds
            # capacity that a busy one needs; at the limit the kernel keeps the connections
            # in its backlog until a flow ends.
            await trio.lowlevel.wait_readable(listener)
            # Take every connection that is waiting, not one per wake-up: each wait costs
            # Trio two epoll_ctl calls.
            for _ in range(ACCEPT_BATCH):
                if self._slots is not None and not _try_acquire(self._slots):
                    await self._slots.acquire()
                    # Woken by a flow's end, which may also have started a drain: a drain
                    # cancels this loop, and that must win over the connection waiting.
                    try:
                        await trio.lowlevel.checkpoint_if_cancelled()
                    except BaseException:
                        self._slots.release()
                        raise
                try:
                    client_sock, client_address = listener.accept()
                    client_sock.setblocking(False)
                except BlockingIOError:
                    self._release_slot()  # none left (or another worker took it)
                    break
                except OSError as exc:
                    self._release_slot()
                    if exc.errno in ACCEPT_CONNECTION_ERRNOS:
                        LOGGER.warning("accept failed for one connection: %s", _errno_text(exc))
                        continue
                    if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                        raise
                    LOGGER.error(
                        "accept failed: %s; retrying in %ss", _errno_text(exc), ACCEPT_RETRY_S
                    )
                    await trio.sleep(ACCEPT_RETRY_S)
                    break
                try:
                    flow = Flow(
                        next(self._flow_ids),
                        client=from_sockaddr(client_address),
                        server=(
                            from_sockaddr(client_sock.getsockname())
                            if forward is None
                            else forward.forward.upstream
                        ),
                    )
                except OSError:
                    # The client reset before we looked: nothing to relay, nobody to tell.
                    reset(client_sock)
                    self._release_slot()
                    continue
                self._active += 1
                flows.start_soon(
                    self._run_flow, reactor, flow, client_sock, forward, name=_FLOW_TASK
                )

    def _release_slot(self) -> None:
        if self._slots is not None:
            self._slots.release()

    async def _run_flow(
        self,
        reactor: Reactor,
        flow: Flow,
        client_sock: socket.socket,
        forward: _ForwardRun | None = None,
    ) -> None:
        """One accepted connection, from accept to close (``forward``: taken by a forward
        listener, connecting to its upstream rather than transparently)."""
        emit, started = self._emit, trio.current_time()
        emit(FlowOpened(flow))
        ending = FlowEnding()
        server_sock: socket.socket | None = None
        live: _LiveFlow | None = None
        plan = self._default
        try:
            # Chosen once, here: from now on the flow keeps this plan, whatever set_routes
            # does. (Nothing awaits between this and the flow's entry in ``_live``, so that a
            # sweep woken by set_routes finds the flow and its idle timeout.)
            plan = self._plan(flow) if forward is None else forward.plan
            if forward is None and is_own_listener(flow.server, self._listening):
                # Connecting out would reach our own listener, which would connect out again...
                ending.refuse("self_loop")
                emit(FlowRefused(flow, "self_loop"))
                return
            if plan.route in self._disabled:
                ending.refuse("route_disabled")
                emit(FlowRefused(flow, "route_disabled"))
                return
            readiness = Readiness(_CLIENT_READY)
            with reactor.watch(client_sock, readiness, Side.CLIENT):
                server_sock = (
                    open_outgoing(flow.client, client_sock.family, keep_port=self._keep_port)
                    if forward is None
                    else open_upstream(flow.server)
                )
                with reactor.watch(server_sock, readiness, Side.SERVER):
                    async with trio.open_nursery() as nursery:
                        # The flow's one cancel scope: the connect timeout is its deadline.
                        scope = nursery.cancel_scope
                        scope.deadline = started + plan.connect_timeout
                        live = _LiveFlow(flow, started, nursery, ending, plan)
                        self._live[flow.id] = live
                        try:
                            await connect_out(server_sock, flow.server, readiness)
                        except ConnectFailed as failure:  # here, not wrapped by the nursery
                            self._upstream_failed(flow, ending, failure)
                            return
                        scope.deadline = math.inf
                        emit(UpstreamConnected(flow, _since(started)))
                        live.ways = both_ways(client_sock, server_sock, readiness, self._shared)
                        chains = live.chains = plan.chains_for(flow)
                        live.intercepted = any(chains.values())
                        for way in live.ways:
                            nursery.start_soon(
                                relay_direction,
                                flow,
                                way,
                                live,
                                chains[way.direction],
                                emit,
                                self._live_chains,
                                name=_RELAY_TASK,
                            )
                    if live.connecting and not ending.resetting:
                        timeout = ConnectFailed(ConnectFailure.TIMEOUT, "no answer in time")
                        self._upstream_failed(flow, ending, timeout)
        except ConnectFailed as failure:
            self._upstream_failed(flow, ending, failure)
        except Exception:
            # A fault inside the proxy: this flow is reset, the others go on.
            ending.stop(Stop.PROXY_ERROR)
            LOGGER.exception("flow %d failed inside the proxy", flow.id)
        finally:
            # Both directions are over, or the flow was stopped: the only question left is FIN
            # or RST, and FlowEnding answers it. (On a cancellation from outside the flow,
            # ``ending`` has no clean end either, and the flow is reset.)
            if live is not None:
                del self._live[flow.id]
            close_flow(ending, client_sock, server_sock)
            self._flow_closed(flow, ending, live, plan, started)
            self._active -= 1
            self._release_slot()
            if self._draining and self._active == 0:
                self._drained.set()

    def _upstream_failed(self, flow: Flow, ending: FlowEnding, failure: ConnectFailed) -> None:
        # Without the proxy the client would have been refused (or given up): a reset is the
        # closest we can come now that its handshake with us has completed.
        ending.fail_upstream(failure.reason.value)
        self._emit(UpstreamFailed(flow, failure.reason.value, failure.detail))

    def _flow_closed(
        self, flow: Flow, ending: FlowEnding, live: _LiveFlow | None, plan: _Plan, started: float
    ) -> None:
        to_server = to_client = 0
        if live is not None and live.ways is not None:
            to_server, to_client = (way.written for way in live.ways)
            self._closed_bytes[Direction.CLIENT_TO_SERVER] += to_server
            self._closed_bytes[Direction.SERVER_TO_CLIENT] += to_client
        self._emit(
            FlowClosed(
                flow,
                ending.reason,
                ending.first_closed,
                to_server,
                to_client,
                _since(started),
                live is not None and live.intercepted,
                plan.route,
            )
        )

    async def _sweep(self) -> None:
        """Stop the flows that have made no progress for their idle timeout.

        Progress is bytes read, or bytes acknowledged by a peer while reads have stopped (a
        slow reader draining a full send buffer); the kernel is asked for the latter only for
        flows whose reads have not moved since the last sweep. One sweep
        every quarter of the shortest idle timeout in use looks at every flow, rather than
        each flow paying for a deadline of its own and every read noting the time: an idle
        flow is stopped between its timeout and a quarter later. The shortest in use is the
        routing table's (which ``set_routes`` changes, waking the sweep) or that of a flow
        still on a route of an older table; with none, the sweep sleeps until there is one.
        """
        # Per flow: bytes read and acknowledged when last looked at (-1: not asked, since
        # reads were moving), and since when neither has moved.
        seen: dict[int, tuple[int, int, float]] = {}
        in_flight = math.inf  # the shortest idle timeout among the flows seen last time
        while True:
            with trio.move_on_after(min(self._shortest_idle, in_flight) / 4):
                await self._idle_timeouts_changed.wait()
            now = trio.current_time()
            still: dict[int, tuple[int, int, float]] = {}
            in_flight = math.inf
            for flow_id, live in list(self._live.items()):
                idle_timeout = live.plan.idle_timeout
                if idle_timeout is None:
                    continue
                in_flight = min(in_flight, idle_timeout)
                if live.connecting:
                    continue  # connecting: the connect timeout is the scope's deadline
                read = live.bytes_read()
                last = seen.get(flow_id)
                if last is None or read != last[0]:
                    still[flow_id] = (read, -1, now)
                    continue
                _, last_acknowledged, since = last
                acknowledged = live.bytes_acknowledged()
                if last_acknowledged >= 0 and acknowledged != last_acknowledged:
                    still[flow_id] = (read, acknowledged, now)
                elif now - since >= idle_timeout:
                    live.stop(Stop.IDLE_TIMEOUT)
                else:
                    # Not known to have moved: its idle time still runs from ``since``.
                    still[flow_id] = (read, acknowledged, since)
            seen = still

    def _plan(self, flow: Flow) -> _Plan:
        """What ``flow`` does: its route's plan, or the proxy's own when no route takes it."""
        table = self._routes
        if table is None:
            return self._default
        routes, plans = table
        position = routes.position(flow.transport, flow.client, flow.server)
        return self._default if position is None else plans[position]

    # -- changing it while it runs, and asking it how it does ----------------------------

    def set_routes(self, routes: Routes | None) -> None:
        """Take new flows by ``routes`` from now on (``None``: no routes).

        The flows in flight keep the route they started with, its chains and its timeouts:
        the table is swapped whole, and a flow holds its plan, not the table.
        """
        default = self._default
        if routes is None:
            self._routes = None
            idle_timeouts = [default.idle_timeout]
        else:
            plans = tuple(_plan_for(route, default) for route in routes)
            self._routes = (routes, plans)
            idle_timeouts = [default.idle_timeout, *(plan.idle_timeout for plan in plans)]
        self._shortest_idle = min((t for t in idle_timeouts if t is not None), default=math.inf)
        # The sweep looks at once, and from then on as often as the shortest timeout needs.
        self._idle_timeouts_changed.set()
        self._idle_timeouts_changed = trio.Event()

    @property
    def routes(self) -> Routes | None:
        """The routes new flows are taken by (``None``: no routes)."""
        return None if self._routes is None else self._routes[0]

    def set_live_interceptors(self, route: str | None, interceptors: Sequence[Interceptor]) -> None:
        """Run ``interceptors`` on the flows of ``route`` (a route's name; ``None``: the flows
        no route takes) from now on, the flows in flight included, after the route's own.

        A flow in flight takes the change at its next chunk boundary: a spliced direction
        moves onto the interceptor path, and back once none is left, without losing or
        reordering a byte. An interceptor already running on a flow goes on as it was
        (its state and timers kept); one taken away sees the end of its chunks and may
        flush what it holds. ``for_flows`` interceptors are asked once per flow. A UDP
        session takes the change at its next datagram.
        """
        interceptors = tuple(interceptors)
        if interceptors:
            self._live_chains[route] = interceptors
        elif self._live_chains.pop(route, None) is None:
            return
        for live in self._live.values():
            if live.plan.route == route and live.ways is not None:
                for way in live.ways:
                    changed(way)
        self.udp.changed(route)  # UDP sessions in flight too, at their next datagram

    def live_interceptors(self, route: str | None) -> tuple[Interceptor, ...]:
        """The interceptors set on ``route`` with ``set_live_interceptors``."""
        return self._live_chains.get(route, ())

    def set_enabled(self, route: str, enabled: bool) -> None:
        """Disable ``route`` (Toxiproxy's ``enabled=false``: its flows in flight are reset, new
        ones refused with a reset), or enable it again."""
        if enabled:
            self._disabled.discard(route)
            return
        self._disabled.add(route)
        for live in list(self._live.values()):
            if live.plan.route == route:
                live.stop(Stop.ROUTE_DISABLED)
        self.udp.stop_route(route)

    def flows(self) -> list[FlowInfo]:
        """The flows in flight now, oldest first."""
        now, chains = trio.current_time(), self._live_chains
        tcp = [live.info(now, chains.get(live.plan.route, ())) for live in self._live.values()]
        return sorted([*tcp, *self.udp.infos(now)], key=lambda info: -info.age_s)

    def reset_flow(self, flow_id: int) -> bool:
        """Reset one flow in flight, both sides; false if there is no such flow."""
        live = self._live.get(flow_id)
        if live is None:
            return self.udp.stop(flow_id, Stop.RESET_REQUESTED.value)
        live.stop(Stop.RESET_REQUESTED)
        return True

    @property
    def forwards(self) -> dict[str, tuple[Forward, Address]]:
        """The forward listeners running now, by name: each with its bound address."""
        return {name: (run.forward, run.address) for name, run in self._forwards.items()}

    async def add_forward(self, forward: Forward) -> Address:
        """Start a forward listener while the proxy serves; its bound address.

        ``ValueError`` if its name is taken (by a forward or a route), ``OSError`` if it
        cannot listen.
        """
        serving = self._serving
        if serving is None:
            raise RuntimeError("the proxy is not serving")
        routes = self.routes
        if forward.name in self._forwards or (
            routes is not None and any(route.name == forward.name for route in routes)
        ):
            raise ValueError(f"{forward.name!r} is taken")
        listener = open_forward_listener(forward.listen)
        address = from_sockaddr(listener.getsockname())
        plan = _Plan(
            forward.name,
            forward.interceptors,
            self._default.connect_timeout,
            self._default.idle_timeout,
        )
        run = _ForwardRun(forward, address, plan, listener)
        self._forwards[forward.name] = run
        LOGGER.info(
            "forwarding %s to %s", format_address(address), format_address(forward.upstream)
        )
        serving.acceptors.start_soon(self._accept_forward, run, serving)
        await trio.lowlevel.checkpoint()
        return address

    async def remove_forward(self, name: str) -> None:
        """Stop a forward listener and reset its flows in flight; ``KeyError`` if unknown."""
        run = self._forwards.pop(name)
        run.scope.cancel()
        _close(run.listener)
        for live in list(self._live.values()):
            if live.plan.route == name:
                live.stop(Stop.CANCELLED)
        await trio.lowlevel.checkpoint()

    async def _accept_forward(self, run: _ForwardRun, serving: _Serving) -> None:
        with run.scope:
            await self._accept_loop(run.listener, serving.reactor, serving.flows, run)

    async def drain(self, grace: float) -> int:
        """Stop taking flows, give those in flight ``grace`` seconds, then reset the rest.

        Returns how many flows had to be reset (0: everything finished by itself).
        """
        self._draining = True
        self._accepting.cancel()
        if self._active == 0:
            self._drained.set()
        with trio.move_on_after(grace):
            await self._drained.wait()
        remaining = self._active
        if remaining:
            LOGGER.warning("grace period over: resetting %d flows", remaining)
            for live in list(self._live.values()):
                live.stop(Stop.CANCELLED)
            if self._flows_scope is not None:
                self._flows_scope.cancel()  # flows not yet connecting out, if any
        return remaining

    @property
    def active_flows(self) -> int:
        return self._active

    def bytes_moved(self) -> dict[Direction, int]:
        """Bytes delivered so far each way, by every flow, the ones in flight included.

        Computed when asked (for a metrics scrape, say), so the data path pays nothing.
        """
        totals = dict(self._closed_bytes)
        for live in self._live.values():
            for way in live.ways or ():
                totals[way.direction] += way.written
        return totals

    @property
    def addresses(self) -> list[Address]:
        """The bound listener addresses (empty until ``serve`` has started)."""
        return list(self._listening)


async def relay_direction(
    flow: Flow,
    way: Way,
    live: _LiveFlow,
    chain: Sequence[Interceptor],
    emit: EventSink,
    live_chains: Mapping[str | None, Sequence[Interceptor]] = _NO_LIVE_CHAINS,
) -> None:
    """One direction, from its first byte to its end: relayed by the reactor, or through its
    interceptors (the route's ``chain``, and those set on it live, in ``live_chains``),
    moving between the two as the live ones come and go; then its EOF passed on as a FIN, or
    the flow reset."""
    # One frame, no closure, for a direction that stays plain: thousands of idle flows each
    # keep two of these parked.
    end: EndKind | None = None
    error: BaseException | None = None
    try:
        while end is None:
            way.switching = False
            if chain or (live_chains and _live_now(flow, way, live, live_chains)):
                live.intercepted = True
                wanted = functools.partial(_live_now, flow, way, live, live_chains)
                result = await way.relay_intercepted(flow, chain, wanted, live.nursery)
                if result is not None:
                    end, error = result
                # else nothing intercepts it any more: back to the plain path.
            else:
                await way.readiness.pump(way)
                end = way.end  # None: live interceptors have come, onto the interceptor path
    finally:
        way.release()
    ending = live.ending
    if ending.resetting:
        return  # decided already, by the other direction: no FIN goes out now
    if end is EndKind.EOF and ending.fin_needs_shutdown:
        try:
            way.sink.shutdown(socket.SHUT_WR)
        except OSError:
            end = EndKind.SINK_RESET
    if end is EndKind.EOF:
        emit(HalfClosed(flow, way.direction.source))
    elif error is not None:
        emit(InterceptorFailed(flow, way.direction, error))
    if ending.record(DirectionEnd(way.direction, end, error)):
        live.nursery.cancel_scope.cancel()


def _live_now(
    flow: Flow,
    way: Way,
    live: _LiveFlow,
    live_chains: Mapping[str | None, Sequence[Interceptor]],
) -> tuple[Interceptor, ...]:
    """The live interceptors ``way`` runs now: those set on its route that pick it."""
    return live_picks(way, flow, live_chains.get(live.plan.route, ()))


def close_flow(
    ending: FlowEnding, client_sock: socket.socket, server_sock: socket.socket | None
) -> None:
    """Close a flow's sockets: with a FIN when both directions ended cleanly (the FIN not yet
    passed on goes out with ``close``), else with a RST."""
    close = socket.socket.close if ending.clean else reset
    close(client_sock)
    if server_sock is not None:
        close(server_sock)


async def serve(
    listen: Sequence[Address],
    *,
    routes: Routes | None = None,
    interceptors: Sequence[Interceptor] = (),
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
    idle_timeout: float | None = None,
    max_flows: int | None = None,
    source_port: str = "keep",
    forwards: Sequence[Forward] = (),
    on_event: EventSink = log_event,
    udp_listen: Sequence[Address] = (),
    udp_idle_timeout: float = DEFAULT_UDP_IDLE_TIMEOUT_S,
    max_udp_sessions: int = DEFAULT_MAX_UDP_SESSIONS,
    udp_gso: bool = True,
    task_status: trio.TaskStatus[list[Address]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a transparent proxy on ``listen`` until cancelled: ``Proxy(...).serve(listen)``.

    ``interceptors`` form an onion around every flow no route takes (the first sits closest
    to the client); a flow a route takes has that route's.
    """
    proxy = Proxy(
        routes=routes,
        interceptors=interceptors,
        connect_timeout=connect_timeout,
        idle_timeout=idle_timeout,
        max_flows=max_flows,
        source_port=source_port,
        forwards=forwards,
        on_event=on_event,
        udp_idle_timeout=udp_idle_timeout,
        max_udp_sessions=max_udp_sessions,
        udp_gso=udp_gso,
    )
    await proxy.serve(listen, udp_listen=udp_listen, task_status=task_status)


def _plan_for(route: Route, default: _Plan) -> _Plan:
    """A route's plan: its own interceptors, and its own timeouts where it sets them."""
    return _Plan(
        route.name,
        route.interceptors,
        default.connect_timeout if route.connect_timeout is None else route.connect_timeout,
        default.idle_timeout if route.idle_timeout is None else route.idle_timeout,
    )


def _try_acquire(slots: trio.Semaphore) -> bool:
    try:
        slots.acquire_nowait()
    except trio.WouldBlock:
        return False
    return True


def _close(sock: socket.socket) -> None:
    trio.lowlevel.notify_closing(sock)
    sock.close()


def _errno_text(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0, "?")
    return f"{name} ({os.strerror(exc.errno) if exc.errno else exc})"


def _safe_sink(on_event: EventSink) -> EventSink:
    """A faulty event sink must not break the flow it reports on."""

    def emit(event: FlowEvent) -> None:
        try:
            on_event(event)
        except Exception:  # logged; the flow goes on
            LOGGER.exception("event sink failed on %s", type(event).__name__)

    return emit


def _since(started: float) -> float:
    return trio.current_time() - started
