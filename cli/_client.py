"""The control API as the ``uproxy flows`` and ``uproxy toxic`` commands call it: httpx, over
TCP or a Unix socket, every failure one line.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ._errors import EXIT_USAGE, CommandError
from ._http import HttpAddress, format_http_address, parse_http_address

if TYPE_CHECKING:
    import httpx

DEFAULT_CONTROL = "127.0.0.1:8474"
TIMEOUT_S = 10.0

ControlOption = Annotated[
    str,
    typer.Option(
        "--control",
        metavar="HOST:PORT|unix:PATH",
        envvar="UPROXY_CONTROL",
        help="Where `uproxy serve --control` serves the control API.",
    ),
]


class ControlClient:
    """Calls to one control API; ``call`` answers the decoded JSON, or raises ``CommandError``
    with the server's error or why it could not be reached."""

    def __init__(self, where: str) -> None:
        # Imported here: every `uproxy` command loads this module, and httpx would add 0.1 s
        # to the start of each `uproxy serve` and of each of its workers, which never call.
        import httpx

        try:
            self.where: HttpAddress = parse_http_address(where)
        except ValueError as exc:
            raise CommandError(f"--control: {exc}", EXIT_USAGE) from None
        if isinstance(self.where, tuple):
            transport = httpx.HTTPTransport()
            base = f"http://{format_http_address(self.where)}"
        else:
            transport = httpx.HTTPTransport(uds=str(self.where))
            base = "http://uproxy"  # the host is not looked at over a Unix socket
        self._client = httpx.Client(base_url=base, transport=transport, timeout=TIMEOUT_S)

    def call(self, method: str, path: str, body: Any = None) -> Any:
        import httpx

        try:
            response = self._client.request(method, path, json=body)
        except httpx.TransportError as exc:
            reason = _reason(exc)
            where = format_http_address(self.where)
            raise CommandError(f"cannot reach the control API at {where}: {reason}") from None
        if response.is_error:
            raise CommandError(_error_of(response))
        if response.status_code == 204 or not response.content:
            return None
        return response.json()

    def close(self) -> None:
        self._client.close()


def _reason(exc: httpx.TransportError) -> str:
    """The innermost cause, which names what happened (connection refused, no such file)."""
    cause: BaseException = exc
    while cause.__cause__ is not None or cause.__context__ is not None:
        cause = cause.__cause__ or cause.__context__  # type: ignore[assignment]
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror.lower()
    return str(cause) or type(cause).__name__


def _error_of(response: httpx.Response) -> str:
    try:
        body = response.json()
    except json.JSONDecodeError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return f"{body['error']} ({response.status_code})"
    return f"the control API answered {response.status_code} {response.reason_phrase}"
