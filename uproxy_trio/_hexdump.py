"""Watching the bytes go by: every chunk logged with its flow and direction."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from ._address import format_address
from ._flow import Direction, Flow
from ._interceptor import Interceptor, interceptor_factory

LOGGER = logging.getLogger("uproxy_trio.hexdump")

_BYTES_PER_LINE = 16


@interceptor_factory
def hexdump(max_bytes: int = 512, *, logger: logging.Logger = LOGGER) -> Interceptor:
    """Log each chunk as a hex dump (``xxd`` style, at most ``max_bytes`` of it) at INFO.

    The bytes pass on unchanged. The dump is only formatted when the logger would emit it,
    so a proxy running at ``--log-level warning`` pays one level check per chunk.
    """

    async def dump(
        flow: Flow, direction: Direction, chunks: AsyncIterator[bytes]
    ) -> AsyncIterator[bytes]:
        arrow = "->" if direction is Direction.CLIENT_TO_SERVER else "<-"
        route = f"{format_address(flow.client)} {arrow} {format_address(flow.server)}"
        offset = 0
        async for chunk in chunks:
            if logger.isEnabledFor(logging.INFO):
                logger.info(
                    "flow %d %s %s %d bytes at %d\n%s",
                    flow.id,
                    direction.value,
                    route,
                    len(chunk),
                    offset,
                    format_hexdump(chunk, max_bytes, offset),
                )
            offset += len(chunk)
            yield chunk

    return dump


def format_hexdump(data: bytes, max_bytes: int = 512, offset: int = 0) -> str:
    """``xxd``-like lines: stream offset, hex bytes, printable ASCII."""
    lines = []
    shown = data[:max_bytes]
    for start in range(0, len(shown), _BYTES_PER_LINE):
        row = shown[start : start + _BYTES_PER_LINE]
        hex_part = " ".join(f"{byte:02x}" for byte in row)
        text = "".join(chr(byte) if 32 <= byte < 127 else "." for byte in row)
        lines.append(f"{offset + start:08x}  {hex_part:<{_BYTES_PER_LINE * 3 - 1}}  {text}")
    if len(data) > max_bytes:
        lines.append(f"... {len(data) - max_bytes} more bytes")
    return "\n".join(lines)
