"""``uproxy rules``: the TPROXY set-up for this host, printed, applied or removed.

The options are turned into a ``uproxy_netns.TproxySetup`` here, and every check a user can
get wrong happens before anything touches the host; the rendering and the applying live in
``uproxy_netns``, where the lab tests use the same code.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Annotated

import typer

from uproxy_netns import (
    BACKENDS,
    LabError,
    PortRange,
    TproxySetup,
    apply_setup,
    merge_port_ranges,
    parse_port_range,
    remove_setup,
)
from uproxy_trio import Address, parse_address

from ._errors import EXIT_USAGE, CommandError
from ._help import choices

# Linux interface names: at most IFNAMSIZ - 1 = 15 bytes. We also keep them to characters
# that need no quoting in an nft or iptables rule.
_INTERFACE = re.compile(r"[A-Za-z0-9_.-]{1,15}")

# Routing tables 253-255 are the kernel's default, main and local tables; 0 is "unspecified".
_RESERVED_TABLES = (0, 253, 254, 255)

DEFAULT_LISTEN = "127.0.0.1:9091"

# Interfaces and ports differ on every host, so `uproxy rules` guesses none of them.
_WHAT_RULES_NEED = (
    "uproxy rules needs the interface clients' packets arrive on (--in-interface), the one "
    "the servers' answers arrive on (--out-interface) and the port(s) to intercept (--port "
    "for TCP, --udp-port for UDP)"
)

# For --remove: UDP rules of any port, so the policy routing of --udp-listen's versions goes.
_ANY_PORT = "1-65535"


def parse_listeners(values: Sequence[str], option: str = "--listen") -> dict[int, Address]:
    """``--listen`` (or ``--udp-listen``) values by IP version: at most one per version."""
    by_version: dict[int, Address] = {}
    for value in values:
        try:
            address = parse_address(value)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint=f"'{option}'") from None
        version = 6 if ":" in address[0] else 4
        if version in by_version:
            raise typer.BadParameter(
                f"more than one IPv{version} listener ({value!r}); TPROXY delivers to one",
                param_hint=f"'{option}'",
            )
        by_version[version] = address
    return by_version


def parse_ports(values: Sequence[str], option: str = "--port") -> list[PortRange]:
    ranges = []
    for value in values:
        for item in value.split(","):
            try:
                ranges.append(parse_port_range(item))
            except ValueError as exc:
                raise typer.BadParameter(str(exc), param_hint=f"'{option}'") from None
    return merge_port_ranges(ranges)


def check_interface(value: str, hint: str) -> str:
    if not _INTERFACE.fullmatch(value):
        raise typer.BadParameter(
            f"{value!r} is not an interface name (up to 15 of A-Z a-z 0-9 _ . -)",
            param_hint=hint,
        )
    return value


def check_table(value: int) -> int:
    if value in _RESERVED_TABLES:
        raise typer.BadParameter(
            f"table {value} is reserved (0 unspecified, 253 default, 254 main, 255 local)",
            param_hint="'--table'",
        )
    return value


def routing_setup(
    *, listen: Sequence[str], mark: int, table: int, udp_listen: Sequence[str] = ()
) -> TproxySetup:
    """The listeners and the policy routing of a set-up, checked; ``typer.BadParameter`` if
    not. Its interfaces and ports are placeholders: for ``uproxy check`` and ``rules
    --remove``, which look at or take away what is installed, whatever it matches."""
    listeners = parse_listeners(listen)
    udp_listeners = parse_listeners(udp_listen, "--udp-listen")
    v4, v6 = listeners.get(4), listeners.get(6)
    return TproxySetup(
        udp_ports=_ANY_PORT if udp_listeners else "",
        udp_listeners=tuple(udp_listeners[version] for version in sorted(udp_listeners)),
        listen_port=(v4 or v6 or ("", 0))[1],
        listen_v4=v4[0] if v4 else None,
        listen_v6=v6[0] if v6 else None,
        listen_port_v6=v6[1] if v6 else None,
        mark=mark,
        table=check_table(table),
        syn_to_tproxy=True,
    )


def build_setup(
    *,
    in_interface: str,
    out_interface: str,
    ports: Sequence[str],
    listen: Sequence[str],
    mark: int,
    table: int,
    udp_ports: Sequence[str] = (),
    udp_listen: Sequence[str] = (),
) -> TproxySetup:
    """A checked ``TproxySetup`` from command-line values; ``typer.BadParameter`` if not."""
    return dataclasses.replace(
        routing_setup(listen=listen, mark=mark, table=table, udp_listen=udp_listen),
        in_interface=check_interface(in_interface, "'--in-interface'"),
        out_interface=check_interface(out_interface, "'--out-interface'"),
        ports=",".join(f"{a}-{b}" for a, b in parse_ports(ports)),
        udp_ports=",".join(f"{a}-{b}" for a, b in parse_ports(udp_ports, "--udp-port")),
    )


InInterface = Annotated[
    str | None,
    typer.Option(
        "--in-interface",
        metavar="IFACE",
        envvar="UPROXY_IN_INTERFACE",
        help="Where clients' packets arrive.",
        show_default=False,
    ),
]
OutInterface = Annotated[
    str | None,
    typer.Option(
        "--out-interface",
        metavar="IFACE",
        envvar="UPROXY_OUT_INTERFACE",
        help="Where the servers' answers arrive.",
        show_default=False,
    ),
]
Listen = Annotated[
    list[str] | None,
    typer.Option(
        "--listen",
        "-l",
        metavar="HOST:PORT",
        envvar="UPROXY_LISTEN",
        help="Where `uproxy serve` listens: one IPv4 and/or one IPv6 address ([::1]:9091); "
        "each version given is intercepted.",
        show_default=DEFAULT_LISTEN,
    ),
]
Mark = Annotated[
    int,
    typer.Option(
        "--mark",
        metavar="N",
        min=1,
        max=0xFFFFFFFF,
        envvar="UPROXY_MARK",
        help="Firewall mark that routes intercepted packets locally.",
    ),
]
Table = Annotated[
    int,
    typer.Option(
        "--table",
        metavar="N",
        min=1,
        max=0xFFFFFFFF,
        envvar="UPROXY_TABLE",
        help="Routing table that holds the local route for marked packets.",
    ),
]


def rules(
    backend: Annotated[
        str,
        typer.Option(
            "--backend",
            "-b",
            metavar=choices(BACKENDS),
            envvar="UPROXY_BACKEND",
            help="Firewall to write for.",
        ),
    ] = "nft",
    in_interface: InInterface = None,
    out_interface: OutInterface = None,
    port: Annotated[
        list[str] | None,
        typer.Option(
            "--port",
            "-p",
            metavar="PORT|FIRST-LAST",
            envvar="UPROXY_PORT",
            help="Destination port(s) to intercept; repeat for more.",
            show_default=False,
        ),
    ] = None,
    listen: Listen = None,
    udp_port: Annotated[
        list[str] | None,
        typer.Option(
            "--udp-port",
            metavar="PORT|FIRST-LAST",
            envvar="UPROXY_UDP_PORT",
            help="Destination UDP port(s) to intercept; repeat for more.",
            show_default=False,
        ),
    ] = None,
    udp_listen: Annotated[
        list[str] | None,
        typer.Option(
            "--udp-listen",
            metavar="HOST:PORT",
            envvar="UPROXY_UDP_LISTEN",
            help="Where `uproxy serve --udp-listen` listens: one IPv4 and/or one IPv6 address.",
            show_default="the --listen addresses",
        ),
    ] = None,
    mark: Mark = 1,
    table: Table = 100,
    apply: Annotated[
        bool,
        typer.Option("--apply", help="Apply to this host (idempotent) instead of printing."),
    ] = False,
    remove: Annotated[
        bool,
        typer.Option("--remove", help="Remove what --apply added from this host."),
    ] = False,
) -> None:
    """Print, apply or remove the TPROXY rules and policy routing for `uproxy serve`.

    Without --apply or --remove, prints a bash script that sets everything up and can be run
    twice. --apply does the same directly: the firewall part is one nft transaction (table
    inet uproxy) or iptables-restore --noflush into chains of its own (UPROXY_PREROUTING,
    UPROXY_DIVERT), plus the fwmark ip rule and local route, each added only if missing.
    --remove takes exactly those away. Run it as root, on the router (or in the namespace)
    that the clients' traffic passes through.

    --in-interface, --out-interface and --port have no defaults: printing and --apply need
    all three; --remove needs none of them.

    --udp-port adds UDP: a client's datagram that no session holds goes to the UDP listener
    (--udp-listen); a session's datagrams both ways, and the ICMP errors about them, go to
    the session's own sockets. Either --port or --udp-port will do, or both.

    \b
    Examples:
      uproxy rules --in-interface eth1 --out-interface eth0 --port 80 --port 8000-8099
      uproxy rules -b iptables --in-interface eth1 --out-interface eth0 -p 443 \\
          --listen 127.0.0.1:9091 --listen [::1]:9091 --apply
      uproxy rules --in-interface eth1 --out-interface eth0 --port 443 --udp-port 443 \\
          --udp-port 53 --udp-listen 127.0.0.1:9091 --udp-listen [::1]:9091
      uproxy rules --backend iptables --listen 127.0.0.1:9091 --listen [::1]:9091 --remove
    """
    if backend not in BACKENDS:
        raise typer.BadParameter(
            f"{backend!r} is not one of {', '.join(BACKENDS)}", param_hint="'--backend'"
        )
    if apply and remove:
        raise typer.BadParameter("--apply and --remove exclude each other")
    listen = listen or [DEFAULT_LISTEN]
    if remove:
        # Removal takes away our table or chains and the policy routing of --mark and
        # --table, whatever interfaces and ports they named.
        setup = routing_setup(listen=listen, mark=mark, table=table, udp_listen=udp_listen or ())
        _change_host(setup, backend, "remove")
        return
    if not (in_interface and out_interface and (port or udp_port)):
        missing = [
            name
            for name, value in (
                ("--in-interface", in_interface),
                ("--out-interface", out_interface),
                ("--port or --udp-port", port or udp_port),
            )
            if not value
        ]
        raise CommandError(f"missing {', '.join(missing)}: {_WHAT_RULES_NEED}", EXIT_USAGE)
    setup = build_setup(
        in_interface=in_interface,
        out_interface=out_interface,
        ports=port or [],
        listen=listen,
        mark=mark,
        table=table,
        udp_ports=udp_port or [],
        udp_listen=udp_listen or [],
    )
    if apply:
        _change_host(setup, backend, "apply")
    else:
        typer.echo(setup.shell_script(backend), nl=False)


def _change_host(setup: TproxySetup, backend: str, action: str) -> None:
    try:
        if action == "apply":
            apply_setup(setup, backend)
        else:
            remove_setup(setup, backend)
    except LabError as exc:
        raise CommandError(str(exc)) from None
    versions = " and ".join(f"IPv{v}" for v in setup.versions)
    done = {"apply": "applied", "remove": "removed"}[action]
    typer.echo(f"uproxy rules: {done} ({backend}, {versions})", err=True)
