"""Interceptors in real flows: loading, onion order, half-close, metadata, faults, backpressure,
cleanup, and the examples."""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from lab_tools import (
    ADDRESSES,
    CliProxy,
    EventLog,
    both_ways,
    connect,
    echo_server,
    listen,
    open_flow,
    recv_exactly,
    recv_until_eof,
    reset_close,
    run_library_proxy,
    send_all,
    until_the_proxy_has_read,
)

from uproxy_netns import SERVER_V4, Lab
from uproxy_trio import Direction, Flow, FlowClosed, Interceptor, InterceptorFailed

pytestmark = pytest.mark.lab

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

TAGS_AND_FRIENDS = '''
from uproxy_trio import Direction


async def a(flow, direction, chunks):
    async for chunk in chunks:
        yield chunk + b"[a]"


async def b(flow, direction, chunks):
    async for chunk in chunks:
        yield chunk + b"[b]"


async def reverse(flow, direction, chunks):
    """Hold everything until this direction's EOF, then send it reversed."""
    held = b""
    async for chunk in chunks:
        held += chunk
    yield held[::-1]


async def explode(flow, direction, chunks):
    async for chunk in chunks:
        if b"boom" in chunk:
            1 / 0
        yield chunk
'''


@pytest.fixture
def interceptor_file(tmp_path: Path) -> Path:
    path = tmp_path / "my_interceptors.py"
    path.write_text(TAGS_AND_FRIENDS)
    return path


async def exchange(lab: Lab, request: bytes, respond: bool = True) -> tuple[bytes, bytes]:
    """Send ``request`` and EOF; the server reads to EOF and echoes what it got; return what
    the server saw and what the client got back."""
    with trio.fail_after(10):
        async with open_flow(lab, SERVER_V4) as (client, server, _):
            await send_all(client, request)
            client.shutdown(socket.SHUT_WR)
            seen = await recv_until_eof(server)
            if respond:
                await send_all(server, seen)
            server.close()
            back = await recv_until_eof(client)
    return seen, back


async def test_file_interceptors_form_an_onion(
    lab: Lab, cli_proxy: CliProxy, interceptor_file: Path
) -> None:
    cli_proxy.start("-i", f"{interceptor_file}:a", "-i", f"{interceptor_file}:b")
    seen, back = await exchange(lab, b"x")
    assert seen == b"x[a][b]"
    assert back == b"x[a][b][b][a]"


async def test_module_interceptor_with_arguments(lab: Lab, cli_proxy: CliProxy) -> None:
    cli_proxy.start("-i", 'uproxy_trio.interceptors:replace(b"secret", b"XXXXXX")')
    seen, back = await exchange(lab, b"my secret and your secret")
    assert seen == b"my XXXXXX and your XXXXXX"
    assert back == seen


async def test_hold_until_eof_works_with_half_close(
    lab: Lab, cli_proxy: CliProxy, interceptor_file: Path
) -> None:
    cli_proxy.start("-i", f"{interceptor_file}:reverse")
    with trio.fail_after(10):
        async with open_flow(lab, SERVER_V4) as (client, server, _):
            await send_all(client, b"hel")
            await until_the_proxy_has_read(lab, client)  # "lo" is another read
            await send_all(client, b"lo")
            client.shutdown(socket.SHUT_WR)
            # Only the client's EOF releases the held bytes; the server's side is still open.
            assert await recv_until_eof(server) == b"olleh"
            await send_all(server, b"abc")
            server.close()
            assert await recv_until_eof(client) == b"cba"


@pytest.mark.parametrize(("client_ip", "server_ip"), ADDRESSES)
async def test_interceptor_sees_the_flow(inside_proxy: Lab, client_ip: str, server_ip: str) -> None:
    lab = inside_proxy

    async def describe(
        flow: Flow, direction: Direction, chunks: AsyncIterator[bytes]
    ) -> AsyncIterator[bytes]:
        async for chunk in chunks:
            yield f"{flow.id}|{flow.client}|{flow.server}|{direction.value}|".encode() + chunk

    events = EventLog()
    async with trio.open_nursery() as nursery:
        await nursery.start(run_library_proxy, events, {"interceptors": [describe]})
        with trio.fail_after(10):
            async with open_flow(lab, server_ip) as (client, server, peer):
                await send_all(client, b"Q")
                expected_up = (
                    f"1|('{client_ip}', {peer[1]})|('{server_ip}', 9090)|client_to_server|Q"
                )
                assert await recv_exactly(server, len(expected_up)) == expected_up.encode()
                await send_all(server, b"R")
                expected_down = (
                    f"1|('{client_ip}', {peer[1]})|('{server_ip}', 9090)|server_to_client|R"
                )
                assert await recv_exactly(client, len(expected_down)) == expected_down.encode()
        nursery.cancel_scope.cancel()


async def test_exploding_interceptor_resets_only_its_own_flow(
    lab: Lab, cli_proxy: CliProxy, interceptor_file: Path
) -> None:
    cli_proxy.start("-i", f"{interceptor_file}:explode")
    with trio.fail_after(15), await listen(lab.server, SERVER_V4, 9090) as listener:
        calm_client = await connect(lab.client, SERVER_V4, 9090)
        calm_server, _ = await listener.accept()
        doomed_client = await connect(lab.client, SERVER_V4, 9090)
        doomed_server, _ = await listener.accept()

        await send_all(doomed_client, b"boom")
        with pytest.raises(ConnectionResetError):
            await recv_until_eof(doomed_client)
        with pytest.raises(ConnectionResetError):
            await recv_until_eof(doomed_server)

        # The other flow, opened before the fault, goes on untouched, both ways.
        await send_all(calm_client, b"still here")
        assert await recv_exactly(calm_server, 10) == b"still here"
        await send_all(calm_server, b"me too")
        assert await recv_exactly(calm_client, 6) == b"me too"
        calm_client.shutdown(socket.SHUT_WR)
        assert await recv_until_eof(calm_server) == b""
        calm_server.close()
        assert await recv_until_eof(calm_client) == b""
        for sock in (calm_client, doomed_client, doomed_server):
            sock.close()
    # And the server keeps taking new flows.
    seen, back = await exchange(lab, b"after")
    assert (seen, back) == (b"after", b"after")
    assert cli_proxy.stop() == 0
    log = cli_proxy.log
    assert "flow 2 interceptor failed (client_to_server); resetting the flow" in log
    assert "Traceback" in log
    assert "ZeroDivisionError" in log
    assert "flow 2 close reason=interceptor_failed" in log
    assert "flow 1 close reason=closed" in log


async def pass_on(
    flow: Flow, direction: Direction, chunks: AsyncIterator[bytes]
) -> AsyncIterator[bytes]:
    async for chunk in chunks:
        yield chunk


async def pass_on_and_swallow_errors(
    flow: Flow, direction: Direction, chunks: AsyncIterator[bytes]
) -> AsyncIterator[bytes]:
    """Ends quietly however its source ends: the relay must still tell a reset from an EOF."""
    try:
        async for chunk in chunks:
            yield chunk
    except OSError:
        return


@pytest.mark.parametrize("interceptor", [pass_on, pass_on_and_swallow_errors])
@pytest.mark.parametrize("resetting_side", ["server", "client"])
async def test_a_reset_on_an_intercepted_flow_resets_the_other_side(
    inside_proxy: Lab, interceptor: Interceptor, resetting_side: str
) -> None:
    lab = inside_proxy
    events = EventLog()
    async with trio.open_nursery() as nursery:
        await nursery.start(run_library_proxy, events, {"interceptors": [interceptor]})
        with trio.fail_after(10):
            async with open_flow(lab, SERVER_V4) as (client, server, _):
                await both_ways(client, server, b"up", b"down")
                aborting, survivor = (server, client)
                if resetting_side == "client":
                    aborting, survivor = client, server
                reset_close(aborting)
                # A RST, not a FIN: recv fails rather than reading to a clean EOF.
                with pytest.raises(ConnectionResetError):
                    await recv_until_eof(survivor)
            (closed,) = await events.wait_for(FlowClosed)
        nursery.cancel_scope.cancel()
    assert closed.reason == f"{resetting_side}_reset"
    assert events.of_type(InterceptorFailed) == []


async def test_a_stalled_interceptor_stops_reading_its_side(inside_proxy: Lab) -> None:
    lab = inside_proxy
    gate = trio.Event()

    async def wait_for_gate(
        flow: Flow, direction: Direction, chunks: AsyncIterator[bytes]
    ) -> AsyncIterator[bytes]:
        await gate.wait()
        async for chunk in chunks:
            yield chunk

    payload = os.urandom(64 << 20)
    sent = 0
    async with trio.open_nursery() as nursery:
        await nursery.start(run_library_proxy, EventLog(), {"interceptors": [wait_for_gate]})
        async with open_flow(lab, SERVER_V4) as (client, server, _):
            # Push as much as the path will take while the interceptor is stalled.
            with trio.move_on_after(2):
                while sent < len(payload):
                    sent += await client.send(payload[sent : sent + (1 << 20)])
            # Only the kernel's socket buffers hold anything: the proxy read nothing more.
            assert sent < 24 << 20, f"{sent} bytes accepted while the interceptor was stalled"
            gate.set()
            with trio.fail_after(30):

                async def finish_sending() -> None:
                    await send_all(client, payload[sent:])
                    client.shutdown(socket.SHUT_WR)

                nursery.start_soon(finish_sending)
                assert await recv_until_eof(server, limit=len(payload)) == payload
        nursery.cancel_scope.cancel()


async def test_generators_are_closed_however_the_flow_ends(inside_proxy: Lab) -> None:
    lab = inside_proxy
    closed: list[tuple[int, Direction]] = []

    async def watch(
        flow: Flow, direction: Direction, chunks: AsyncIterator[bytes]
    ) -> AsyncIterator[bytes]:
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            closed.append((flow.id, direction))

    events = EventLog()
    async with trio.open_nursery() as nursery:
        proxy_scope = trio.CancelScope()

        async def proxy(task_status: trio.TaskStatus[None]) -> None:
            with proxy_scope:
                await run_library_proxy(events, {"interceptors": [watch]}, task_status=task_status)

        await nursery.start(proxy)
        with await listen(lab.server, SERVER_V4, 9090) as listener, trio.fail_after(10):
            # Flow 1 ends cleanly, flow 2 by a client reset, flow 3 by the proxy stopping.
            ended_cleanly, _ = await exchange_on(lab, listener, reset=False)
            await exchange_on(lab, listener, reset=True)
            client = await connect(lab.client, SERVER_V4, 9090)
            server, _ = await listener.accept()
            await send_all(client, b"!")  # through the generators: flow 3 is relaying
            assert await recv_exactly(server, 1) == b"!"
            await events.wait_for(FlowClosed, 2)
            proxy_scope.cancel()
            with pytest.raises(ConnectionResetError):
                await recv_until_eof(client)
        for sock in (client, server):
            sock.close()
    assert set(closed) == {(flow, d) for flow in (1, 2, 3) for d in Direction}
    assert len(closed) == 6
    reasons = [event.reason for event in events.of_type(FlowClosed)]
    assert reasons == ["closed", "client_reset", "cancelled"]
    assert events.of_type(InterceptorFailed) == []
    assert ended_cleanly == b"hi"


async def exchange_on(
    lab: Lab, listener: trio.socket.SocketType, *, reset: bool
) -> tuple[bytes, None]:
    client = await connect(lab.client, SERVER_V4, 9090)
    server, _ = await listener.accept()
    with client, server:
        await send_all(client, b"hi")
        got = await recv_exactly(server, 2)
        if reset:
            reset_close(client)
            with pytest.raises(ConnectionResetError):
                await recv_until_eof(server)
        else:
            client.shutdown(socket.SHUT_WR)
            await recv_until_eof(server)
            server.shutdown(socket.SHUT_WR)
            await recv_until_eof(client)
    return got, None


# --- the examples ---------------------------------------------------------------------------


async def http_server(listener: trio.socket.SocketType, seen: list[bytes]) -> None:
    """Answer each request on one keep-alive connection with its body; record the heads."""
    sock, _ = await listener.accept()
    with sock:
        buffer = b""
        while True:
            while b"\r\n\r\n" not in buffer:
                data = await sock.recv(65536)
                if not data:
                    return
                buffer += data
            head, _, buffer = buffer.partition(b"\r\n\r\n")
            seen.append(head)
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.lower() == b"content-length":
                    length = int(value)
            while len(buffer) < length:
                buffer += await sock.recv(65536)
            body, buffer = buffer[:length], buffer[length:]
            await send_all(
                sock, b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body
            )


async def test_example_http_header(lab: Lab, cli_proxy: CliProxy) -> None:
    cli_proxy.start("-i", f"{EXAMPLES / 'http_add_header.py'}:add_forwarded_for")
    body = b"x" * 100_000
    seen: list[bytes] = []
    listener = await listen(lab.server, SERVER_V4, 9090)
    with listener, trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(http_server, listener, seen)
            client = await connect(lab.client, SERVER_V4, 9090)
            post = b"POST /up HTTP/1.1\r\nHost: s\r\nContent-Length: %d\r\n\r\n" % len(body)
            # Two requests on one connection, the second head split across reads.
            await send_all(client, post + body + b"GET /a HTTP/1.1\r\nHo")
            await until_the_proxy_has_read(lab, client)
            await send_all(client, b"st: s\r\n\r\n")
            first = await recv_exactly(client, 37 + len(str(len(body))) + len(body))
            second = await recv_exactly(client, 38)
            client.close()
    assert first.endswith(body)
    assert second == b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    assert seen == [
        b"POST /up HTTP/1.1\r\nX-Forwarded-For: 192.0.2.2\r\nHost: s\r\nContent-Length: 100000",
        b"GET /a HTTP/1.1\r\nX-Forwarded-For: 192.0.2.2\r\nHost: s",
    ]


async def test_example_redis_log(lab: Lab, cli_proxy: CliProxy) -> None:
    cli_proxy.start("-i", f"{EXAMPLES / 'redis_log.py'}:log_commands")
    commands = (
        b"*3\r\n$3\r\nSET\r\n$5\r\nfruit\r\n$5\r\napple\r\n*2\r\n$3\r\nGET\r\n$5\r\nfruit\r\n"
    )
    with trio.fail_after(10):
        async with open_flow(lab, SERVER_V4) as (client, server, _):
            # Pipelined, and cut in the middle of a bulk string.
            await send_all(client, commands[:30])
            await until_the_proxy_has_read(lab, client)
            await send_all(client, commands[30:] + b"PING\r\n")
            expected = commands + b"PING\r\n"
            assert await recv_exactly(server, len(expected)) == expected
            replies = b"+OK\r\n$5\r\napple\r\n+PONG\r\n"
            await send_all(server, replies)
            assert await recv_exactly(client, len(replies)) == replies
    assert cli_proxy.stop() == 0
    for line in ("redis SET fruit apple", "redis GET fruit", "redis PING"):
        assert f"flow 1 {line}" in cli_proxy.log


async def test_example_corrupt_every_nth_byte(lab: Lab, cli_proxy: CliProxy) -> None:
    corrupt = EXAMPLES / "corrupt.py"
    cli_proxy.start("-i", f'{corrupt}:corrupt_every(100, "client_to_server")')
    seen: list[bytes] = []
    async with trio.open_nursery() as nursery:
        listener = await listen(lab.server, SERVER_V4, 9090)
        await nursery.start(echo_server, listener)
        with trio.fail_after(10):
            client = await connect(lab.client, SERVER_V4, 9090)
            for size in (150, 1, 49, 300):  # reads that straddle the 100-byte marks
                await send_all(client, bytes(size))
                seen.append(await recv_exactly(client, size))
            client.close()
        nursery.cancel_scope.cancel()
    got = b"".join(seen)
    assert [i for i, byte in enumerate(got) if byte] == [99, 199, 299, 399, 499]
    assert all(got[i] == 0xFF for i in (99, 199, 299, 399, 499))
