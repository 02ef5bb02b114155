"""``uproxy rules``: the TPROXY set-up for this host, printed, applied or removed.

The options are turned into a ``uproxy_netns.TproxySetup`` here, and every check a user can
get wrong happens before anything touches the host; the rendering and the applying live in
``uproxy_netns``, where the lab tests use the same code.
"""

from __future__ import annotations

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

from ._errors import CommandError

# Linux interface names: at most IFNAMSIZ - 1 = 15 bytes. We also keep them to characters
# that need no quoting in an nft or iptables rule.
_INTERFACE = re.compile(r"[A-Za-z0-9_.-]{1,15}")

# Routing tables 253-255 are the kernel's default, main and local tables; 0 is "unspecified".
_RESERVED_TABLES = (0, 253, 254, 255)

DEFAULT_LISTEN = "127.0.0.1:9091"


def parse_listeners(values: Sequence[str]) -> dict[int, Address]:
    """``--listen`` values by IP version: at most one listener per version."""
    by_version: dict[int, Address] = {}
    for value in values:
        try:
            address = parse_address(value)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="'--listen'") from None
        version = 6 if ":" in address[0] else 4
        if version in by_version:
            raise typer.BadParameter(
                f"more than one IPv{version} listener ({value!r}); TPROXY delivers to one",
                param_hint="'--listen'",
            )
        by_version[version] = address
    return by_version


def parse_ports(values: Sequence[str]) -> list[PortRange]:
    ranges = []
    for value in values:
        for item in value.split(","):
            try:
                ranges.append(parse_port_range(item))
            except ValueError as exc:
                raise typer.BadParameter(str(exc), param_hint="'--port'") from None
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


def build_setup(
    *,
    in_interface: str,
    out_interface: str,
    ports: Sequence[str],
    listen: Sequence[str],
    mark: int,
    table: int,
) -> TproxySetup:
    """A checked ``TproxySetup`` from command-line values; ``typer.BadParameter`` if not."""
    listeners = parse_listeners(listen)
    v4, v6 = listeners.get(4), listeners.get(6)
    port_text = ",".join(f"{a}-{b}" for a, b in parse_ports(ports))
    return TproxySetup(
        in_interface=check_interface(in_interface, "'--in-interface'"),
        out_interface=check_interface(out_interface, "'--out-interface'"),
        ports=port_text,
        listen_port=(v4 or v6 or ("", 0))[1],
        listen_v4=v4[0] if v4 else None,
        listen_v6=v6[0] if v6 else None,
        listen_port_v6=v6[1] if v6 else None,
        mark=mark,
        table=check_table(table),
        syn_to_tproxy=True,
    )


InInterface = Annotated[
    str,
    typer.Option(
        "--in-interface",
        metavar="IFACE",
        envvar="UPROXY_IN_INTERFACE",
        help="Where clients' packets arrive.",
    ),
]
OutInterface = Annotated[
    str,
    typer.Option(
        "--out-interface",
        metavar="IFACE",
        envvar="UPROXY_OUT_INTERFACE",
        help="Where the servers' answers arrive.",
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
        "each version given is intercepted. [default: 127.0.0.1:9091]",
        show_default=False,
    ),
]
Mark = Annotated[
    int,
    typer.Option(
        "--mark",
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
            envvar="UPROXY_BACKEND",
            help=f"Firewall to write for: {' or '.join(BACKENDS)}.",
        ),
    ] = "nft",
    in_interface: InInterface = "ens6",
    out_interface: OutInterface = "ens7",
    port: Annotated[
        list[str] | None,
        typer.Option(
            "--port",
            "-p",
            metavar="PORT|FIRST-LAST",
            envvar="UPROXY_PORT",
            help="Destination port(s) to intercept; repeat for more. [default: 9090]",
            show_default=False,
        ),
    ] = None,
    listen: Listen = None,
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

    \b
    Examples:
      uproxy rules --in-interface ens6 --out-interface ens7 --port 9090 --port 9100-9199
      uproxy rules --backend iptables --listen 127.0.0.1:9091 --listen [::1]:9091 --apply
      uproxy rules --backend iptables --listen 127.0.0.1:9091 --listen [::1]:9091 --remove
    """
    if backend not in BACKENDS:
        raise typer.BadParameter(
            f"{backend!r} is not one of {', '.join(BACKENDS)}", param_hint="'--backend'"
        )
    if apply and remove:
        raise typer.BadParameter("--apply and --remove exclude each other")
    setup = build_setup(
        in_interface=in_interface,
        out_interface=out_interface,
        ports=port or ["9090"],
        listen=listen or [DEFAULT_LISTEN],
        mark=mark,
        table=table,
    )
    if not (apply or remove):
        typer.echo(setup.shell_script(backend), nl=False)
        return
    try:
        if apply:
            apply_setup(setup, backend)
        else:
            remove_setup(setup, backend)
    except LabError as exc:
        raise CommandError(str(exc)) from None
    done = "applied" if apply else "removed"
    versions = " and ".join(f"IPv{v}" for v in setup.versions)
    typer.echo(f"uproxy rules: {done} ({backend}, {versions})", err=True)
