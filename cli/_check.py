"""``uproxy check``: is this host ready to run the proxy behind TPROXY rules?

Each check looks at the host as the kernel will see it (a throwaway nft transaction that is
validated and never committed, a real setsockopt, the live routing policy and rulesets), and
every miss comes with the one command that fixes it.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from uproxy_netns import PortRange, TproxySetup, has_local_route, has_policy_rule
from uproxy_trio import Address, format_address, transparency_available

from ._conntrack import invalid_drops, notrack_fix, notrack_in_place
from ._installed import InstalledTproxy, installed_tproxy, run_tool, unreadable_rules
from ._rules import (
    DEFAULT_LISTEN,
    Listen,
    Mark,
    Table,
    check_interface,
    routing_setup,
)

# `nft --check` sends this to the kernel, which validates every expression (loading the
# modules it needs) and then throws the transaction away: nothing is ever installed.
_KERNEL_PROBE = """\
table inet uproxy_check {
    chain probe {
        type filter hook prerouting priority mangle; policy accept;
        socket transparent 1 accept
        meta nfproto ipv4 tcp dport 9 tproxy ip to 127.0.0.1:9
        meta nfproto ipv6 tcp dport 9 tproxy ip6 to [::1]:9
    }
}
"""

# rp_filter: 0 off, 1 strict, 2 loose. The kernel applies the larger of `all` and the
# interface's own value.
_STRICT = 1


@dataclass(frozen=True, slots=True)
class Check:
    what: str
    ok: bool
    fix: str = ""
    detail: str = ""
    warning: bool = False
    """A miss that may break flows rather than one that surely does: reported with its fix,
    but the host still passes."""


def _run(argv: Sequence[str], input: str | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(list(argv), input=input, capture_output=True, text=True)
    except FileNotFoundError:
        return subprocess.CompletedProcess(list(argv), 127, "", f"{argv[0]} is not installed")


# Asking the kernel (nft --check, nft list, iptables-save) needs CAP_NET_ADMIN, whatever the
# proxy itself needs.
_AS_ROOT = "run uproxy check as root (asking the kernel needs CAP_NET_ADMIN)"


def check_kernel() -> Check:
    what = "kernel supports TPROXY and socket matching"
    done = _run(["nft", "--check", "-f", "-"], input=_KERNEL_PROBE)
    if done.returncode == 0:
        return Check(what, True)
    if done.returncode == 127:
        return Check(what, False, "apt-get install nftables", "nft is not installed")
    first = (done.stderr.strip().splitlines() or ["refused"])[0]
    if "not permitted" in first:
        # Not the kernel's answer: nft was not allowed to ask.
        return Check(what, False, _AS_ROOT, f"unknown: nft --check: {first}")
    return Check(what, False, "modprobe -a nft_tproxy nft_socket xt_TPROXY xt_socket", first)


def check_transparent() -> Check:
    what = "IP_TRANSPARENT can be set (CAP_NET_ADMIN or CAP_NET_RAW)"
    if not transparency_available():
        return Check(
            what,
            False,
            "run as root, or give uproxy CAP_NET_ADMIN or CAP_NET_RAW "
            "(systemd: AmbientCapabilities=CAP_NET_ADMIN)",
            "setsockopt refused: operation not permitted; the kernel takes either capability",
        )
    return Check(what, True)


def check_policy_routing(setup: TproxySetup, version: int) -> list[Check]:
    ip = "ip" if version == 4 else "ip -6"
    rule, route = setup.ip_rule(version), setup.ip_route(version)
    return [
        Check(
            f"{ip} {rule.replace('rule add', 'rule')} (IPv{version})",
            has_policy_rule(setup, version),
            f"{ip} {rule}",
        ),
        Check(
            f"{ip} {route.replace('route add', 'route')} (IPv{version})",
            has_local_route(setup, version),
            f"{ip} {route}",
        ),
    ]


def check_rules(setup: TproxySetup, listen: Sequence[str], targets: set[Address]) -> list[Check]:
    checks = []
    for version in setup.tcp_versions:
        host, port = setup.listener(version)
        checks.append(
            Check(
                f"a TPROXY rule delivers to {format_address((host, port))}",
                (host, port) in targets,
                "uproxy rules --in-interface IFACE --out-interface IFACE --port PORT "
                + " ".join(f"--listen {value}" for value in listen)
                + " --apply",
            )
        )
    return checks


def check_udp_rules(setup: TproxySetup, installed: InstalledTproxy) -> list[Check]:
    """For ``--udp-listen``: a UDP TPROXY rule delivers to each UDP listener, and ICMP
    errors reach the sessions' sockets (else a server's port unreachable is forwarded to
    the client and the session waits for its idle timeout)."""
    checks = []
    for version in setup.udp_versions:
        address = format_address(setup.udp_listener(version))
        checks += [
            Check(
                f"a UDP TPROXY rule delivers to {address}",
                setup.udp_listener(version) in installed.udp_targets,
                "uproxy rules --in-interface IFACE --out-interface IFACE --udp-port PORT "
                f"--udp-listen {address} --apply",
            ),
            Check(
                f"ICMP errors reach the UDP sessions' sockets (IPv{version})",
                version in installed.icmp_versions,
                "uproxy rules ... --udp-port PORT --apply adds the rule",
                warning=True,
            ),
        ]
    return checks


def check_interfaces(names: Iterable[str], named_by_rules: set[str]) -> list[Check]:
    """Each interface must exist and be up with a carrier: TPROXY rules that name an
    interface this host lacks (or one that is down) intercept nothing, silently."""
    links = {
        str(link.get("ifname")): link.get("flags", [])
        for link in json.loads(run_tool(["ip", "-j", "link", "show"]) or "[]")
    }
    checks = []
    for name in sorted(names):
        # nft writes a wildcard as eth*, iptables as eth+.
        if name.endswith(("*", "+")):
            matching = [link for link in links if link.startswith(name[:-1])]
        else:
            matching = [name] if name in links else []
        why = ", named by the TPROXY rules," if name in named_by_rules else ""
        what = f"interface {name}{why} is up"
        up = [link for link in matching if {"UP", "LOWER_UP"} <= set(links[link])]
        if up:
            checks.append(Check(what, True))
        elif not matching:
            # Rules naming it must be replaced; a name given to check was likely mistyped.
            fix = (
                "apply rules that name this host's interfaces (ip -br link lists them): "
                "uproxy rules --in-interface IFACE --out-interface IFACE ... --apply"
                if name in named_by_rules
                else "name an interface this host has (ip -br link lists them)"
            )
            checks.append(Check(what, False, fix, "no such interface here"))
        elif not any("UP" in links[link] for link in matching):
            checks.append(Check(what, False, f"ip link set {matching[0]} up", "it is down"))
        else:
            checks.append(
                Check(
                    what,
                    False,
                    f"connect {matching[0]} (cable, or its peer's link)",
                    "it is up but has no carrier",
                )
            )
    return checks


def check_conntrack(port_ranges: list[PortRange]) -> Check:
    what = "conntrack cannot drop intercepted packets as INVALID"
    drops = invalid_drops()
    if not drops or notrack_in_place():
        return Check(what, True)
    where = "; ".join(f"{drop.tool} {drop.where}" for drop in drops)
    return Check(
        what,
        False,
        notrack_fix(drops, port_ranges),
        f"INVALID packets are dropped in {where}; conntrack marks relayed ones so under load",
        warning=True,
    )


def _sysctl(path: str) -> int | None:
    try:
        return int(Path("/proc/sys", path).read_text().strip())
    except (OSError, ValueError):
        return None


def check_forwarding(version: int) -> Check:
    key = "net.ipv4.ip_forward" if version == 4 else "net.ipv6.conf.all.forwarding"
    return Check(
        f"forwarding is on ({key})",
        _sysctl(key.replace(".", "/")) == 1,
        f"sysctl -w {key}=1",
    )


def check_rp_filter(interfaces: Sequence[str]) -> Check:
    present = [name for name in interfaces if Path("/proc/sys/net/ipv4/conf", name).is_dir()]
    if not present:
        present = sorted(
            path.name
            for path in Path("/proc/sys/net/ipv4/conf").iterdir()
            if path.name not in ("all", "default", "lo")
        )
    all_value = _sysctl("net/ipv4/conf/all/rp_filter") or 0
    strict = [
        name
        for name in present
        if max(all_value, _sysctl(f"net/ipv4/conf/{name}/rp_filter") or 0) == _STRICT
    ]
    keys = ["all", *strict] if all_value == _STRICT else strict
    return Check(
        "reverse-path filter is not strict on " + (", ".join(present) or "any interface"),
        not strict,
        "sysctl -w " + " ".join(f"net.ipv4.conf.{key}.rp_filter=2" for key in keys),
        "strict rp_filter drops intercepted packets whose source routes back another way",
    )


def run_checks(setup: TproxySetup, listen: Sequence[str], interfaces: Sequence[str]) -> list[Check]:
    """Every check, in order; ``interfaces`` (given on the command line) are checked with
    those the installed rules name, and stand in for them in the rp_filter check."""
    installed = installed_tproxy()
    checks = [check_kernel(), check_transparent()]
    for version in setup.versions:
        checks += check_policy_routing(setup, version)
    unreadable = unreadable_rules()
    if unreadable is not None:
        # Rules that cannot be read are not missing rules: one miss says why, instead of a
        # miss for every rule the host may well have.
        checks.append(
            Check("the installed firewall rules can be read", False, _AS_ROOT, unreadable)
        )
    else:
        checks += check_rules(setup, listen, installed.targets)
        checks += check_udp_rules(setup, installed)
        checks += check_interfaces(installed.interfaces | set(interfaces), installed.interfaces)
    checks += [check_forwarding(version) for version in setup.versions]
    if unreadable is None:
        checks.append(check_conntrack(installed.port_ranges))
    if 4 in setup.versions:
        named = [name for name in installed.interfaces if not name.endswith(("*", "+"))]
        checks.append(check_rp_filter(interfaces or sorted(named)))
    return checks


# Without these options, check looks at the interfaces the installed rules name.
_FROM_RULES = "the interfaces the installed TPROXY rules name"
InInterface = Annotated[
    str | None,
    typer.Option(
        "--in-interface",
        metavar="IFACE",
        envvar="UPROXY_IN_INTERFACE",
        help="Where clients' packets arrive: checked to be up, and for rp_filter.",
        show_default=_FROM_RULES,
    ),
]
OutInterface = Annotated[
    str | None,
    typer.Option(
        "--out-interface",
        metavar="IFACE",
        envvar="UPROXY_OUT_INTERFACE",
        help="Where the servers' answers arrive: checked to be up, and for rp_filter.",
        show_default=_FROM_RULES,
    ),
]


def check(
    listen: Listen = None,
    udp_listen: Annotated[
        list[str] | None,
        typer.Option(
            "--udp-listen",
            metavar="HOST:PORT",
            envvar="UPROXY_UDP_LISTEN",
            help="Where `uproxy serve --udp-listen` listens: checks the UDP rules too.",
            show_default="no UDP",
        ),
    ] = None,
    mark: Mark = 1,
    table: Table = 100,
    in_interface: InInterface = None,
    out_interface: OutInterface = None,
) -> None:
    """Check that this host is ready for `uproxy serve` behind TPROXY rules.

    Looks at: kernel support for TPROXY and socket matching, the right to set
    IP_TRANSPARENT, the fwmark ip rule and the local route of the routing table, TPROXY
    rules that deliver to each --listen address (and --udp-listen address, with the rule
    that brings ICMP errors to UDP sessions), the interfaces those rules name (they must
    exist and be up), forwarding, and strict reverse-path filtering. Prints a checklist with
    a fix for each miss; exits 0 when everything is in place, 1 otherwise.

    \b
    Examples:
      uproxy check --listen 127.0.0.1:9091 --listen [::1]:9091
      ip netns exec upxlab-1a2b-proxy uproxy check
    """
    values = listen or [DEFAULT_LISTEN]
    setup = routing_setup(listen=values, mark=mark, table=table, udp_listen=udp_listen or ())
    interfaces = [
        check_interface(name, hint)
        for name, hint in ((in_interface, "'--in-interface'"), (out_interface, "'--out-interface'"))
        if name is not None
    ]
    checks = run_checks(setup, values, interfaces)
    for item in checks:
        typer.echo(f"{'ok  ' if item.ok else 'WARN' if item.warning else 'MISS'}  {item.what}")
        if not item.ok:
            if item.detail:
                typer.echo(f"      ({item.detail})")
            typer.echo(f"      fix: {item.fix}")
    missed = sum(not item.ok and not item.warning for item in checks)
    warned = sum(item.warning and not item.ok for item in checks)
    warnings = f" ({warned} warning{'s' * (warned > 1)})" if warned else ""
    if missed:
        typer.echo(f"{missed} of {len(checks)} checks missed{warnings}")
        raise typer.Exit(1)
    typer.echo(f"all {len(checks)} checks passed{warnings}")
