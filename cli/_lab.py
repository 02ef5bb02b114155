"""``uproxy lab up|down|status``: a three-host lab that stays up for a user to play in.

A kept lab is nothing but its three namespaces (``upxlab-XXXX-client``, ``-proxy``,
``-server``): their names are the whole record, so ``status`` and ``down`` find a lab
without any state file that could drift from what is really there.
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import Annotated

import typer

from uproxy_netns import (
    CLIENT_V4,
    CLIENT_V6,
    SERVER_V4,
    SERVER_V6,
    Lab,
    LabError,
    TproxySetup,
    kept_labs,
)

from ._errors import CommandError
from ._help import Command, Group, help_of

lab_app = typer.Typer(
    cls=Group,
    name="lab",
    help="A client ─ proxy ─ server lab of network namespaces that stays up until `down`.",
    no_args_is_help=True,
)

# The rules a kept lab gets: the seed's, with bare SYNs sent to TPROXY (see `uproxy rules`),
# and the same ports for UDP, delivered to UDP port 9091.
KEPT_LAB_TPROXY = TproxySetup(ports="9090-9099", syn_to_tproxy=True, udp_ports="9090-9099")


def uproxy_program() -> str:
    """How the user reaches this very command: by name if it is on PATH, else by path."""
    found = shutil.which("uproxy")
    own = os.path.abspath(sys.argv[0])
    return "uproxy" if found and os.path.abspath(found) == own else own


def how_to_use(lab: Lab) -> str:
    uproxy = uproxy_program()
    return "\n".join(
        [
            f"lab {lab.tag} is up: intercepting TCP and UDP ports 9090-9099 on the proxy host",
            f"  client  {CLIENT_V4 + ' ' + CLIENT_V6:<28} ip netns exec {lab.client.name} bash",
            f"  proxy   {'(the router)':<28} ip netns exec {lab.proxy.name} bash",
            f"  server  {SERVER_V4 + ' ' + SERVER_V6:<28} ip netns exec {lab.server.name} bash",
            "start the proxy:",
            f"  ip netns exec {lab.proxy.name} {uproxy} serve "
            "--listen 127.0.0.1:9091 --listen [::1]:9091 --label '<via uproxy>' \\",
            "      --udp-listen 127.0.0.1:9091 --udp-listen [::1]:9091",
            "then, for example:",
            f"  ip netns exec {lab.server.name} python3 -m http.server 9090 --bind ::",
            f"  ip netns exec {lab.client.name} curl http://{SERVER_V4}:9090/",
            f"take it down: {uproxy} lab down {lab.tag}",
        ]
    )


def up() -> None:
    """Build a lab that outlives this command and print how to use it.

    \b
    Example:
      uproxy lab up
      ip netns exec upxlab-1a2b-proxy uproxy serve --listen 127.0.0.1:9091
    """
    lab = Lab.kept(KEPT_LAB_TPROXY)
    try:
        lab.up()
    except LabError as exc:
        raise CommandError(str(exc)) from None
    typer.echo(how_to_use(lab))


def down(
    name: Annotated[
        str | None,
        typer.Argument(
            metavar="NAME", help="The lab to remove, as `status` lists it; default: all."
        ),
    ] = None,
) -> None:
    """Remove a kept lab (its namespaces, and every interface and rule in them).

    \b
    Examples:
      uproxy lab down upxlab-1a2b
      uproxy lab down          # every kept lab
    """
    try:
        labs = (
            [Lab.existing_kept(name)]
            if name is not None
            else [Lab.existing_kept(tag) for tag in kept_labs()]
        )
        for lab in labs:
            lab.down()
            typer.echo(f"lab {lab.tag} removed")
    except LabError as exc:
        raise CommandError(str(exc)) from None


def status() -> None:
    """List the kept labs that are up, one name a line.

    \b
    Example:
      uproxy lab status
    """
    tags = kept_labs()
    for tag in tags:
        typer.echo(tag)
    if not tags:
        typer.echo("no lab is up (uproxy lab up starts one)", err=True)


for _command in (up, down, status):
    lab_app.command(cls=Command, help=help_of(_command))(_command)
