"""``uproxy demo``: the proxy at work in a lab of its own, told as a short transcript.

The lab is built, the library runs in-process in the proxy namespace (every socket the
proxy makes belongs to the namespace current when it is made), and one conversation per IP
version goes from the client namespace to a server namespace through it, then one DNS-like
UDP exchange per IP version, whose answer an interceptor rewrites. The lab is
removed whatever happens, Ctrl-C included.
"""

from __future__ import annotations

import signal
import socket
from collections.abc import AsyncIterator, Callable
from types import FrameType
from typing import Annotated

import trio
import typer

import uproxy_trio
from uproxy_netns import (
    CLIENT_V4,
    CLIENT_V6,
    SERVER_V4,
    SERVER_V6,
    Lab,
    LabError,
    Namespace,
    TproxySetup,
)
from uproxy_trio import Direction, Flow, FlowEvent, FlowOpened, Interceptor, format_address

from ._errors import CommandError

DEMO_PORT = 9090
PROXY_PORT = 9091
DEMO_TPROXY = TproxySetup(
    ports=str(DEMO_PORT), listen_port=PROXY_PORT, syn_to_tproxy=True, udp_ports=str(DEMO_PORT)
)
# The UDP exchange: a question, the server's answer, and what the interceptor makes of it.
QUESTION = b"Q example.test A"
ANSWER = b"A example.test 198.51.100.77"
REWRITTEN = b"A example.test 203.0.113.99"
# Bounds a demo that hangs (it should take well under a second).
DEMO_TIMEOUT_S = 20

Say = Callable[[str], None]


def shout(say: Say) -> Interceptor:
    """The demo's interceptor: the client's words reach the server in capitals, and every
    change is told in the transcript."""

    async def capitals(
        flow: Flow, direction: Direction, chunks: AsyncIterator[bytes]
    ) -> AsyncIterator[bytes]:
        async for chunk in chunks:
            if direction is Direction.CLIENT_TO_SERVER and flow.transport == "tcp":
                changed = chunk.upper()
                say(f"  interceptor   flow {flow.id} client->server: {chunk!r} -> {changed!r}")
                yield changed
            else:
                yield chunk

    return capitals


def rewrite_answer(say: Say) -> Interceptor:
    """The demo's UDP interceptor: each answer datagram (one chunk) is rewritten whole."""

    async def answers(
        flow: Flow, direction: Direction, chunks: AsyncIterator[bytes]
    ) -> AsyncIterator[bytes]:
        async for datagram in chunks:
            if flow.transport == "udp" and direction is Direction.SERVER_TO_CLIENT:
                changed = datagram.replace(ANSWER, REWRITTEN)
                say(f"  interceptor   session {flow.id} server->client: {changed!r}")
                yield changed
            else:
                yield datagram

    return answers


def _socket(
    namespace: Namespace, host: str, kind: socket.SocketKind = socket.SOCK_STREAM
) -> trio.socket.SocketType:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return trio.socket.from_stdlib_socket(namespace.socket(family, kind))


async def _read_to_eof(sock: trio.socket.SocketType) -> bytes:
    received = bytearray()
    while data := await sock.recv(65536):
        received += data
    return bytes(received)


async def _send(sock: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[await sock.send(view) :]


async def _conversation(lab: Lab, client_ip: str, server_ip: str, say: Say) -> None:
    listener = _socket(lab.server, server_ip)
    with listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        await listener.bind((server_ip, DEMO_PORT))
        listener.listen(1)
        client = _socket(lab.client, client_ip)
        with client:
            say(f"  client        {client_ip} connects to {format_address((server_ip, DEMO_PORT))}")
            await client.connect((server_ip, DEMO_PORT))
            server, peer = await listener.accept()
            with server:
                mine = format_address(client.getsockname()[:2])
                seen = format_address((str(peer[0]), int(peer[1])))
                same = "the client's own address" if seen == mine else f"NOT the client's {mine}"
                say(f"  server        accepted a connection from {seen} ({same})")
                request = f"hello from {client_ip}".encode()
                say(f"  client sends  {request!r}")
                await _send(client, request)
                client.shutdown(socket.SHUT_WR)
                say(f"  server got    {await _read_to_eof(server)!r}")
                reply = b"hello back"
                say(f"  server sends  {reply!r} and closes")
                await _send(server, reply)
            say(f"  client got    {await _read_to_eof(client)!r}")


async def _udp_exchange(lab: Lab, client_ip: str, server_ip: str, say: Say) -> None:
    server_address = (server_ip, DEMO_PORT)
    with (
        _socket(lab.server, server_ip, socket.SOCK_DGRAM) as server,
        _socket(lab.client, client_ip, socket.SOCK_DGRAM) as client,
    ):
        await server.bind(server_address)
        await client.bind((client_ip, 0))
        say(f"  client        sends {QUESTION!r} to {format_address(server_address)} (UDP)")
        await client.sendto(QUESTION, server_address)
        question, peer = await server.recvfrom(512)
        mine = format_address(client.getsockname()[:2])
        seen = format_address((str(peer[0]), int(peer[1])))
        same = "the client's own address" if seen == mine else f"NOT the client's {mine}"
        say(f"  server        got {question!r} from {seen} ({same}), answers {ANSWER!r}")
        await server.sendto(ANSWER, peer)
        answer, source = await client.recvfrom(512)
        origin = format_address((str(source[0]), int(source[1])))
        said = "the original destination" if origin == format_address(server_address) else "?"
        say(f"  client got    {answer!r} from {origin} ({said})")


async def run_demo(lab: Lab, say: Say, wait: bool) -> None:
    """The conversations (and, with ``wait``, a pause until Ctrl-C); a signal ends it early."""

    def told(event: FlowEvent) -> None:
        if isinstance(event, FlowOpened) and event.flow.transport == "udp":
            flow = event.flow
            say(
                f"  proxy         took UDP session {flow.id}: client={format_address(flow.client)} "
                f"server={format_address(flow.server)}, relaying from the client's address"
            )
        elif isinstance(event, FlowOpened):
            flow = event.flow
            say(
                f"  proxy         took flow {flow.id}: client={format_address(flow.client)} "
                f"server={format_address(flow.server)}, connecting out from the client's address"
            )

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def stop_on_signal() -> None:
                async for _ in signals:
                    say("interrupted")
                    nursery.cancel_scope.cancel()

            nursery.start_soon(stop_on_signal)
            await nursery.start(
                lambda task_status: uproxy_trio.serve(
                    [("127.0.0.1", PROXY_PORT), ("::1", PROXY_PORT)],
                    interceptors=[shout(say), rewrite_answer(say)],
                    on_event=told,
                    udp_listen=[("127.0.0.1", PROXY_PORT), ("::1", PROXY_PORT)],
                    task_status=task_status,
                )
            )
            say(f"proxy listening on 127.0.0.1:{PROXY_PORT} and [::1]:{PROXY_PORT}")
            with trio.fail_after(DEMO_TIMEOUT_S):
                for version, client_ip, server_ip in (
                    (4, CLIENT_V4, SERVER_V4),
                    (6, CLIENT_V6, SERVER_V6),
                ):
                    say(f"IPv{version}:")
                    await _conversation(lab, client_ip, server_ip, say)
                for version, client_ip, server_ip in (
                    (4, CLIENT_V4, SERVER_V4),
                    (6, CLIENT_V6, SERVER_V6),
                ):
                    say(f"IPv{version}, UDP:")
                    await _udp_exchange(lab, client_ip, server_ip, say)
            if wait:
                say("the lab stays up until Ctrl-C; meanwhile, for example:")
                say(f"  ip netns exec {lab.client.name} ss -tn")
                say("press Ctrl-C to take it down")
                await trio.sleep_forever()
            nursery.cancel_scope.cancel()


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def demo(
    wait: Annotated[
        bool,
        typer.Option(
            "--wait",
            envvar="UPROXY_DEMO_WAIT",
            help="Keep the lab (and the proxy) up after the transcript until Ctrl-C.",
        ),
    ] = False,
) -> None:
    """Show the proxy at work: build a lab, send traffic through it, take it down again.

    A client namespace talks to a server namespace over IPv4 and IPv6 through a router
    namespace whose TPROXY rules hand each connection to uproxy (the library, run in that
    namespace), then asks a DNS-like question over UDP. The transcript shows who connected
    to whom, that the server sees the client's own address, that the UDP answer comes from
    the original destination, and what the interceptors changed. Needs root; leaves nothing
    behind, also on Ctrl-C.

    \b
    Examples:
      uproxy demo
      bash netns/demo          # a fresh Debian machine: installs what is missing first
    """

    def say(line: str) -> None:
        typer.echo(line)

    # SIGTERM stops the demo as Ctrl-C does, so that the lab is removed either way.
    signal.signal(signal.SIGTERM, _interrupt)
    lab = Lab.owned(DEMO_TPROXY)
    try:
        say(f"building lab {lab.tag}: client ─ proxy (router with TPROXY) ─ server")
        lab.up()
        with lab.proxy.entered():
            trio.run(run_demo, lab, say, wait)
    except LabError as exc:
        raise CommandError(str(exc)) from None
    finally:
        # A second Ctrl-C must not cut the teardown short.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            lab.down()
        finally:
            signal.signal(signal.SIGINT, previous)
        say(f"lab {lab.tag} removed")
