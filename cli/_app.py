"""The Typer application behind the ``uproxy`` command."""

from __future__ import annotations

import errno
import sys
from collections.abc import Sequence
from typing import Annotated

import typer

import uproxy_trio
from uproxy_trio import Address, Interceptor, TransparencyUnavailable, parse_address
from uproxy_trio.interceptors import label as label_interceptor

from ._bench import bench
from ._check import check
from ._demo import demo
from ._errors import EXIT_RUNTIME, EXIT_USAGE, CommandError, fail
from ._help import Command, Group, choices, help_of
from ._lab import lab_app
from ._logging import LOG_FORMATS
from ._privileges import resolve_identity
from ._rules import rules
from ._serve import ServeOptions, run_serve
from ._spec import SpecError, load_interceptor
from ._workers import cpu_count

app = typer.Typer(
    cls=Group,
    name="uproxy",
    help="A transparent TCP proxy for Linux TPROXY rules, with interceptors on Trio.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

LOG_LEVELS = ("debug", "info", "warning", "error")
SOURCE_PORTS = ("keep", "ephemeral")


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


def _parse_workers(value: str) -> int:
    if value == "auto":
        return cpu_count()
    if not value.isdigit() or int(value) < 1:
        raise typer.BadParameter(
            f"{value!r} is not a number of workers (1 or more, or auto)", param_hint="'--workers'"
        )
    return int(value)


def _parse_metrics(value: str | None) -> Address | None:
    if value is None:
        return None
    try:
        return parse_address(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="'--metrics'") from None


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


def serve(
    listen: Annotated[
        list[str] | None,
        typer.Option(
            "--listen",
            "-l",
            metavar="HOST:PORT",
            envvar="UPROXY_LISTEN",
            help="Address the TPROXY rule delivers to; repeat for more (IPv6 as [::1]:9091).",
            show_default="127.0.0.1:9091",
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
            help="path/to/file.py:name or package.module:name, an interceptor; or "
            "...:factory(ARGS) with literal ARGS, for a factory marked @interceptor_factory. "
            "Repeat to stack them, the first closest to the client.",
        ),
    ] = None,
    grace: Annotated[
        float,
        typer.Option(
            "--grace",
            min=0,
            metavar="SECONDS",
            envvar="UPROXY_GRACE",
            help="On SIGTERM/SIGINT, give flows in flight this long before resetting them.",
        ),
    ] = 30.0,
    max_flows: Annotated[
        int | None,
        typer.Option(
            "--max-flows",
            min=1,
            metavar="N",
            envvar="UPROXY_MAX_FLOWS",
            help="At N flows stop accepting; new connections wait in the kernel's backlog.",
        ),
    ] = None,
    idle_timeout: Annotated[
        float | None,
        typer.Option(
            "--idle-timeout",
            min=0.001,
            metavar="SECONDS",
            envvar="UPROXY_IDLE_TIMEOUT",
            help="Reset a flow that moved no byte either way for this long.",
            show_default="off",
        ),
    ] = None,
    source_port: Annotated[
        str,
        typer.Option(
            "--source-port",
            metavar=choices(SOURCE_PORTS),
            envvar="UPROXY_SOURCE_PORT",
            help="keep: connect out from the client's own IP and port (the seed's way); "
            "ephemeral: the client's IP and a port the kernel picks, so a busy host never "
            "collides with its own TIME_WAIT sockets (HAProxy's usesrc clientip).",
        ),
    ] = "keep",
    user: Annotated[
        str | None,
        typer.Option(
            "--user",
            metavar="NAME",
            envvar="UPROXY_USER",
            help="After binding, run as this user with CAP_NET_ADMIN as the only capability.",
        ),
    ] = None,
    group: Annotated[
        str | None,
        typer.Option(
            "--group",
            metavar="NAME",
            envvar="UPROXY_GROUP",
            help="With --user: the group to run as.",
            show_default="the user's own",
        ),
    ] = None,
    workers: Annotated[
        str,
        typer.Option(
            "--workers",
            metavar="N|auto",
            envvar="UPROXY_WORKERS",
            help="Run N proxy processes on the same addresses (SO_REUSEPORT); auto: one per "
            "CPU. --max-flows is shared out among them.",
        ),
    ] = "1",
    metrics: Annotated[
        str | None,
        typer.Option(
            "--metrics",
            metavar="HOST:PORT",
            envvar="UPROXY_METRICS",
            help="Serve Prometheus metrics at http://HOST:PORT/metrics.",
        ),
    ] = None,
    log_level: Annotated[
        str,
        typer.Option(
            "--log-level",
            metavar=choices(LOG_LEVELS),
            envvar="UPROXY_LOG_LEVEL",
            help="The least severe messages logged (info: every flow's life).",
        ),
    ] = "info",
    log_format: Annotated[
        str,
        typer.Option(
            "--log-format",
            metavar=choices(LOG_FORMATS),
            envvar="UPROXY_LOG_FORMAT",
            help="json: one object per line (a flow's end is event=flow_close).",
        ),
    ] = "text",
) -> int:
    """Relay TPROXY'd flows from the client's own address to their original destination.

    \b
    Examples, behind the rules `uproxy rules --apply` puts in place:
      uproxy serve --listen 127.0.0.1:9091 --listen [::1]:9091 --label '<via uproxy>'
      UPROXY_LISTEN=127.0.0.1:9091 uproxy serve -i my_interceptors.py:shout

    Exit status after SIGTERM/SIGINT: 0 when every flow finished within --grace, 1 when some
    had to be reset.
    """
    if log_level.lower() not in LOG_LEVELS:
        raise typer.BadParameter(
            f"{log_level!r} is not one of {', '.join(LOG_LEVELS)}", param_hint="'--log-level'"
        )
    addresses = _parse_listen(listen or ["127.0.0.1:9091"])
    interceptors = _load_interceptors(interceptor or [])
    if label is not None:
        interceptors.insert(0, label_interceptor(label))
    if group is not None and user is None:
        raise typer.BadParameter("--group needs --user", param_hint="'--group'")
    identity = None
    if user is not None:
        try:
            identity = resolve_identity(user, group)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="'--user'") from None
    if source_port not in SOURCE_PORTS:
        raise typer.BadParameter(
            f"{source_port!r} is not one of {', '.join(SOURCE_PORTS)}",
            param_hint="'--source-port'",
        )
    if log_format not in LOG_FORMATS:
        raise typer.BadParameter(
            f"{log_format!r} is not one of {', '.join(LOG_FORMATS)}", param_hint="'--log-format'"
        )
    options = ServeOptions(
        listen=list(listen or ["127.0.0.1:9091"]),
        addresses=addresses,
        interceptor_specs=list(interceptor or []),
        interceptors=interceptors,
        label=label,
        connect_timeout=connect_timeout,
        grace=grace,
        max_flows=max_flows,
        idle_timeout=idle_timeout,
        source_port=source_port,
        user=user,
        group=group,
        identity=identity,
        workers=_parse_workers(workers),
        log_level=log_level,
        log_format=log_format,
        metrics=_parse_metrics(metrics),
    )
    try:
        return run_serve(options)
    except TransparencyUnavailable as exc:
        raise CommandError(str(exc.strerror)) from None
    except OSError as exc:
        if exc.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES):
            raise CommandError(str(exc.strerror or exc)) from None
        raise


for command in (serve, rules, check, demo, bench):
    app.command(cls=Command, help=help_of(command))(command)
app.add_typer(lab_app)


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
