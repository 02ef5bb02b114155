"""What the TPROXY rules installed on this host say, read back from nft and iptables.

``uproxy check`` judges the host by what is really installed, whoever installed it (``uproxy
rules``, the seed's iptables lines typed by hand, a distribution's firewall): where the rules
deliver, which interfaces they take packets from and which ports they intercept. Rules are
recognised by their TPROXY target or their socket-match shortcut; a negated interface or port
(``iifname != "x"``, ``! -i x``) names nothing the proxy needs.
"""

from __future__ import annotations

import ipaddress
import re
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from uproxy_netns import PortRange, merge_port_ranges, parse_port_range

# nft prints a rule per line; iptables-nft's rules show there too, as "xt target TPROXY".
_NFT_TPROXY = re.compile(r"\btproxy\b|socket transparent|xt target TPROXY|xt match socket")
_NFT_TARGETS = (
    re.compile(r"tproxy ip to ([0-9.]+):(\d+)"),
    re.compile(r"tproxy ip6 to \[([0-9a-fA-F:.]+)\]:(\d+)"),
)
_NFT_INTERFACE = re.compile(r'\biif(?:name)? (!= )?(\{[^}]*\}|"[^"]*"|\S+)')
_NFT_PORTS = re.compile(r"\b(?:tcp|th) [ds]port (!= )?(\{[^}]*\}|\S+)")
_NFT_UDP = re.compile(r"\budp [ds]port\b|l4proto udp\b")
_ICMP = re.compile(r"\b(?:ipv6-icmp|icmpv6|icmp)\b")
_IPT_INTERFACE = re.compile(r"(?:^|\s)(! )?-i (\S+)")
_IPT_PORTS = re.compile(r"(! )?--(?:[ds]ports?|destination-ports?|source-ports?) (\S+)")


@dataclass(slots=True)
class InstalledTproxy:
    targets: set[tuple[str, int]] = field(default_factory=set)
    """Every (address, port) a TPROXY rule delivers to, addresses in normal form."""
    interfaces: set[str] = field(default_factory=set)
    """Interfaces the rules take packets from, as written: ``eth*`` (nft) and ``eth+``
    (iptables) are wildcards."""
    port_ranges: list[PortRange] = field(default_factory=list)
    """The intercepted ports, merged."""
    udp_targets: set[tuple[str, int]] = field(default_factory=set)
    """The (address, port) pairs a UDP TPROXY rule delivers to."""
    icmp_versions: set[int] = field(default_factory=set)
    """IP versions with a rule that sends ICMP errors to the sockets they concern."""


def run_tool(argv: Sequence[str]) -> str:
    """A tool's standard output; empty when it is missing or fails (nothing installed)."""
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    except FileNotFoundError:
        return ""
    return done.stdout if done.returncode == 0 else ""


def unreadable_rules() -> str | None:
    """Why the rulesets cannot be read (reading needs CAP_NET_ADMIN), or ``None`` when they
    can: without it every reader here would see an empty ruleset, not the installed one."""
    for argv in (["nft", "list", "tables"], ["iptables-save", "-t", "mangle"]):
        try:
            done = subprocess.run(argv, capture_output=True, text=True, check=False)
        except FileNotFoundError:
            continue
        error = done.stderr.strip()
        if done.returncode != 0 and re.search(r"not permitted|Permission denied", error):
            return f"{argv[0]}: {error.splitlines()[-1]}"
    return None


def installed_tproxy() -> InstalledTproxy:
    found = InstalledTproxy()
    ranges: list[PortRange] = []
    for line in run_tool(["nft", "list", "ruleset"]).splitlines():
        if not _NFT_TPROXY.search(line):
            continue
        for pattern in _NFT_TARGETS:
            for host, port in pattern.findall(line):
                found.targets.add((normal_address(host), int(port)))
                if _NFT_UDP.search(line):
                    found.udp_targets.add((normal_address(host), int(port)))
        if "socket transparent" in line:
            found.icmp_versions.update(_icmp_versions(line))
        found.interfaces.update(_operands(_NFT_INTERFACE, line))
        ranges += _port_ranges(_operands(_NFT_PORTS, line))
    for tool in ("iptables-save", "ip6tables-save"):
        for line in run_tool([tool, "-t", "mangle"]).splitlines():
            if "-j TPROXY" not in line and "-m socket" not in line:
                continue
            ip_match = re.search(r"--on-ip (\S+)", line)
            port_match = re.search(r"--on-port (\d+)", line)
            if ip_match and port_match:
                target = (normal_address(ip_match.group(1)), int(port_match.group(1)))
                found.targets.add(target)
                if "-p udp" in line:
                    found.udp_targets.add(target)
            if "-m socket" in line:
                found.icmp_versions.update(_icmp_versions(line))
            found.interfaces.update(_operands(_IPT_INTERFACE, line))
            ranges += _port_ranges(_operands(_IPT_PORTS, line))
    found.port_ranges = merge_port_ranges(ranges)
    return found


def normal_address(host: str) -> str:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host


def _operands(pattern: re.Pattern[str], line: str) -> Iterator[str]:
    """The values a rule matches with ``pattern``, sets and comma lists taken apart;
    negated matches are left out."""
    for negated, operand in pattern.findall(line):
        if negated:
            continue
        for item in re.split(r"[{},\s]+", operand):
            item = item.strip('"')
            if item:
                yield item


def _port_ranges(items: Iterator[str]) -> list[PortRange]:
    ranges = []
    for item in items:
        try:
            ranges.append(parse_port_range(item))
        except ValueError:
            continue  # a named service or a set reference: not a port we can read
    return ranges


def _icmp_versions(line: str) -> set[int]:
    """The IP versions whose ICMP errors a socket-matching rule covers (none if it is not
    about ICMP)."""
    return {6 if "6" in name else 4 for name in _ICMP.findall(line)}
