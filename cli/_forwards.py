"""``--forward LISTEN=UPSTREAM`` and the config file's ``[[forwards]]``: plain (not
transparent) listeners that relay to one fixed upstream, as Toxiproxy's proxies do.

A forward is named by its LISTEN text unless the config file names it; the name is what the
control API shows it under.
"""

from __future__ import annotations

from collections.abc import Sequence

from uproxy_trio import Forward, Interceptor, parse_address

USAGE = "expected LISTEN=UPSTREAM, as 127.0.0.1:26379=127.0.0.1:6379"


def parse_forward(
    text: str, name: str | None = None, interceptors: Sequence[Interceptor] = ()
) -> Forward:
    """``LISTEN=UPSTREAM``, both ``HOST:PORT``; ``ValueError`` in one line."""
    listen, sep, upstream = text.partition("=")
    if not sep or not listen or not upstream:
        raise ValueError(f"{text!r}: {USAGE}")
    return Forward(
        name or listen,
        parse_address(listen.strip()),
        parse_address(upstream.strip()),
        tuple(interceptors),
    )


def check_names(forwards: Sequence[Forward], taken: Sequence[str] = ()) -> None:
    """Forward names are unique, and apart from the routes' (one namespace in the API)."""
    seen = set(taken)
    for forward in forwards:
        if forward.name in seen:
            raise ValueError(f"two forwards or routes are named {forward.name!r}")
        seen.add(forward.name)
