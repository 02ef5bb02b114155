"""Scenarios from Envoy's tcp_proxy integration tests, through the real transparent proxy in
the lab: the server speaks first, a close flushes what is in flight, a paused peer costs the
proxy no memory, shutdown with flows open, an idle timeout with data outstanding, an
interceptor's flow reset by its server, and a randomized mix of opens, writes, half-closes
and closes. Every byte is checked."""

from __future__ import annotations

import hashlib
import itertools
import os
import random
import signal
import socket
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field

import pytest
import trio
from lab_tools import (
    ADDRESSES,
    CliProxy,
    EventLog,
    eventually,
    family_of,
    listen,
    open_flow,
    recv_exactly,
    recv_until_eof,
    reset_close,
    run_library_proxy,
    send_all,
)

from uproxy_netns import SERVER_V4, SERVER_V6, Lab
from uproxy_trio import Direction, Flow, FlowClosed, Interceptor, directions, in_own_task

pytestmark = pytest.mark.lab

MiB = 1 << 20


def pattern(size: int, seed: int) -> bytes:
    """Deterministic bytes that no shift, repeat or reordering of blocks leaves unchanged."""
    return random.Random(seed).randbytes(size)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def recv_digest(sock: trio.socket.SocketType) -> tuple[int, str]:
    """Read to EOF, keeping only the length and the SHA-256 of what came."""
    hashed, size = hashlib.sha256(), 0
    while data := await sock.recv(1 << 18):
        hashed.update(data)
        size += len(data)
    return size, hashed.hexdigest()


async def connect_with_rcvbuf(
    lab: Lab, host: str, rcvbuf: int, port: int = 9090
) -> trio.socket.SocketType:
    """A client whose receive buffer is fixed before the handshake (which turns off the
    kernel's autotuning), so a slow reader's kernel cannot soak up a whole response."""
    sock = trio.socket.from_stdlib_socket(lab.client.socket(family_of(host)))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    await sock.connect((host, port))
    return sock


@asynccontextmanager
async def flow_through(
    lab: Lab, server_ip: str, port: int = 9090
) -> AsyncIterator[tuple[trio.socket.SocketType, trio.socket.SocketType]]:
    """``(client, server)`` of a new flow through the proxy; every socket of it, the
    listener too, is closed when the block ends, however it ends."""
    async with open_flow(lab, server_ip, port) as (client, server, _):
        yield client, server


async def logged(proxy: CliProxy, text: str, timeout: float = 10) -> None:
    """Wait, without blocking the test's other tasks, until the proxy has logged ``text``."""
    await eventually(lambda: text in proxy.log, timeout)


# --- 1. the upstream writes first --------------------------------------------------------


@pytest.mark.parametrize(("client_ip", "server_ip"), ADDRESSES)
async def test_the_server_speaks_first(
    inside_proxy: Lab, library_proxy: EventLog, client_ip: str, server_ip: str
) -> None:
    """A server that greets before the client says anything (SMTP, SSH, MySQL) is heard: the
    proxy connects out and relays server-to-client without waiting for client bytes."""
    lab = inside_proxy
    banner = b"220 mail.example.test ESMTP ready\r\n"
    with trio.fail_after(10):
        async with flow_through(lab, server_ip) as (client, server):
            await send_all(server, banner)
            assert await recv_exactly(client, len(banner)) == banner
            # And the conversation goes on the other way.
            await send_all(client, b"QUIT\r\n")
            assert await recv_exactly(server, 6) == b"QUIT\r\n"
            server.close()
            assert await recv_until_eof(client) == b""
        (closed,) = await library_proxy.wait_for(FlowClosed)
    assert (closed.bytes_client_to_server, closed.bytes_server_to_client) == (6, len(banner))


# --- 2. a close flushes what is in flight ------------------------------------------------

# Small enough to sit in the kernel buffers along the path (about 10 MB one way with the
# lab's defaults, measured) while the receiver has not read yet, so the sender's FIN reaches
# the proxy while it still holds bytes for the receiver.
FLUSH_SIZE = 2 * MiB


@pytest.mark.parametrize("closing", ["server", "client"])
@pytest.mark.parametrize(("client_ip", "server_ip"), ADDRESSES)
async def test_a_close_flushes_every_byte_before_the_eof(
    inside_proxy: Lab, library_proxy: EventLog, client_ip: str, server_ip: str, closing: str
) -> None:
    """The side that writes and closes (upstream or downstream disconnect) has every byte
    delivered, then the EOF: the proxy passes a FIN on only after what came before it."""
    lab = inside_proxy
    payload = pattern(FLUSH_SIZE, seed=2)
    with trio.fail_after(15):
        async with flow_through(lab, server_ip) as (client, server):
            writer, reader = (server, client) if closing == "server" else (client, server)
            # The writer finishes and closes before the reader has read a byte.
            await send_all(writer, payload)
            writer.close()
            assert await recv_digest(reader) == (len(payload), digest(payload))
        (closed,) = await library_proxy.wait_for(FlowClosed)
    assert (closed.reason, closed.first_closed) == ("closed", closing)
    moved = closed.bytes_server_to_client if closing == "server" else closed.bytes_client_to_server
    assert moved == len(payload)


# --- 3. a paused peer costs the proxy no memory ------------------------------------------

PAUSED_PAYLOAD = 50 * MiB
PAUSE_S = 2.0

# How much the proxy's resident memory may grow while it relays 50 MB to a peer that stops
# reading. The relay holds at most one 64 KiB read per direction in user memory (splice's
# pipes are kernel memory, outside RSS), an interceptor chain one chunk per stage; the rest
# is the allocator's and the interpreter's noise: measured growth here 4-20 KiB spliced,
# 1 MiB through an interceptor. A relay that kept reading what it could not deliver grows by
# nearly all of the 50 MB (an interceptor that holds the bytes: 50 MB, measured). 16 MiB
# lies well between.
RSS_GROWTH_BOUND_KIB = 16 * 1024


class RssWatch:
    """Samples a process's VmRSS, to find its peak over a stretch of time."""

    def __init__(self, proxy: CliProxy) -> None:
        self.proxy = proxy
        self.baseline = proxy.rss_kib()
        self.hwm_before = self.hwm()
        self.peak = self.baseline

    def hwm(self) -> int:
        return int(self.proxy.status("VmHWM").split()[0])

    def sample(self) -> None:
        self.peak = max(self.peak, self.proxy.rss_kib())

    async def run(self) -> None:
        while True:
            self.sample()
            await trio.sleep(0.02)

    def growth_kib(self) -> int:
        """The peak over the baseline; the kernel's high-water mark catches a peak between
        two samples, whenever it rose past the one from before the watch."""
        hwm = self.hwm()
        peak = max(self.peak, hwm) if hwm > self.hwm_before else self.peak
        return peak - self.baseline


@pytest.mark.parametrize(
    ("direction", "args"),
    [
        pytest.param(Direction.SERVER_TO_CLIENT, (), id="to-paused-client"),
        pytest.param(Direction.CLIENT_TO_SERVER, (), id="to-paused-server"),
        pytest.param(
            Direction.SERVER_TO_CLIENT,
            ("-i", "uproxy_netns.interceptors:identity"),
            id="to-paused-client-intercepted",
        ),
    ],
)
async def test_a_paused_reader_holds_the_proxys_memory_bounded(
    lab: Lab, cli_proxy: CliProxy, direction: Direction, args: tuple[str, ...]
) -> None:
    """50 MB pushed at a peer that stops reading for 2 s: backpressure reaches the sender
    instead of the proxy's memory, and when the peer reads again all 50 MB arrive intact,
    then the EOF."""
    cli_proxy.start("--log-level", "warning", *args)
    payload = pattern(PAUSED_PAYLOAD, seed=3)
    sent_all = trio.Event()
    async with flow_through(lab, SERVER_V4) as (client, server), trio.open_nursery() as nursery:
        with trio.fail_after(30):
            # A first exchange both ways, so what every flow allocates is in the baseline.
            await send_all(client, b"warm")
            assert await recv_exactly(server, 4) == b"warm"
            await send_all(server, b"up")
            assert await recv_exactly(client, 2) == b"up"
            writer, reader = (
                (server, client) if direction is Direction.SERVER_TO_CLIENT else (client, server)
            )
            watch = RssWatch(cli_proxy)
            nursery.start_soon(watch.run)

            async def write_and_close() -> None:
                await send_all(writer, payload)
                writer.close()
                sent_all.set()

            nursery.start_soon(write_and_close)
            await trio.sleep(PAUSE_S)  # the reader's pause: the scenario itself
            watch.sample()
            # The path filled up and the sender was made to wait.
            assert not sent_all.is_set(), "the proxy took all 50 MB while its reader paused"
            assert await recv_digest(reader) == (len(payload), digest(payload))
            watch.sample()
        nursery.cancel_scope.cancel()
    growth = watch.growth_kib()
    assert growth < RSS_GROWTH_BOUND_KIB, f"proxy RSS grew by {growth} KiB"
    assert cli_proxy.stop() == 0


# --- 4. shutdown with flows open ---------------------------------------------------------

DRAIN_PAYLOAD = 2 * MiB  # fits in the path's buffers, as FLUSH_SIZE


async def test_sigterm_finishes_flows_with_bytes_in_flight_and_resets_the_rest(
    lab: Lab, cli_proxy: CliProxy
) -> None:
    """test_reliability covers a round trip after SIGTERM and a lone flow reset after grace.
    Here, at the signal, an IPv4 and an IPv6 flow hold 2 MiB in flight each way (their
    readers paused) and a third flow is idle: the two finish byte-exact within --grace, the
    third is reset when grace ends, and the exit status (1) says a flow had to be reset."""
    cli_proxy.start("--grace", "3")
    up, down = pattern(DRAIN_PAYLOAD, seed=41), pattern(DRAIN_PAYLOAD, seed=42)
    finished = 0
    async with AsyncExitStack() as stack:
        stack.enter_context(trio.fail_after(20))
        flows = [
            await stack.enter_async_context(flow_through(lab, SERVER_V4)),
            await stack.enter_async_context(flow_through(lab, SERVER_V6)),
        ]
        idle_client, idle_server = await stack.enter_async_context(
            flow_through(lab, SERVER_V4, port=9094)
        )
        for client, server in flows:
            # Both sides write and half-close before either reads: bytes in flight both ways.
            await send_all(client, up)
            client.shutdown(socket.SHUT_WR)
            await send_all(server, down)
            server.shutdown(socket.SHUT_WR)
        cli_proxy.send(signal.SIGTERM)
        await logged(cli_proxy, "SIGTERM received: draining 3 flows")

        async def finish(client: trio.socket.SocketType, server: trio.socket.SocketType) -> None:
            nonlocal finished
            assert await recv_digest(server) == (len(up), digest(up))
            assert await recv_digest(client) == (len(down), digest(down))
            client.close()
            server.close()
            finished += 1

        async with trio.open_nursery() as nursery:
            for client, server in flows:
                nursery.start_soon(finish, client, server)
        assert finished == 2
        # The idle flow outlives the grace period, and both its ends are reset.
        with pytest.raises(ConnectionResetError):
            await recv_until_eof(idle_client)
        with pytest.raises(ConnectionResetError):
            await recv_until_eof(idle_server)
    assert cli_proxy.wait_exit() == 1
    assert "grace period over: resetting 1 flows" in cli_proxy.log


# --- 5. an idle timeout with data outstanding --------------------------------------------

SLOW_RESPONSE = 3 * MiB
SLOW_RATE = 512 * 1024  # bytes per second: 6 s for the response
SLOW_READ = 16 * 1024
# The reader's receive buffer: small, so the response waits in the proxy (its pipe and its
# socket's send buffer), not in the reader's kernel.
SLOW_RCVBUF = 64 * 1024


async def serve_response(listener: trio.socket.SocketType, response: bytes) -> None:
    """Accept one connection, send ``response`` and close; a reset on the way is the test's
    business, not the server's."""
    server, _ = await listener.accept()
    with server:
        try:
            await send_all(server, response)
        except OSError:
            pass


async def read_into(sock: trio.socket.SocketType, received: bytearray) -> None:
    """Read to EOF, keeping what came in ``received`` even if the read ends in an error."""
    while data := await sock.recv(1 << 16):
        received += data


async def read_steadily(sock: trio.socket.SocketType, rate: float) -> tuple[int, str]:
    """Read to EOF at about ``rate`` bytes per second, in small reads."""
    hashed, size = hashlib.sha256(), 0
    next_read = trio.current_time()
    while data := await sock.recv(SLOW_READ):
        hashed.update(data)
        size += len(data)
        next_read += len(data) / rate
        await trio.sleep_until(next_read)
    return size, hashed.hexdigest()


async def test_a_slow_steady_reader_is_not_idle(lab: Lab, cli_proxy: CliProxy) -> None:
    """A client reading a 3 MiB response at 0.5 MB/s through --idle-timeout 1 is never idle:
    bytes reach it all the time. But the proxy, its pipe and send buffer full, reads nothing
    from the server for seconds at a stretch: a timeout that counts only reads resets it."""
    cli_proxy.start("--idle-timeout", "1")
    response = pattern(SLOW_RESPONSE, seed=5)
    listener = await listen(lab.server, SERVER_V4, 9090)
    with listener, trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_response, listener, response)
            client = await connect_with_rcvbuf(lab, SERVER_V4, SLOW_RCVBUF)
            with client:
                assert await read_steadily(client, SLOW_RATE) == (len(response), digest(response))
    assert cli_proxy.stop() == 0
    assert "reason=idle_timeout" not in cli_proxy.log


async def test_a_reader_that_stops_is_reset_by_the_idle_timeout(
    lab: Lab, cli_proxy: CliProxy
) -> None:
    """The same response, but the client stops reading after 256 KiB: with bytes outstanding
    and none of them moving, the flow is idle and is reset within 3 s of the stall."""
    cli_proxy.start("--idle-timeout", "1")
    response = pattern(SLOW_RESPONSE, seed=5)
    listener = await listen(lab.server, SERVER_V4, 9090)
    with listener, trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_response, listener, response)
            client = await connect_with_rcvbuf(lab, SERVER_V4, SLOW_RCVBUF)
            with client:
                start = await recv_exactly(client, 256 * 1024)
                # The stall: read nothing until the proxy gives up on the flow.
                await logged(cli_proxy, "close reason=idle_timeout", timeout=3)
                received = bytearray(start)
                with pytest.raises(ConnectionResetError):
                    await read_into(client, received)
    # What did arrive is the response's start, intact; the rest never came.
    assert len(received) < len(response)
    assert received == response[: len(received)]
    assert cli_proxy.stop() == 0


# --- an interceptor's flow reset by its server -------------------------------------------


def identity() -> Interceptor:
    """A new pass-through interceptor: a function of its own, since the markers below are
    attributes set on the function they mark."""

    async def passing(
        flow: Flow, direction: Direction, chunks: AsyncIterator[bytes]
    ) -> AsyncIterator[bytes]:
        async for chunk in chunks:
            yield chunk

    return passing


INTERCEPTED: dict[str, Callable[[], Interceptor]] = {
    "both-ways": identity,
    "client-to-server-only": lambda: directions(Direction.CLIENT_TO_SERVER)(identity()),
    "server-to-client-only": lambda: directions(Direction.SERVER_TO_CLIENT)(identity()),
    "in-own-task": lambda: in_own_task(identity()),
}


@pytest.mark.parametrize("intercepted", list(INTERCEPTED))
@pytest.mark.parametrize(("client_ip", "server_ip"), ADDRESSES)
async def test_a_server_reset_reaches_the_client_through_an_interceptor(
    inside_proxy: Lab, client_ip: str, server_ip: str, intercepted: str
) -> None:
    """test_interceptors_lab resets from the client's side; here the server resets a flow
    whose interceptor is running, and the client must see a RST, not a clean EOF, whichever
    directions the interceptor takes."""
    lab = inside_proxy
    interceptor = INTERCEPTED[intercepted]()
    events = EventLog()
    async with trio.open_nursery() as nursery:
        await nursery.start(run_library_proxy, events, {"interceptors": [interceptor]})
        with trio.fail_after(10):
            async with flow_through(lab, server_ip) as (client, server):
                await send_all(client, b"through the interceptor")
                assert await recv_exactly(server, 23) == b"through the interceptor"
                await send_all(server, b"and back")
                assert await recv_exactly(client, 8) == b"and back"
                reset_close(server)
                with pytest.raises(ConnectionResetError):
                    await recv_until_eof(client)
            (closed,) = await events.wait_for(FlowClosed)
        nursery.cancel_scope.cancel()
    assert closed.reason == "server_reset"


# --- 6. a randomized mix of opens, writes, half-closes and closes ------------------------

RANDOM_FLOWS = 500
RANDOM_CONCURRENCY = 50

# Each flow's first bytes tell the server who it is and how to end: (flow index, server's
# ending, the flow's whole length in bytes, this header included).
HEADER = struct.Struct("!IBI")
# The server echoes until the client's EOF, then sends its own EOF.
ECHO_TO_EOF = 0
# The server echoes the flow's length, then half-closes first, then waits for the client's EOF.
SERVER_HALF_CLOSES_FIRST = 1
# The server echoes the flow's length, then closes outright, the client still open.
SERVER_CLOSES_FIRST = 2


@dataclass(frozen=True, slots=True, repr=False)
class Plan:
    """One flow of the randomized run: what the client sends, in which pieces, how it reads
    the echo and how it ends. Drawn from the run's seed and the flow's index alone, so a seed
    replays the same plans."""

    index: int
    server_ip: str
    server_ending: int
    chunks: tuple[bytes, ...]
    reading: str  # "after" the writes, "concurrent"ly with them, or in "lockstep"
    half_close_early: bool  # SHUT_WR straight after the last write
    ending: str  # "half_close" then wait for EOF, "close" at once, or "abort" with a RST
    abort_after: int  # chunks written before an abort

    @property
    def payload(self) -> bytes:
        return b"".join(self.chunks)

    def __repr__(self) -> str:
        """The plan without its bytes, for a failure message."""
        return (
            f"flow {self.index} to {self.server_ip}: server ending {self.server_ending}, "
            f"chunks {[len(chunk) for chunk in self.chunks]}, reading {self.reading}, "
            f"half-close early {self.half_close_early}, ending {self.ending}"
            + (f" after {self.abort_after} chunks" if self.ending == "abort" else "")
        )


def make_plan(index: int, rng: random.Random) -> Plan:
    roll = rng.random()
    if roll < 0.05:
        body = rng.randrange(256 << 10, 1 << 20)
    elif roll < 0.3:
        body = rng.randrange(2 << 10, 64 << 10)
    else:
        body = rng.randrange(0, 2 << 10)
    server_ending = rng.choice(
        [ECHO_TO_EOF, ECHO_TO_EOF, SERVER_HALF_CLOSES_FIRST, SERVER_CLOSES_FIRST]
    )
    payload = HEADER.pack(index, server_ending, HEADER.size + body) + rng.randbytes(body)
    cuts = sorted({rng.randrange(1, len(payload)) for _ in range(rng.randrange(0, 6))})
    bounds = [0, *cuts, len(payload)]
    chunks = tuple(payload[start:end] for start, end in itertools.pairwise(bounds))
    ending = rng.choices(["half_close", "close", "abort"], weights=[45, 45, 10])[0]
    return Plan(
        index=index,
        server_ip=rng.choice([SERVER_V4, SERVER_V6]),
        server_ending=server_ending,
        chunks=chunks,
        reading=rng.choice(["after", "concurrent", "lockstep"]),
        half_close_early=ending != "abort" and rng.random() < 0.3,
        ending=ending,
        abort_after=rng.randrange(0, len(chunks) + 1),
    )


def mismatch(got: bytes | bytearray, sent: bytes) -> str:
    """Where two byte strings part, for a failure message that does not print them."""
    at = next(
        (i for i, pair in enumerate(zip(got, sent, strict=False)) if pair[0] != pair[1]), None
    )
    at = min(len(got), len(sent)) if at is None else at
    return f"{len(got)} bytes for {len(sent)} sent, the first difference at {at}"


async def jitter(rng: random.Random) -> None:
    """Let the other flows run in between, now and then for a few milliseconds, to vary
    the orders in which the proxy sees the flows' events."""
    if rng.random() < 0.5:
        await trio.lowlevel.checkpoint()
    else:
        await trio.sleep(rng.uniform(0, 0.003))


@dataclass(slots=True)
class Seen:
    """What the server got on one flow, whether a reset ended it, and whether it is over."""

    data: bytearray = field(default_factory=bytearray)
    reset: bool = False
    over: bool = False


async def checking_echo_connection(sock: trio.socket.SocketType, seen: dict[int, Seen]) -> None:
    """Echo one flow as its header says, and record every byte that arrived."""
    record = Seen()
    limit: int | None = None  # the flow's length, where the server ends first
    index: int | None = None
    with sock:
        try:
            while limit is None or len(record.data) < limit:
                wanted = 1 << 16 if limit is None else limit - len(record.data)
                data = await sock.recv(wanted)
                if not data:
                    break
                record.data += data
                if index is None and len(record.data) >= HEADER.size:
                    index, server_ending, length = HEADER.unpack_from(record.data)
                    seen[index] = record
                    if server_ending != ECHO_TO_EOF:
                        limit = length
                await send_all(sock, data)
            if limit is None:
                sock.shutdown(socket.SHUT_WR)  # after the client's EOF
            elif server_ending == SERVER_HALF_CLOSES_FIRST:
                sock.shutdown(socket.SHUT_WR)
                record.data += await recv_until_eof(sock)
            # SERVER_CLOSES_FIRST: the ``with`` closes it, the client still open.
        except OSError:
            record.reset = True
        finally:
            record.over = True


async def checking_echo_server(
    listener: trio.socket.SocketType,
    seen: dict[int, Seen],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    with listener:
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                sock, _ = await listener.accept()
                nursery.start_soon(checking_echo_connection, sock, seen)


async def run_plan(lab: Lab, plan: Plan, rng: random.Random) -> None:
    """Play one flow from the client's side, checking the echo and the EOFs it gets."""
    payload = plan.payload
    client = trio.socket.from_stdlib_socket(lab.client.socket(family_of(plan.server_ip)))
    with client:
        await client.connect((plan.server_ip, 9090))
        await jitter(rng)
        if plan.ending == "abort":
            for chunk in plan.chunks[: plan.abort_after]:
                await send_all(client, chunk)
                await jitter(rng)
            reset_close(client)
            return
        echoed = bytearray()

        async def write() -> None:
            for chunk in plan.chunks:
                await send_all(client, chunk)
                if plan.reading == "lockstep":
                    echoed.extend(await recv_exactly(client, len(chunk)))
                await jitter(rng)
            if plan.half_close_early:
                client.shutdown(socket.SHUT_WR)

        if plan.reading == "concurrent":
            async with trio.open_nursery() as nursery:
                nursery.start_soon(write)
                echoed.extend(await recv_exactly(client, len(payload)))
        else:
            await write()
            if plan.reading == "after":
                echoed.extend(await recv_exactly(client, len(payload)))
        assert echoed == payload, f"the echo differs: {mismatch(echoed, payload)}"
        await jitter(rng)
        if plan.server_ending != ECHO_TO_EOF:
            # The server ends first; the client hears its EOF, then ends its own side.
            assert await recv_until_eof(client) == b""
            if plan.ending == "half_close" and not plan.half_close_early:
                client.shutdown(socket.SHUT_WR)
        elif plan.half_close_early or plan.ending == "half_close":
            if not plan.half_close_early:
                client.shutdown(socket.SHUT_WR)
            assert await recv_until_eof(client) == b""
        # ending "close": the ``with`` closes it now, without waiting for the server's EOF.


async def test_500_flows_in_random_orders_are_byte_exact(lab: Lab, cli_proxy: CliProxy) -> None:
    """500 flows, 50 at a time, over IPv4 and IPv6: each writes its bytes in random pieces,
    reads the echo after, during or piece by piece, and ends by half-close, close or RST,
    while the server ends first or last. Every echo is exact, the server gets every byte of
    every flow not aborted (a prefix of the aborted ones), and the proxy keeps no socket."""
    seed = int(os.environ.get("UPROXY_SCENARIO_SEED") or random.SystemRandom().randrange(1 << 32))
    print(f"randomized scenario seed {seed}: rerun with UPROXY_SCENARIO_SEED={seed}")
    plans = [make_plan(index, random.Random(f"{seed}:{index}")) for index in range(RANDOM_FLOWS)]
    cli_proxy.start("--log-level", "warning")
    baseline = cli_proxy.open_sockets()
    seen: dict[int, Seen] = {}
    limiter = trio.CapacityLimiter(RANDOM_CONCURRENCY)

    async def one(plan: Plan) -> None:
        async with limiter:
            try:
                await run_plan(lab, plan, random.Random(f"{seed}:{plan.index}:run"))
            except Exception as exc:
                exc.add_note(f"seed {seed}, {plan!r}")
                raise

    async with trio.open_nursery() as nursery:
        for server_ip in (SERVER_V4, SERVER_V6):
            listener = await listen(lab.server, server_ip, 9090)
            await nursery.start(checking_echo_server, listener, seen)
        with trio.fail_after(60):
            async with trio.open_nursery() as clients:
                for plan in plans:
                    clients.start_soon(one, plan)
            finished = [plan for plan in plans if plan.ending != "abort"]
            # The server's last reads can trail the client's end by a moment.
            await eventually(lambda: all(seen.get(plan.index, Seen()).over for plan in finished))
            await eventually(lambda: cli_proxy.open_sockets() == baseline)
        nursery.cancel_scope.cancel()
    for plan in plans:
        record = seen.get(plan.index)
        if plan.ending == "abort":
            assert record is None or plan.payload.startswith(record.data), (
                f"seed {seed}, {plan!r}: {mismatch(record.data, plan.payload)}"
            )
        else:
            assert record is not None, f"seed {seed}, {plan!r}: the server never saw it"
            assert not record.reset, f"seed {seed}, {plan!r}: reset at the server"
            assert record.data == plan.payload, (
                f"seed {seed}, {plan!r}: {mismatch(record.data, plan.payload)}"
            )
    assert cli_proxy.stop() == 0
