"""Add ``X-Forwarded-For`` (the client's own address) to every HTTP/1.1 request.

    uproxy serve --interceptor examples/http_add_header.py:add_forwarded_for

A transparent proxy is the one place where the client's address is known for certain, and a
server behind it may want it in a header. Requests are found by parsing just enough HTTP/1.1:
the head up to the blank line, then ``Content-Length`` bytes of body, then the next request on
the same keep-alive connection. A request with a chunked body, or a head larger than
``MAX_HEAD`` bytes, ends the parsing: the rest of that flow passes through untouched.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from uproxy_trio import Direction, Flow, directions

MAX_HEAD = 64 * 1024


@directions(Direction.CLIENT_TO_SERVER)
async def add_forwarded_for(
    flow: Flow, direction: Direction, chunks: AsyncIterator[bytes]
) -> AsyncIterator[bytes]:
    header = f"X-Forwarded-For: {flow.client[0]}\r\n".encode()
    pending = b""  # bytes of a request head not complete yet
    body_left = 0
    passthrough = False
    async for chunk in chunks:
        if passthrough:
            yield chunk
            continue
        pending += chunk
        out = []
        while pending:
            if body_left:
                body, pending = pending[:body_left], pending[body_left:]
                body_left -= len(body)
                out.append(body)
                continue
            end = pending.find(b"\r\n\r\n")
            if end == -1:
                if len(pending) > MAX_HEAD:
                    out.append(pending)
                    pending, passthrough = b"", True
                break
            head, pending = pending[: end + 2], pending[end + 4 :]
            request_line, _, fields = head.partition(b"\r\n")
            out.append(request_line + b"\r\n" + header + fields + b"\r\n")
            body_left, chunked = _body_of(fields)
            if chunked:
                out.append(pending)
                pending, passthrough = b"", True
        if out:
            yield b"".join(out)
    if pending:
        yield pending


def _body_of(fields: bytes) -> tuple[int, bool]:
    """(Content-Length, whether the body is chunked) from a request's header fields."""
    length, chunked = 0, False
    for line in fields.split(b"\r\n"):
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length" and value.strip().isdigit():
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    return length, chunked
