"""The Typer application behind the ``uproxy`` command."""

from __future__ import annotations

import errno
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

import uproxy_trio
from uproxy_trio import Address, TransparencyUnavailable, parse_address
from uproxy_trio.interceptors import label as label_interceptor

from ._bench import bench
from ._check import check
from ._config import ConfigError, read_config
from ._demo import demo
from ._errors import EXIT_RUNTIME, EXIT_USAGE, CommandError, fail
from ._flows_cmd import flows_app
from ._forwards import check_names, parse_forward
from ._help import Command, Group, choices, help_of
from ._http import HttpAddress, parse_http_address
from ._lab import lab_app
from ._logging import LOG_FORMATS, LOG_LEVELS
from ._privileges import resolve_identity
from ._rules import rules
from ._serve import ON_OFF, SOURCE_PORTS, ServeOptions, run_serve
from ._spec import load_interceptor
from ._toxic_cmd import toxic_app
from ._toxics import toxic_kit
from ._workers import cpu_count

app = typer.Typer(
    cls=Group,
    name="uproxy",
    help="A transparent TCP proxy for Linux TPROXY rules, with interceptors on Trio.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

T = TypeVar("T")

# Where a value comes from when it is not on the command line or in its UPROXY_ variable
# (click's ParameterSource, by name: Typer vendors click, so its module path changes).
_UNGIVEN = ("DEFAULT", "DEFAULT_MAP")


def _parse_workers(value: str) -> int:
    if value == "auto":
        return cpu_count()
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{value!r} is not a number of workers (1 or more, or auto)")
    return int(value)


def _parse_metrics(value: str | None) -> Address | None:
    return None if value is None else parse_address(value)


def _parse_control(value: str | None) -> HttpAddress | None:
    return None if value is None else parse_http_address(value)


def _one_of(choices: Sequence[str]) -> Callable[[str], str]:
    def check(value: str) -> str:
        if value.lower() not in choices:
            raise ValueError(f"{value!r} is not one of {', '.join(choices)}")
        return value

    return check


class _Options:
    """``serve``'s option values: from the command line (or its UPROXY_ variables), else from
    the config file, else the defaults; each checked with the one check it has, and a bad one
    reported where it came from (``'--log-level'``, or the file and its key)."""

    def __init__(self, ctx: typer.Context, config: Path | None) -> None:
        self.values: dict[str, Any] = dict(ctx.params)
        self.file = None
        self._from_file: set[str] = set()
        if config is None:
            return
        try:
            self.file = read_config(config)
        except ConfigError as exc:
            raise CommandError(str(exc), EXIT_USAGE) from None
        for key, value in self.file.options.items():
            source = ctx.get_parameter_source(key)
            if source is None or source.name in _UNGIVEN:
                self.values[key] = value
                self._from_file.add(key)

    def bad(self, key: str, message: str) -> Exception:
        if self.file is not None and key in self._from_file:
            return CommandError(str(self.file.error(key, message)), EXIT_USAGE)
        return typer.BadParameter(message, param_hint=f"'--{key.replace('_', '-')}'")

    def checked(self, key: str, check: Callable[[Any], T]) -> T:
        try:
            return check(self.values[key])
        except ValueError as exc:  # SpecError included
            raise self.bad(key, str(exc)) from None

    def each(self, key: str, check: Callable[[str], T]) -> list[T]:
        return self.checked(key, lambda values: [check(value) for value in values or ()])


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
    ctx: typer.Context,
    listen: Annotated[
        list[str] | None,
        typer.Option(
            "--listen",
            "-l",
            metavar="HOST:PORT",
            envvar="UPROXY_LISTEN",
            help="Address the TPROXY rule delivers to; repeat for more (IPv6 as [::1]:9091).",
            show_default="127.0.0.1:9091; none with --forward or --control",
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
    udp_listen: Annotated[
        list[str] | None,
        typer.Option(
            "--udp-listen",
            metavar="HOST:PORT",
            envvar="UPROXY_UDP_LISTEN",
            help="Address the UDP TPROXY rule delivers to; repeat for more. Without it, no UDP.",
        ),
    ] = None,
    udp_idle_timeout: Annotated[
        float,
        typer.Option(
            "--udp-idle-timeout",
            min=0.001,
            metavar="SECONDS",
            envvar="UPROXY_UDP_IDLE_TIMEOUT",
            help="End a UDP session that moved no datagram either way for this long.",
        ),
    ] = uproxy_trio.DEFAULT_UDP_IDLE_TIMEOUT_S,
    max_udp_sessions: Annotated[
        int,
        typer.Option(
            "--max-udp-sessions",
            min=1,
            metavar="N",
            envvar="UPROXY_MAX_UDP_SESSIONS",
            help="At N UDP sessions, drop (and count) new sessions' datagrams; the sessions "
            "in flight go on.",
        ),
    ] = uproxy_trio.DEFAULT_MAX_UDP_SESSIONS,
    udp_gso: Annotated[
        str,
        typer.Option(
            "--udp-gso",
            metavar=choices(ON_OFF),
            envvar="UPROXY_UDP_GSO",
            help="on: send the UDP datagrams a session finds queued in runs, one segmented "
            "send (GSO) each; off: each on its own, so that tcpdump and qdiscs on this host's "
            "egress see datagrams rather than runs.",
        ),
    ] = "on",
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
    control: Annotated[
        str | None,
        typer.Option(
            "--control",
            metavar="HOST:PORT|unix:PATH",
            envvar="UPROXY_CONTROL",
            help="Serve the control API (Toxiproxy's, and /flows, /reload, /metrics) there; "
            "Toxiproxy's clients use 127.0.0.1:8474. A Unix socket gets mode 0600. Not with "
            "--workers above 1.",
            show_default="off",
        ),
    ] = None,
    forward: Annotated[
        list[str] | None,
        typer.Option(
            "--forward",
            "-f",
            metavar="LISTEN=UPSTREAM",
            envvar="UPROXY_FORWARD",
            help="Also listen on LISTEN (a plain listener: no TPROXY, no root) and relay to "
            "UPSTREAM, as a Toxiproxy proxy named LISTEN; repeat for more.",
        ),
    ] = None,
    toxic_type: Annotated[
        list[str] | None,
        typer.Option(
            "--toxic-type",
            metavar="SPEC",
            envvar="UPROXY_TOXIC_TYPE",
            help="path/to/file.py:name or package.module:name, a toxic type of your own (a "
            "factory marked @uproxy_trio.toxics.toxic_type(NAME)) that the control API then "
            "adds by NAME; repeat for more.",
        ),
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(
            "--seed",
            metavar="N",
            envvar="UPROXY_SEED",
            help="Seed the toxics' randomness (toxicity, jitter), so runs repeat.",
            show_default="random",
        ),
    ] = None,
    log_level: Annotated[
        str,
        typer.Option(
            "--log-level",
            metavar=choices(LOG_LEVELS),
            envvar="UPROXY_LOG_LEVEL",
            help="The least severe messages logged (info: one line per flow, at its close; "
            "debug: each flow's open, upstream connect and half-closes too).",
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
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            metavar="FILE.toml",
            envvar="UPROXY_CONFIG",
            help="Options and routes from a TOML file (keys: the long options, with _ for -); "
            "the command line overrides it. SIGHUP reloads its routes.",
            dir_okay=False,
        ),
    ] = None,
) -> int:
    """Relay TPROXY'd flows from the client's own address to their original destination.

    \b
    Examples, behind the rules `uproxy rules --apply` puts in place:
      uproxy serve --listen 127.0.0.1:9091 --listen [::1]:9091 --label '<via uproxy>'
      UPROXY_LISTEN=127.0.0.1:9091 uproxy serve -i my_interceptors.py:shout
      uproxy serve --config /etc/uproxy.toml
      uproxy serve --forward 127.0.0.1:26379=127.0.0.1:6379 --control 127.0.0.1:8474

    With --config, the file's routes choose each flow's interceptors and timeouts, the first
    route that matches winning; --interceptor and --label are for the flows no route
    takes. SIGHUP reloads the routes: new flows take the new ones, flows in flight keep theirs.

    With --control, an HTTP API that Toxiproxy's clients drive adds faults (toxics) to the
    flows of a route or of a --forward listener, those in flight included; `uproxy toxic`
    and `uproxy flows` are its command-line clients.

    Exit status after SIGTERM/SIGINT: 0 when every flow finished within --grace, 1 when some
    had to be reset.
    """
    given = _Options(ctx, config)
    values = given.values
    given.checked("log_level", _one_of(LOG_LEVELS))
    forwards = given.each("forward", parse_forward)
    if given.file is not None:
        forwards += given.file.forwards
    routes = [route.name for route in given.file.routes] if given.file is not None else []
    given.checked("forward", lambda _: check_names(forwards, routes))
    # Toxiproxy's way, forwards and the API alone, needs no TPROXY and no root: there is no
    # transparent listener then unless one is asked for.
    toxiproxy_way = bool(forwards) or values["control"] is not None
    listen = values["listen"] = values["listen"] or ([] if toxiproxy_way else ["127.0.0.1:9091"])
    addresses = given.each("listen", parse_address)
    values["udp_listen"] = list(values["udp_listen"] or [])
    udp_addresses = given.each("udp_listen", parse_address)
    interceptors = given.each("interceptor", load_interceptor)
    label = values["label"]
    if label is not None:
        interceptors.insert(0, label_interceptor(label))
    user, group = values["user"], values["group"]
    if group is not None and user is None:
        raise given.bad("group", "--group needs --user (user in a config file)")
    identity = None
    if user is not None:
        identity = given.checked("user", lambda name: resolve_identity(name, group))
    given.checked("source_port", _one_of(SOURCE_PORTS))
    given.checked("log_format", _one_of(LOG_FORMATS))
    worker_count = given.checked("workers", _parse_workers)
    control_at = given.checked("control", _parse_control)
    if worker_count > 1:
        # One process holds the API's state (toxics, forwards); the workers would each have
        # their own, and a request would reach one of them.
        if control_at is not None:
            raise given.bad("control", "--control works with one worker only (not --workers)")
        if forwards:
            raise given.bad("forward", "--forward works with one worker only (not --workers)")
    options = ServeOptions(
        listen=list(listen),
        addresses=addresses,
        interceptor_specs=list(values["interceptor"] or []),
        interceptors=interceptors,
        label=label,
        connect_timeout=values["connect_timeout"],
        grace=values["grace"],
        max_flows=values["max_flows"],
        idle_timeout=values["idle_timeout"],
        udp_listen=values["udp_listen"],
        udp_addresses=udp_addresses,
        udp_idle_timeout=values["udp_idle_timeout"],
        max_udp_sessions=values["max_udp_sessions"],
        udp_gso=given.checked("udp_gso", _one_of(ON_OFF)).lower() == "on",
        source_port=values["source_port"],
        user=user,
        group=group,
        identity=identity,
        workers=worker_count,
        log_level=values["log_level"],
        log_format=values["log_format"],
        metrics=given.checked("metrics", _parse_metrics),
        config=given.file,
        control=control_at,
        forwards=tuple(forwards),
        seed=values["seed"],
        toxics=given.checked("toxic_type", lambda specs: toxic_kit(specs or ())),
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
app.add_typer(flows_app)
app.add_typer(toxic_app)


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
