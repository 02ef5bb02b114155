"""``uproxy toxic add|update|list|remove``: toxiproxy-cli's ``toxic`` commands, with its flags,
as clients of the control API."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from ._client import DEFAULT_CONTROL, ControlClient, ControlOption
from ._errors import EXIT_USAGE, CommandError
from ._help import Command, Group, help_of

toxic_app = typer.Typer(
    cls=Group,
    name="toxic",
    help="Add, update, list and remove toxics on a `uproxy serve --control`, as toxiproxy-cli.",
    no_args_is_help=True,
)

ProxyArgument = Annotated[
    str, typer.Argument(metavar="PROXY", help="A route's or a forward's name.")
]
NameOption = Annotated[
    str | None,
    typer.Option("--toxicName", "-n", metavar="NAME", help="The toxic's name."),
]
ToxicityOption = Annotated[
    float | None,
    typer.Option(
        "--toxicity",
        "--tox",
        min=0,
        max=1,
        metavar="P",
        help="The probability that a flow gets the toxic.",
        show_default="1.0",
    ),
]
AttributeOption = Annotated[
    list[str] | None,
    typer.Option(
        "--attribute", "-a", metavar="KEY=VALUE", help="A toxic attribute; repeat for more."
    ),
]


def add(
    proxy: ProxyArgument,
    kind: Annotated[
        str, typer.Option("--type", "-t", metavar="TYPE", help="latency, bandwidth, ...")
    ],
    name: NameOption = None,
    toxicity: ToxicityOption = None,
    attribute: AttributeOption = None,
    upstream: Annotated[
        bool, typer.Option("--upstream", "-u", help="On client-to-server bytes.")
    ] = False,
    downstream: Annotated[
        bool,
        typer.Option("--downstream", "-d", help="On server-to-client bytes (the default)."),
    ] = False,
    control: ControlOption = DEFAULT_CONTROL,
) -> None:
    """Add a toxic to a proxy; the flows in flight get it at once.

    \b
    Example:
      uproxy toxic add -t latency -n slow -a latency=300 -a jitter=50 127.0.0.1:26379
    """
    if upstream and downstream:
        raise CommandError("--upstream and --downstream: choose one", EXIT_USAGE)
    stream = "upstream" if upstream else "downstream"
    body: dict[str, Any] = {"type": kind, "stream": stream, "attributes": _attributes(attribute)}
    if name is not None:
        body["name"] = name
    if toxicity is not None:
        body["toxicity"] = toxicity
    added = _call(control, "POST", f"/proxies/{proxy}/toxics", body)
    typer.echo(f"Added {stream} {kind} toxic '{added['name']}' on proxy '{proxy}'")


def update(
    proxy: ProxyArgument,
    name: NameOption = None,
    toxicity: ToxicityOption = None,
    attribute: AttributeOption = None,
    control: ControlOption = DEFAULT_CONTROL,
) -> None:
    """Change a toxic's attributes or toxicity; the flows in flight get the new one at once.

    \b
    Example:
      uproxy toxic update -n slow -a latency=50 127.0.0.1:26379
    """
    if name is None:
        raise CommandError("--toxicName is required", EXIT_USAGE)
    body: dict[str, Any] = {"attributes": _attributes(attribute)}
    if toxicity is not None:
        body["toxicity"] = toxicity
    _call(control, "POST", f"/proxies/{proxy}/toxics/{name}", body)
    typer.echo(f"Updated toxic '{name}' on proxy '{proxy}'")


def remove(
    proxy: ProxyArgument,
    name: NameOption = None,
    control: ControlOption = DEFAULT_CONTROL,
) -> None:
    """Remove a toxic; its flows go back to what they were (the zero-copy path, if nothing
    else intercepts them).

    \b
    Example:
      uproxy toxic remove -n slow 127.0.0.1:26379
    """
    if name is None:
        raise CommandError("--toxicName is required", EXIT_USAGE)
    _call(control, "DELETE", f"/proxies/{proxy}/toxics/{name}")
    typer.echo(f"Removed toxic '{name}' on proxy '{proxy}'")


def list_toxics(
    proxy: Annotated[
        str | None,
        typer.Argument(metavar="PROXY", help="One proxy; default: every proxy."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="The API's JSON, as it is.")] = False,
    control: ControlOption = DEFAULT_CONTROL,
) -> None:
    """List the proxies (routes and forwards) and their toxics.

    \b
    Examples:
      uproxy toxic list
      uproxy toxic list 127.0.0.1:26379 --json
    """
    if proxy is not None:
        proxies = {proxy: _call(control, "GET", f"/proxies/{proxy}")}
    else:
        proxies = _call(control, "GET", "/proxies")
    if as_json:
        typer.echo(json.dumps(proxies if proxy is None else proxies[proxy], indent=2))
        return
    if not proxies:
        typer.echo("no proxies (routes in --config, or --forward, make them)")
    for shown in proxies.values():
        state = "enabled" if shown["enabled"] else "disabled"
        where = f"listen {shown['listen']}  upstream {shown['upstream']}"
        typer.echo(f"{shown['name']}  {where}  {state}")
        for toxic in shown["toxics"]:
            attributes = ",".join(f"{key}={value}" for key, value in toxic["attributes"].items())
            typer.echo(
                f"  {toxic['name']}  {toxic['type']}  {toxic['stream']}  "
                f"toxicity={toxic['toxicity']}  {attributes}".rstrip()
            )
        if not shown["toxics"]:
            typer.echo("  no toxics")


def _call(control: str, method: str, path: str, body: Any = None) -> Any:
    client = ControlClient(control)
    try:
        return client.call(method, path, body)
    finally:
        client.close()


def _attributes(pairs: list[str] | None) -> dict[str, int | float]:
    """``KEY=VALUE`` pairs, each value a number, as toxiproxy-cli reads them."""
    attributes: dict[str, int | float] = {}
    for pair in pairs or ():
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise CommandError(f"--attribute {pair!r}: expected KEY=VALUE", EXIT_USAGE)
        try:
            attributes[key] = int(text)
        except ValueError:
            try:
                attributes[key] = float(text)
            except ValueError:
                message = f"--attribute {pair!r}: {text!r} is not a number"
                raise CommandError(message, EXIT_USAGE) from None
    return attributes


for _command in (add, update, remove):
    toxic_app.command(cls=Command, help=help_of(_command))(_command)
toxic_app.command("list", cls=Command, help=help_of(list_toxics))(list_toxics)
# toxiproxy-cli's other name for remove.
toxic_app.command("delete", cls=Command, help=help_of(remove), hidden=True)(remove)
