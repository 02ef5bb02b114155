"""Log every Redis command a client sends, without changing a byte.

    uproxy serve --interceptor examples/redis_log.py:log_commands

Commands are parsed from the RESP protocol (``*N`` arrays of ``$len`` bulk strings, or inline
commands) as they stream by; each chunk is passed on as soon as it arrives, and only a copy of
an incomplete command is kept until the rest of it comes.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from uproxy_trio import Direction, Flow, directions

LOGGER = logging.getLogger("uproxy.examples.redis")

# Arguments longer than this are shown shortened: a log line per command, not per value.
MAX_SHOWN = 40


@directions(Direction.CLIENT_TO_SERVER)
async def log_commands(
    flow: Flow, direction: Direction, chunks: AsyncIterator[bytes]
) -> AsyncIterator[bytes]:
    pending: bytes | None = b""  # None once the stream proved not to be RESP
    async for chunk in chunks:
        yield chunk
        if pending is None:
            continue
        pending += chunk
        try:
            while (parsed := parse_command(pending)) is not None:
                command, used = parsed
                pending = pending[used:]
                LOGGER.info("flow %d redis %s", flow.id, " ".join(_shown(a) for a in command))
        except ValueError:
            # A logger must never break the traffic it watches: stop parsing, keep relaying.
            LOGGER.warning("flow %d is not RESP; no longer logging its commands", flow.id)
            pending = None


def parse_command(data: bytes) -> tuple[list[bytes], int] | None:
    """One complete command at the start of ``data`` and its length in bytes, or ``None``."""
    if not data.startswith(b"*"):
        end = data.find(b"\r\n")
        return None if end == -1 else (data[:end].split(), end + 2)
    end = data.find(b"\r\n")
    if end == -1:
        return None
    count, position = int(data[1:end]), end + 2
    arguments = []
    for _ in range(count):
        end = data.find(b"\r\n", position)
        if end == -1:
            return None
        size = int(data[position + 1 : end])
        start, stop = end + 2, end + 2 + size
        if len(data) < stop + 2:
            return None
        arguments.append(data[start:stop])
        position = stop + 2
    return arguments, position


def _shown(argument: bytes) -> str:
    text = argument.decode("utf-8", "backslashreplace")
    return text if len(text) <= MAX_SHOWN else text[: MAX_SHOWN - 3] + "..."
