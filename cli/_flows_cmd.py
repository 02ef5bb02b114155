"""``uproxy flows`` (the live flows, as a table or JSON) and ``uproxy flows kill ID``: clients of
``GET /flows`` and ``DELETE /flows/{id}``."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from ._client import DEFAULT_CONTROL, ControlClient, ControlOption
from ._help import Command, Group, help_of

flows_app = typer.Typer(
    cls=Group,
    name="flows",
    help="The flows in flight of a `uproxy serve --control`, and resetting one.",
    invoke_without_command=True,
)

COLUMNS = ("ID", "TRANSPORT", "CLIENT", "SERVER", "ROUTE", "INTERCEPTORS", "C>S", "S>C", "AGE")


def flows(
    ctx: typer.Context,
    control: ControlOption = DEFAULT_CONTROL,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON list, as GET /flows answers it.")
    ] = False,
) -> None:
    """List the flows in flight: id, transport, client, server, route, interceptors, bytes
    each way (C>S: client to server), age in seconds.

    \b
    Examples:
      uproxy flows
      uproxy flows --json --control unix:/run/uproxy.sock
      uproxy flows kill 42
    """
    ctx.obj = control
    if ctx.invoked_subcommand is not None:
        return
    client = ControlClient(control)
    try:
        listed = client.call("GET", "/flows")
    finally:
        client.close()
    if as_json:
        typer.echo(json.dumps(listed, indent=2))
    else:
        typer.echo(table(listed))


def kill(
    ctx: typer.Context,
    flow_id: Annotated[
        int, typer.Argument(metavar="ID", help="The flow's id, as `uproxy flows` lists it.")
    ],
    control: Annotated[
        str | None,
        typer.Option(
            "--control",
            metavar="HOST:PORT|unix:PATH",
            envvar="UPROXY_CONTROL",
            help="Where `uproxy serve --control` serves the control API.",
            show_default=DEFAULT_CONTROL,
        ),
    ] = None,
) -> None:
    """Reset one flow: both its client and its server get a RST.

    \b
    Example:
      uproxy flows kill 42
    """
    client = ControlClient(control or ctx.obj or DEFAULT_CONTROL)
    try:
        client.call("DELETE", f"/flows/{flow_id}")
    finally:
        client.close()
    typer.echo(f"flow {flow_id} reset")


def table(listed: list[dict[str, Any]]) -> str:
    """The flows as aligned columns, a header first; a line that says so when there is none."""
    if not listed:
        return "no flows in flight"
    rows = [COLUMNS] + [
        (
            str(flow["id"]),
            flow["transport"],
            flow["client"],
            flow["server"],
            flow["route"] or "-",
            ",".join(flow["interceptors"]) or "-",
            str(flow["bytes_client_to_server"]),
            str(flow["bytes_server_to_client"]),
            f"{flow['age_s']:.1f}",
        )
        for flow in listed
    ]
    widths = [max(len(row[column]) for row in rows) for column in range(len(COLUMNS))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


flows_app.callback(invoke_without_command=True, help=help_of(flows))(flows)
flows_app.command(cls=Command, help=help_of(kill))(kill)
