"""Many bulk flows through the lab's proxy, from a process of their own.

Opens ``--flows`` connections from the client namespace to a sink in the server namespace
(through the proxy, like any flow to port 9090) and writes as fast as they take bytes, for
``--seconds``, then closes them all. Being a separate process, it loads the proxy without
sharing its event loop. Prints ``ready`` once every flow is connected and has moved bytes.

    python tests/bulk_load.py --client NS --server NS --host 198.51.100.2 --flows 200 --seconds 3
"""

from __future__ import annotations

import argparse
import selectors
import socket
import sys
import time

from uproxy_netns import Namespace

CHUNK = bytes(65536)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--client", required=True)
    parser.add_argument("--server", required=True)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, default=9090)
    parser.add_argument("--flows", type=int, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    args = parser.parse_args()
    client_ns, server_ns = Namespace(args.client), Namespace(args.server)
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET

    listener = server_ns.socket(family)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((args.host, args.port))
    listener.listen(4096)
    selector = selectors.DefaultSelector()
    senders, sinks = [], []
    for _ in range(args.flows):
        sender = client_ns.socket(family)
        sender.connect((args.host, args.port))
        sink, _ = listener.accept()
        for sock in (sender, sink):
            sock.setblocking(False)
        selector.register(sender, selectors.EVENT_WRITE)
        selector.register(sink, selectors.EVENT_READ)
        senders.append(sender)
        sinks.append(sink)
    listener.close()

    received = dict.fromkeys(sinks, 0)
    announced = False
    ends = time.monotonic() + args.seconds
    buffer = bytearray(1 << 20)
    while time.monotonic() < ends:
        for key, events in selector.select(0.1):
            ready = key.fileobj
            if not isinstance(ready, socket.socket):
                continue
            try:
                if events & selectors.EVENT_WRITE:
                    ready.send(CHUNK)
                else:
                    received[ready] += ready.recv_into(buffer)
            except BlockingIOError:
                pass
        if not announced and all(received.values()):
            print("ready", flush=True)
            announced = True
    for sock in senders + sinks:
        sock.close()
    if not announced:
        sys.exit("not every flow moved bytes")


if __name__ == "__main__":
    main()
