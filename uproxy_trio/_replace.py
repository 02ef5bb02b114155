"""Replacing bytes in a stream whose reads fall anywhere, including across a match.

Both interceptors give the same output for any split of the input into chunks as
``bytes.replace`` / ``re.sub`` on the whole input (a property test holds them to it). The
price is holding back the bytes that might still become part of a match.

On a UDP session each datagram is a message of its own: it is replaced whole, and nothing is
ever held back for the next one (a match never spans two datagrams).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

from ._flow import Direction, Flow
from ._interceptor import Interceptor, directions, interceptor_factory


@interceptor_factory
def replace(old: bytes, new: bytes, *, direction: Direction | str | None = None) -> Interceptor:
    """Replace every ``old`` with ``new``, as ``bytes.replace`` would on the whole stream.

    Only a tail that is a prefix of ``old`` is held back until the next read (or EOF), so an
    interactive protocol is never stalled by bytes that cannot match. ``direction`` limits it
    to one way.
    """
    if not old:
        raise ValueError("replace() needs a non-empty pattern")

    async def replace_bytes(
        flow: Flow, direction: Direction, chunks: AsyncIterator[bytes]
    ) -> AsyncIterator[bytes]:
        if flow.transport == "udp":
            async for datagram in chunks:
                yield datagram.replace(old, new)
            return
        carry = b""
        async for chunk in chunks:
            data = carry + chunk if carry else chunk
            matched_end = _end_of_matches(data, old)
            # After the last complete match nothing matches, except perhaps at the very end:
            # hold back the longest end that the next read could complete.
            keep = _prefix_at_end(data[matched_end:], old)
            settled = len(data) - keep
            carry = data[settled:]
            replaced = data[:matched_end].replace(old, new) + data[matched_end:settled]
            if replaced:
                yield replaced
        if carry:
            yield carry

    return _restricted(replace_bytes, direction)


def _end_of_matches(data: bytes, pattern: bytes) -> int:
    """Where the last match ends when matches are taken left to right, as replace() does."""
    end = 0
    while (found := data.find(pattern, end)) != -1:
        end = found + len(pattern)
    return end


def _prefix_at_end(data: bytes, pattern: bytes) -> int:
    """How many bytes at the end of ``data`` are a proper prefix of ``pattern``."""
    for size in range(min(len(pattern) - 1, len(data)), 0, -1):
        if data.endswith(pattern[:size]):
            return size
    return 0


@interceptor_factory
def regex_replace(
    pattern: bytes | str,
    replacement: bytes | str,
    *,
    max_match: int = 4096,
    direction: Direction | str | None = None,
) -> Interceptor:
    """``re.sub(pattern, replacement, stream)`` for a pattern that reads at most ``max_match``
    bytes from where a match starts, lookaheads included (``a(?!bb)`` reads three).

    Python's ``re`` cannot say whether a tail might still match, so the last ``max_match``
    bytes are held back until more arrive or the direction ends: use it on streams that keep
    flowing or end (HTTP bodies, files), and ``replace`` for literals on interactive ones.
    The pattern may not match the empty string, nor look behind further than the held tail.
    """
    regex = re.compile(pattern.encode() if isinstance(pattern, str) else pattern)
    template = replacement.encode() if isinstance(replacement, str) else replacement
    if regex.fullmatch(b"") is not None:
        raise ValueError("regex_replace() needs a pattern that cannot match empty bytes")
    if max_match < 1:
        raise ValueError("max_match must be at least 1")

    async def replace_regex(
        flow: Flow, direction: Direction, chunks: AsyncIterator[bytes]
    ) -> AsyncIterator[bytes]:
        if flow.transport == "udp":
            async for datagram in chunks:
                yield regex.sub(template, datagram)
            return
        carry = b""
        async for chunk in chunks:
            data = carry + chunk
            # A match that starts before `settled` is complete within `data` and cannot grow.
            settled = len(data) - max_match
            out, position = _substitute(regex, template, data, settled)
            cut = max(position, settled)
            carry = data[cut:]
            out.append(data[position:cut])
            replaced = b"".join(out)
            if replaced:
                yield replaced
        if carry:
            out, position = _substitute(regex, template, carry, len(carry) + 1)
            out.append(carry[position:])
            yield b"".join(out)

    return _restricted(replace_regex, direction)


def _substitute(
    regex: re.Pattern[bytes], template: bytes, data: bytes, settled: int
) -> tuple[list[bytes], int]:
    out: list[bytes] = []
    position = 0
    for match in regex.finditer(data):
        if match.start() >= settled:
            break
        out.append(data[position : match.start()])
        out.append(match.expand(template))
        position = match.end()
    return out, position


def _restricted(interceptor: Interceptor, direction: Direction | str | None) -> Interceptor:
    return interceptor if direction is None else directions(direction)(interceptor)
