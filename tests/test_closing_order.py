"""A server that answers and closes reaches the client as one: the answer's last bytes and the
FIN together. Without the proxy the client would see them so, and a client that closes as
soon as it has the answer then closes second: its socket does not linger in TIME_WAIT."""

from __future__ import annotations

import socket

import trio
from lab_tools import EventLog, connect, listen, recv_exactly, send_all

from uproxy_netns import SERVER_V4, Lab
from uproxy_trio._direction import READ_SIZE, DirectionState

FLOWS = 20
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"


def test_only_a_short_read_after_the_peers_fin_drains_to_eof() -> None:
    assert DirectionState.drains_to_eof(10, READ_SIZE, peer_closed=4)
    assert not DirectionState.drains_to_eof(10, READ_SIZE, peer_closed=0)
    assert not DirectionState.drains_to_eof(READ_SIZE, READ_SIZE, peer_closed=4)


async def answer_and_close(listener: trio.socket.SocketType) -> None:
    while True:
        sock, _ = await listener.accept()
        with sock:
            await recv_exactly(sock, 3)
            # The answer and the FIN leave in one segment, as from a server that writes its
            # last bytes and closes at once.
            assert await sock.send(ANSWER, socket.MSG_MORE) == len(ANSWER)
            sock.shutdown(socket.SHUT_WR)


async def test_a_client_that_closes_on_the_answer_closes_second(
    inside_proxy: Lab, library_proxy: EventLog
) -> None:
    lab = inside_proxy
    async with trio.open_nursery() as nursery:
        listener = await listen(lab.server, SERVER_V4, 9090)
        nursery.start_soon(answer_and_close, listener)
        with trio.fail_after(20):
            for _ in range(FLOWS):
                client = await connect(lab.client, SERVER_V4, 9090)
                with client:
                    await send_all(client, b"GET")
                    assert await recv_exactly(client, len(ANSWER)) == ANSWER
                # closed here, at once, as an HTTP client with its whole answer does
        nursery.cancel_scope.cancel()
    lingering = lab.client.run(["ss", "-tanH", "state", "time-wait", "dport = :9090"])
    assert lingering.strip() == "", f"the client closed first:\n{lingering}"
