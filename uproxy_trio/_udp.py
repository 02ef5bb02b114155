"""UDP sessions, top to bottom: a datagram on a listener → its session (made on the first one)
→ a nursery with two relay tasks → the session's end.

TPROXY hands a client's first datagram to a listener, with its original destination in a
control message (``_datagram``). The session for (client, original destination) gets two
transparent connected sockets: one bound to the client's address and connected to the
server, so the server sees the client's own IP and port; one bound to the original
destination and connected to the client, so the client's answers come from where it sent.
The kernel then delivers the client's later datagrams to that second socket, not to the
listener: TPROXY looks for a socket holding the packet's 4-tuple before it looks for the
listener, and a connected UDP socket does. We rely on this on purpose: an established session
costs the listener nothing.

A session is a ``Flow`` (``transport="udp"``) with a nursery of two relay tasks, one per
direction, torn down through that nursery's cancel scope: after ``udp_idle_timeout`` without a
datagram either way, when one side's socket reports its peer gone (an ICMP error), when an
interceptor fails, or when the proxy stops. A direction no interceptor touches is a pump the
reactor runs on edges (``_udp_way``).
"""

from __future__ import annotations

import errno
import functools
import logging
import math
import socket
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from typing import Protocol

import trio

from ._address import Address, format_address
from ._datagram import (
    NoOriginalDestination,
    open_session_socket,
    receive_delivered,
)
from ._events import EventSink, FlowClosed, FlowOpened, InterceptorFailed
from ._flow import Direction, Flow, FlowInfo
from ._interceptor import Interceptor
from ._live import changed, live_picks, running_names
from ._readiness import READABLE, WRITABLE, Reactor, Readiness, Side, bit
from ._transparent import is_own_listener
from ._udp_way import RUN_BUFFER, DatagramEnd, DatagramWay, Drop, both_ways

DEFAULT_UDP_IDLE_TIMEOUT_S = 60.0
DEFAULT_MAX_UDP_SESSIONS = 65536

# Datagrams a listener takes per wake-up before it lets the sessions run.
RECEIVE_BATCH = 64
# A drop is logged at most this often per reason (with the count since): a flood must not
# turn into a flood of log lines. Every drop is counted in ``dropped`` regardless.
DROP_LOG_INTERVAL_S = 10.0

# Both sockets of a fresh session may be read (a datagram may be waiting already) and written.
_FRESH = (
    bit(Side.CLIENT, READABLE)
    | bit(Side.CLIENT, WRITABLE)
    | bit(Side.SERVER, READABLE)
    | bit(Side.SERVER, WRITABLE)
)

_SESSION_TASK = "uproxy udp session"
_RELAY_TASK = "uproxy udp relay"

# What an ICMP error on a session's socket says, for the session's close reason.
_UNREACHABLE = frozenset(
    {errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN, errno.ENETDOWN, errno.ENONET}
)

_BY_INTERCEPTOR = frozenset(
    {
        DatagramEnd.INTERCEPTOR_FAILED,
        DatagramEnd.INTERCEPTOR_CLOSED,
        DatagramEnd.INTERCEPTOR_RESET,
    }
)

LOGGER = logging.getLogger("uproxy_trio")


class SessionPlan(Protocol):
    """What a session does, chosen by its route (the proxy's ``_Plan``)."""

    @property
    def route(self) -> str | None: ...

    def chains_for(self, flow: Flow) -> Mapping[Direction, Sequence[Interceptor]]: ...


class _Session:
    """One session in flight: its sockets, its two directions, how it is ending, and the
    cancel scope of its nursery (``None`` until its task has opened it)."""

    __slots__ = (
        "chains",
        "client_sock",
        "flow",
        "intercepted",
        "nursery",
        "reason",
        "route",
        "server_sock",
        "started",
        "ways",
    )

    def __init__(
        self,
        flow: Flow,
        plan: SessionPlan,
        client_sock: socket.socket,
        server_sock: socket.socket,
        ways: tuple[DatagramWay, DatagramWay],
    ) -> None:
        self.flow = flow
        self.route = plan.route
        self.chains = plan.chains_for(flow)
        self.client_sock = client_sock
        self.server_sock = server_sock
        self.ways = ways
        self.nursery: trio.Nursery | None = None
        self.reason: str | None = None
        self.started = trio.current_time()
        self.intercepted = any(self.chains.values())

    def stop(self, reason: str) -> None:
        """End the session now (unless it is ending already), wherever its tasks wait."""
        if self.reason is None:
            self.reason = reason
        if self.nursery is not None:
            self.nursery.cancel_scope.cancel()

    def datagrams(self) -> int:
        return self.ways[0].datagrams + self.ways[1].datagrams


class UdpSessions:
    """The proxy's UDP sessions: the table by (client, original destination), the listeners'
    loops that fill it, the sweep that empties it, and what they count.

    ``run`` must be running (it holds the sessions' nursery) before ``receive`` is.
    """

    def __init__(
        self,
        *,
        plan: Callable[[Flow], SessionPlan],
        flow_ids: Iterator[int],
        emit: EventSink,
        disabled: AbstractSet[str] = frozenset(),
        live_interceptors: Callable[[str | None], Sequence[Interceptor]] = lambda route: (),
        idle_timeout: float = DEFAULT_UDP_IDLE_TIMEOUT_S,
        max_sessions: int = DEFAULT_MAX_UDP_SESSIONS,
        gso: bool = True,
    ) -> None:
        if idle_timeout <= 0:
            raise ValueError("udp_idle_timeout must be positive")
        if max_sessions < 1:
            raise ValueError("max_udp_sessions must be at least 1")
        self._plan = plan
        self._flow_ids = flow_ids
        self._emit = emit
        self._disabled = disabled  # the proxy's disabled routes, as it changes them
        self._live_interceptors = live_interceptors
        self.idle_timeout = idle_timeout
        self.max_sessions = max_sessions
        # Queued datagrams leave in runs, one segmented send each (``_udp_way``): on unless
        # a user wants every datagram to cross the host's egress (tcpdump, qdiscs) on its own.
        self.gso = gso
        self._table: dict[tuple[Address, Address], _Session] = {}
        self._buffer = memoryview(bytearray(RUN_BUFFER))
        self._reactor: Reactor | None = None
        self._nursery: trio.Nursery | None = None
        self.listening: list[Address] = []
        self.sessions_total = 0
        self.handed_back = 0
        """Datagrams a session's socket was handed that belonged to another session."""
        self._stray = self._handed_back  # one bound method for every session
        self.dropped: Counter[Drop] = Counter()
        self._closed_datagrams = dict.fromkeys(Direction, 0)
        self._drops_logged: dict[Drop, tuple[float, int]] = {}

    # -- what the metrics read ----------------------------------------------------------------

    @property
    def active(self) -> int:
        return len(self._table)

    def datagrams_moved(self) -> dict[Direction, int]:
        """Datagrams read each way by every session, those in flight included."""
        totals = dict(self._closed_datagrams)
        for session in self._table.values():
            for way in session.ways:
                totals[way.direction] += way.datagrams
        return totals

    def infos(self, now: float) -> list[FlowInfo]:
        """The sessions in flight, as ``Proxy.flows`` lists flows."""
        return [
            FlowInfo(
                session.flow,
                session.route,
                running_names(
                    session.flow,
                    session.ways,
                    session.chains,
                    self._live_interceptors(session.route),
                ),
                session.ways[0].written,
                session.ways[1].written,
                now - session.started,
            )
            for session in self._table.values()
        ]

    def stop(self, flow_id: int, reason: str) -> bool:
        """End the session with this flow id now; false if there is none."""
        for session in self._table.values():
            if session.flow.id == flow_id:
                session.stop(reason)
                return True
        return False

    def stop_route(self, route: str) -> None:
        """End every session on ``route`` (it has just been disabled)."""
        for session in list(self._table.values()):
            if session.route == route:
                session.stop("route_disabled")

    # -- the tasks ----------------------------------------------------------------------------

    async def run(
        self, reactor: Reactor, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Hold the sessions' nursery and sweep idle sessions until cancelled; every session
        in flight ends then (``cancelled``)."""
        self._reactor = reactor
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._sweep)
            task_status.started()

    async def receive(self, listener: socket.socket) -> None:
        """Take the datagrams TPROXY delivers to ``listener`` until cancelled."""
        while True:
            await trio.lowlevel.wait_readable(listener)
            for _ in range(RECEIVE_BATCH):
                try:
                    data, client, server, truncated = receive_delivered(listener)
                except BlockingIOError:
                    break
                except NoOriginalDestination:
                    self._drop(Drop.NOT_TPROXIED)
                    continue
                except OSError as exc:
                    # An unconnected socket reports no ICMP errors; anything else is about
                    # one datagram, never the listener.
                    LOGGER.debug("UDP listener: %s", exc)
                    continue
                if truncated:
                    self._drop(Drop.TOO_BIG)
                    continue
                self.deliver(data, client, server)
            else:
                await trio.lowlevel.checkpoint()

    def deliver(self, data: bytes, client: Address, server: Address) -> None:
        """A datagram from ``client`` to ``server`` that reached the listener's path: to its
        session, made now if there is none."""
        session = self._table.get((client, server))
        if session is None:
            session = self._open(client, server)
            if session is None:
                return
        way = session.ways[0]
        if way.take(data):
            reactor = self._reactor
            assert reactor is not None
            reactor.kick(way.readiness, way.readable)

    def _open(self, client: Address, server: Address) -> _Session | None:
        """A new session's sockets, table entry and task; ``None`` (and the datagram
        dropped) when it cannot have them."""
        if len(self._table) >= self.max_sessions:
            self._drop(Drop.SESSION_LIMIT)
            return None
        if is_own_listener(server, self.listening):
            self._drop(Drop.SELF_LOOP)
            return None
        flow = Flow(next(self._flow_ids), client=client, server=server, transport="udp")
        plan = self._plan(flow)
        if plan.route is not None and plan.route in self._disabled:
            self._drop(Drop.ROUTE_DISABLED)
            return None
        try:
            server_sock = open_session_socket(client, server)
        except OSError as exc:
            self._drop(Drop.NO_SOCKET, exc)
            return None
        try:
            client_sock = open_session_socket(server, client)
        except OSError as exc:
            server_sock.close()
            self._drop(Drop.NO_SOCKET, exc)
            return None
        readiness = Readiness(_FRESH)
        ways = both_ways(
            flow,
            client_sock,
            server_sock,
            readiness,
            self._buffer,
            self.dropped,
            self._stray,
            runs=self.gso,
        )
        session = _Session(flow, plan, client_sock, server_sock, ways)
        self._table[(client, server)] = session
        self.sessions_total += 1
        assert self._nursery is not None, "UdpSessions.run is not running"
        self._nursery.start_soon(self._run_session, session, name=_SESSION_TASK)
        return session

    def _handed_back(self, data: bytes, client: Address, server: Address) -> None:
        """A datagram a session's client-side socket was handed that its client did not send
        (another client's, to the same server, handed over between ``bind`` and ``connect``):
        back through the listener's path, to its own session."""
        self.handed_back += 1
        LOGGER.debug(
            "UDP datagram from %s to %s reached another session: handed back",
            format_address(client),
            format_address(server),
        )
        self.deliver(data, client, server)

    async def _run_session(self, session: _Session) -> None:
        """One session, from its first datagram to its end."""
        flow, emit = session.flow, self._emit
        client_sock, server_sock = session.client_sock, session.server_sock
        readiness = session.ways[0].readiness
        reactor = self._reactor
        assert reactor is not None
        emit(FlowOpened(flow))
        try:
            with (
                reactor.watch(client_sock, readiness, Side.CLIENT),
                reactor.watch(server_sock, readiness, Side.SERVER),
            ):
                async with trio.open_nursery() as nursery:
                    # The session's one cancel scope: the sweep, an ending direction and the
                    # proxy's end all cancel it.
                    session.nursery = nursery
                    if session.reason is not None:
                        nursery.cancel_scope.cancel()  # stopped before it started
                    for way in session.ways:
                        chain = session.chains[way.direction]
                        nursery.start_soon(self._relay, session, way, chain, name=_RELAY_TASK)
        except Exception:
            session.stop("proxy_error")
            LOGGER.exception("UDP session %d failed inside the proxy", flow.id)
        finally:
            del self._table[(flow.client, flow.server)]
            client_sock.close()
            server_sock.close()
            for way in session.ways:
                self._closed_datagrams[way.direction] += way.datagrams
            to_server, to_client = (way.written for way in session.ways)
            emit(
                FlowClosed(
                    flow,
                    session.reason or "cancelled",
                    None,
                    to_server,
                    to_client,
                    trio.current_time() - session.started,
                    session.intercepted,
                    session.route,
                )
            )

    async def _relay(
        self, session: _Session, way: DatagramWay, chain: Sequence[Interceptor]
    ) -> None:
        """One direction until it ends, which ends the session: pumped by the reactor, or
        through its interceptors (the route's ``chain`` and its live ones), moving between
        the two as the live ones come and go."""
        while way.end is None:
            way.switching = False
            if chain or self._live_for(session, way):
                session.intercepted = True
                wanted = functools.partial(self._live_for, session, way)
                assert session.nursery is not None
                error, switched = await way.relay_intercepted(
                    session.flow, chain, wanted, session.nursery
                )
                if error is not None:
                    self._emit(InterceptorFailed(session.flow, way.direction, error))
                if not switched:
                    break
            else:
                await way.readiness.pump(way)  # back at once (no end) when live ones come
        session.stop(_close_reason(way))

    def _live_for(self, session: _Session, way: DatagramWay) -> tuple[Interceptor, ...]:
        return live_picks(way, session.flow, self._live_interceptors(session.route))

    def changed(self, route: str | None) -> None:
        """The live interceptors of ``route`` have changed: its sessions in flight take them
        at their next datagram."""
        for session in self._table.values():
            if session.route == route and session.nursery is not None:
                for way in session.ways:
                    changed(way)

    async def _sweep(self) -> None:
        """Stop the sessions that moved no datagram either way for the idle timeout.

        One sweep every quarter of the timeout looks at every session, rather than each
        datagram noting the time: an idle session ends between its timeout and a quarter
        later.
        """
        seen: dict[int, tuple[int, float]] = {}
        while True:
            await trio.sleep(self.idle_timeout / 4)
            now = trio.current_time()
            still: dict[int, tuple[int, float]] = {}
            for session in list(self._table.values()):
                flow_id, datagrams = session.flow.id, session.datagrams()
                last = seen.get(flow_id)
                if last is None or last[0] != datagrams:
                    still[flow_id] = (datagrams, now)
                elif now - last[1] >= self.idle_timeout:
                    session.stop("idle_timeout")
                else:
                    still[flow_id] = last
            seen = still

    def _drop(self, why: Drop, error: OSError | None = None) -> None:
        self.dropped[why] += 1
        now = trio.current_time()
        last_logged, count_then = self._drops_logged.get(why, (-math.inf, 0))
        if now - last_logged >= DROP_LOG_INTERVAL_S:
            self._drops_logged[why] = (now, self.dropped[why])
            LOGGER.warning(
                "UDP datagrams dropped (%s): %d since the last report%s",
                why.value,
                self.dropped[why] - count_then,
                f"; {error}" if error is not None else "",
            )


def _close_reason(way: DatagramWay) -> str:
    """A session's close reason from the direction that ended it."""
    end = way.end
    if end in _BY_INTERCEPTOR:
        return end.value
    if end is DatagramEnd.CHAIN_ENDED or end is None:
        return "closed"
    side = way.direction.source if end is DatagramEnd.SOURCE_GONE else way.direction.sink
    if way.errno == errno.ECONNREFUSED:
        return f"{side}_refused"
    if way.errno in _UNREACHABLE:
        return f"{side}_unreachable"
    return f"{side}_error"
