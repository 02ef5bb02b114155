"""The Typer application behind the ``uproxy`` command."""

from __future__ import annotations

import errno
import logging
import sys
from collections.abc import Sequence
from typing import Annotated

import typer

import uproxy_trio
from uproxy_trio import Address, Interceptor, TransparencyUnavailable, parse_address
from uproxy_trio.interceptors import label as label_interceptor

from ._bench import bench
from ._errors import EXIT_RUNTIME, EXIT_USAGE, CommandError, fail
from ._serve import run_proxy, run_unwrapped
from ._spec import SpecError, load_interceptor

app = typer.Typer(
    name="uproxy",
    help="A transparent TCP proxy for Linux TPROXY rules, with interceptors on Trio.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

LOG_LEVELS = ("debug", "info", "warning", "error")


def _parse_listen(values: Sequence[str]) -> list[Address]:
    addresses = []
    for value in values:
        try:
            addresses.append(parse_address(value))
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="'--listen'") from None
    return addresses


def _load_interceptors(specs: Sequence[str]) -> list[Interceptor]:
    try:
        return [load_interceptor(spec) for spec in specs]
    except SpecError as exc:
        raise typer.BadParameter(str(exc), param_hint="'--interceptor'") from None


def _version(value: bool) -> None:
    if value:
        print(f"uproxy {uproxy_trio.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """A transparent TCP proxy for Linux TPROXY rules, with interceptors on Trio."""


@app.command()
def serve(
    listen: Annotated[
        list[str] | None,
        typer.Option(
            "--listen",
            "-l",
            metavar="HOST:PORT",
            envvar="UPROXY_LISTEN",
            help="Address the TPROXY rule delivers to; repeat for more (IPv6 as [::1]:9091). "
            "[default: 127.0.0.1:9091]",
            show_default=False,
        ),
    ] = None,
    connect_timeout: Annotated[
        float,
        typer.Option(
            "--connect-timeout",
            min=0.001,
            metavar="SECONDS",
            envvar="UPROXY_CONNECT_TIMEOUT",
            help="Give up on an unanswered upstream after this long and reset the client.",
        ),
    ] = uproxy_trio.DEFAULT_CONNECT_TIMEOUT_S,
    label: Annotated[
        str | None,
        typer.Option(
            "--label",
            metavar="TEXT",
            envvar="UPROXY_LABEL",
            help="Append TEXT and a newline to every read, both ways (the seed proxy's label).",
        ),
    ] = None,
    interceptor: Annotated[
        list[str] | None,
        typer.Option(
            "--interceptor",
            "-i",
            metavar="SPEC",
            envvar="UPROXY_INTERCEPTOR",
            help="path/to/file.py:name or package.module:name; repeat to stack them, the first "
            "closest to the client.",
        ),
    ] = None,
    log_level: Annotated[
        str,
        typer.Option(
            "--log-level", envvar="UPROXY_LOG_LEVEL", help=f"One of {', '.join(LOG_LEVELS)}."
        ),
    ] = "info",
) -> None:
    """Relay TPROXY'd flows from the client's own address to their original destination.

    Example, behind the rules in the README: uproxy serve --listen 127.0.0.1:9091 --listen
    [::1]:9091 --label '<via uproxy>'
    """
    if log_level.lower() not in LOG_LEVELS:
        raise typer.BadParameter(
            f"{log_level!r} is not one of {', '.join(LOG_LEVELS)}", param_hint="'--log-level'"
        )
    addresses = _parse_listen(listen or ["127.0.0.1:9091"])
    interceptors = _load_interceptors(interceptor or [])
    if label is not None:
        interceptors.insert(0, label_interceptor(label))
    logging.basicConfig(
        level=log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        run_unwrapped(run_proxy, addresses, interceptors, connect_timeout)
    except TransparencyUnavailable as exc:
        raise CommandError(str(exc.strerror)) from None
    except OSError as exc:
        if exc.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES):
            raise CommandError(str(exc.strerror or exc)) from None
        raise


app.command()(bench)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: every failure is one line on stderr and a non-zero exit code."""
    command = typer.main.get_command(app)
    try:
        result = command.main(
            args=list(argv) if argv is not None else None,
            prog_name="uproxy",
            standalone_mode=False,
        )
    except CommandError as exc:
        fail(str(exc), exc.exit_code)
    except typer.TyperException as exc:
        fail(exc.format_message(), getattr(exc, "exit_code", EXIT_USAGE))
    except typer.Abort:
        fail("aborted", EXIT_RUNTIME)
    sys.exit(result if isinstance(result, int) else 0)
