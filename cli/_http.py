"""The one HTTP server of ``uproxy serve``: an ASGI app on hypercorn's Trio worker, on a TCP
address or a Unix socket. It serves ``/metrics``, and the control API when ``--control`` is
given; no HTTP is parsed here, hypercorn does it.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import cast

import trio
from hypercorn.config import Config, Sockets
from hypercorn.trio.run import worker_serve
from hypercorn.typing import Framework
from hypercorn.utils import wrap_app
from starlette.types import ASGIApp

from uproxy_trio import Address, format_address, parse_address

from ._errors import CommandError

LOGGER = logging.getLogger("uproxy.http")

UNIX_PREFIX = "unix:"
# A Unix socket is connectable by whoever may write to it: its owner only (mode 0600).
UNIX_UMASK = 0o177

HttpAddress = Address | Path
"""Where the HTTP server listens: ``(host, port)``, or the path of a Unix socket."""


def parse_http_address(text: str) -> HttpAddress:
    """``HOST:PORT`` (``[V6HOST]:PORT``) or ``unix:PATH``; ``ValueError`` in one line."""
    if text.startswith(UNIX_PREFIX):
        path = text[len(UNIX_PREFIX) :]
        if not path:
            raise ValueError(f"{text!r}: unix: needs a path, as unix:/run/uproxy.sock")
        return Path(path)
    return parse_address(text)


def format_http_address(where: HttpAddress) -> str:
    """Render an address the way ``parse_http_address`` reads it back."""
    return f"{UNIX_PREFIX}{where}" if isinstance(where, Path) else format_address(where)


def url_of(where: HttpAddress, path: str) -> str:
    """What a user would type to reach ``path`` (for the log line)."""
    if isinstance(where, Path):
        return f"{format_http_address(where)} {path}"
    return f"http://{format_address(where)}{path}"


async def serve_http(
    where: HttpAddress,
    app: ASGIApp,
    what: str,
    path: str = "/",
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``where`` until cancelled; ``what`` names it in a bind error (``cannot
    serve metrics on 127.0.0.1:9200: address already in use``), and ``path`` is the one the
    log line shows."""
    config = Config()
    config.bind = [format_http_address(where)]
    config.umask = UNIX_UMASK
    # Our own logger, quiet unless something goes wrong; no access log (flows have theirs).
    config.errorlog = logging.getLogger("uproxy.http.server")
    config.errorlog.setLevel(logging.WARNING)
    config.accesslog = None
    config.include_server_header = False
    # On shutdown, an API call in progress has this long to finish.
    config.graceful_timeout = 1.0
    # Bound here rather than inside hypercorn, so that a bind error is an OSError of its own
    # (inside, it would come wrapped in hypercorn's nurseries' exception groups).
    try:
        sockets = config.create_sockets()
    except OSError as exc:
        reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
        message = f"cannot serve {what} on {format_http_address(where)}: {reason}"
        raise CommandError(message) from None
    LOGGER.info("%s on %s", what, url_of(where, path))
    try:
        _listen(sockets, config.backlog)
        # Starlette's and hypercorn's ASGI type hints differ only in their names.
        wrapped = wrap_app(cast(Framework, app), config.wsgi_max_body_size, "asgi")
        await worker_serve(wrapped, config, sockets=sockets, task_status=task_status)
    finally:
        for sock in sockets.insecure_sockets:
            sock.close()
        if isinstance(where, Path):
            _remove_socket(where)


def _listen(sockets: Sockets, backlog: int) -> None:
    for sock in sockets.insecure_sockets:
        sock.listen(backlog)


def _remove_socket(path: Path) -> None:
    """The socket file outlives its listener; remove it, unless something else took the
    name since."""
    try:
        if stat.S_ISSOCK(path.lstat().st_mode):
            path.unlink()
    except OSError:
        pass
