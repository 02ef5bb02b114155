"""Firewall rules that drop what conntrack calls INVALID, which a TPROXY relay produces.

The client's connection to the proxy and the proxy's connection to the server have the same
4-tuple (the proxy connects out from the client's own address), so conntrack files both under
one entry and tracks one TCP window for what are two connections with their own sequence
numbers. Under bulk traffic it finds their segments out of window and marks them INVALID; a
common firewall line (``ct state invalid drop``, ``-m conntrack --ctstate INVALID -j DROP``)
then drops them and the flows stall. In the lab, four 30 MB echo flows both ways stalled for
good with such a rule on input and output (10 and 118 packets dropped), and passed with the
intercepted ports exempted from conntrack (``notrack`` in the raw hooks), the fix we give.

Only rules that can see the intercepted packets count: in a chain reached from the
prerouting, input, output or postrouting hook (intercepted flows are delivered locally, never
forwarded). The check is conservative: a rule's other matches are not read, so a rule limited
to other ports still warns.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from uproxy_netns import PortRange

from ._installed import run_tool

# Hooks that intercepted packets pass; forward is not one of them.
_NFT_HOOKS = ("prerouting", "input", "output", "postrouting")
_IPTABLES_CHAINS = ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING")
_NFT_FAMILIES = ("ip", "ip6", "inet")
_REFUSING = ("drop", "reject")
_STATE = re.compile(r"(! )?--(?:ct)?state (\S+)")
_JUMP = re.compile(r"\s-[jg] (\S+)")


@dataclass(frozen=True, slots=True)
class InvalidDrop:
    tool: str
    """``nft``, ``iptables`` or ``ip6tables``."""
    where: str
    """The chain, as the tool names it: ``inet filter input``, ``filter INPUT``."""


def invalid_drops() -> list[InvalidDrop]:
    """Every chain reachable from a hook intercepted packets pass that drops or rejects
    packets conntrack marked INVALID, in nft and in iptables/ip6tables."""
    managed = _iptables_nft_tables()
    found = [
        InvalidDrop("nft", where)
        for where in _nft_invalid_drops(_nft_ruleset())
        if tuple(where.split()[:2]) not in managed
    ]
    for tool in ("iptables", "ip6tables"):
        found += [
            InvalidDrop(tool, where)
            for where in _iptables_invalid_drops(run_tool([f"{tool}-save"]))
        ]
    return found


def notrack_in_place() -> bool:
    """Whether some rule exempts packets from conntrack at both prerouting and output: what
    the fix adds. Which packets it exempts is not read (see the module docstring)."""
    hooks: set[str] = set()
    for chain in _nft_chains(_nft_ruleset()):
        if chain.hook in ("prerouting", "output") and any(
            "notrack" in expr for rule in chain.rules for expr in rule
        ):
            hooks.add(chain.hook)
    for tool in ("iptables", "ip6tables"):
        for line in run_tool([f"{tool}-save", "-t", "raw"]).splitlines():
            name = line.split()[1] if line.startswith("-A ") else ""
            if name in ("PREROUTING", "OUTPUT") and re.search(r"--notrack|-j NOTRACK", line):
                hooks.add(name.lower())
    return hooks == {"prerouting", "output"}


def notrack_fix(drops: Iterable[InvalidDrop], port_ranges: list[PortRange]) -> str:
    """The command that exempts the intercepted ports from conntrack, for the firewall the
    dropping rules were written with (nft covers both IP versions in one table)."""
    tools = sorted({drop.tool for drop in drops})
    if "nft" in tools or not tools:
        ports = "{ " + (", ".join(_port_text(r, "-") for r in port_ranges) or "PORT") + " }"
        matches = f"tcp dport {ports} notrack; tcp sport {ports} notrack;"
        chains = "; ".join(
            f"chain {hook} {{ type filter hook {hook} priority raw; {matches} }}"
            for hook in ("prerouting", "output")
        )
        return f"nft 'table inet uproxy_notrack {{ {chains}; }}'"
    ports = ",".join(_port_text(r, ":") for r in port_ranges) or "PORT"
    return " && ".join(
        f"{tool} -t raw -I {chain} -p tcp -m multiport --{side} {ports} -j CT --notrack"
        for tool in tools
        for chain in ("PREROUTING", "OUTPUT")
        for side in ("dports", "sports")
    )


def _port_text(ports: PortRange, separator: str) -> str:
    first, last = ports
    return str(first) if first == last else f"{first}{separator}{last}"


# -- nft: read as JSON, where chains carry their hooks ------------------------------------


@dataclass(slots=True)
class _NftChain:
    family: str
    table: str
    name: str
    hook: str | None
    rules: list[list[Mapping[str, Any]]]


def _nft_ruleset() -> list[Mapping[str, Any]]:
    try:
        objects = json.loads(run_tool(["nft", "-j", "list", "ruleset"]) or "{}")
    except json.JSONDecodeError:
        return []
    return [item for item in objects.get("nftables", []) if isinstance(item, dict)]


def _nft_chains(ruleset: list[Mapping[str, Any]]) -> list[_NftChain]:
    chains: dict[tuple[str, str, str], _NftChain] = {}
    for item in ruleset:
        if "chain" in item:
            chain = item["chain"]
            key = (chain["family"], chain["table"], chain["name"])
            chains[key] = _NftChain(*key, chain.get("hook"), [])
    for item in ruleset:
        if "rule" in item:
            rule = item["rule"]
            key = (rule["family"], rule["table"], rule["chain"])
            if key in chains:
                chains[key].rules.append(list(rule.get("expr", [])))
    return [chain for chain in chains.values() if chain.family in _NFT_FAMILIES]


def _nft_invalid_drops(ruleset: list[Mapping[str, Any]]) -> Iterator[str]:
    chains = {(c.family, c.table, c.name): c for c in _nft_chains(ruleset)}
    pending = [key for key, chain in chains.items() if chain.hook in _NFT_HOOKS]
    seen = set(pending)
    while pending:
        chain = chains[pending.pop()]
        if any(_drops_invalid(rule) for rule in chain.rules):
            yield f"{chain.family} {chain.table} {chain.name}"
        for rule in chain.rules:
            for target in _nft_jumps(rule):
                key = (chain.family, chain.table, target)
                if key in chains and key not in seen:
                    seen.add(key)
                    pending.append(key)


def _drops_invalid(rule: list[Mapping[str, Any]]) -> bool:
    """``ct state invalid drop`` and its spellings: a set of states, ``!=``, a vmap."""
    refuses = any(verdict in expr for expr in rule for verdict in _REFUSING)
    for expr in rule:
        match = expr.get("match")
        if isinstance(match, dict) and _is_ct_state(match.get("left")):
            states = _states(match.get("right"))
            if refuses and ("invalid" in states) == (match.get("op") != "!="):
                return True
        vmap = expr.get("vmap")
        if isinstance(vmap, dict) and _is_ct_state(vmap.get("key")):
            for key, verdict in _vmap_entries(vmap):
                if "invalid" in _states(key) and any(v in verdict for v in _REFUSING):
                    return True
    return False


def _vmap_entries(vmap: Mapping[str, Any]) -> list[tuple[Any, Mapping[str, Any]]]:
    """A verdict map's ``(key, verdict)`` pairs; none for a named map (``vmap @states``),
    whose contents are not read."""
    data = vmap.get("data")
    entries = data.get("set", []) if isinstance(data, dict) else []
    return [
        (entry[0], entry[1])
        for entry in entries
        if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], dict)
    ]


def _is_ct_state(value: object) -> bool:
    return (
        isinstance(value, dict)
        and isinstance(value.get("ct"), dict)
        and value["ct"].get("key") == "state"
    )


def _states(value: object) -> set[str]:
    if isinstance(value, str):
        return {value}
    if isinstance(value, dict):
        return _states(value.get("set", []))
    if isinstance(value, list):
        return {state for item in value for state in _states(item)}
    return set()


def _nft_jumps(rule: list[Mapping[str, Any]]) -> Iterator[str]:
    for expr in rule:
        for verdict in ("jump", "goto"):
            if verdict in expr:
                yield str(expr[verdict]["target"])
        vmap = expr.get("vmap")
        if isinstance(vmap, dict):
            for _key, verdict_map in _vmap_entries(vmap):
                for verdict in ("jump", "goto"):
                    if verdict in verdict_map:
                        yield str(verdict_map[verdict]["target"])


def _iptables_nft_tables() -> set[tuple[str, str]]:
    """The nft tables that iptables-nft manages, read through iptables-save instead, so a
    rule is not reported twice."""
    managed: set[tuple[str, str]] = set()
    for tool, family in (("iptables", "ip"), ("ip6tables", "ip6")):
        if "nf_tables" not in run_tool([tool, "--version"]):
            continue
        for line in run_tool([f"{tool}-save"]).splitlines():
            if line.startswith("*"):
                managed.add((family, line[1:].strip()))
    return managed


# -- iptables: read from iptables-save, table by table --------------------------------------


def _iptables_invalid_drops(saved: str) -> Iterator[str]:
    for table, rules in _iptables_tables(saved).items():
        pending = [chain for chain in _IPTABLES_CHAINS if chain in rules]
        seen = set(pending)
        while pending:
            chain = pending.pop()
            if any(_iptables_drops_invalid(rule) for rule in rules[chain]):
                yield f"{table} {chain}"
            for rule in rules[chain]:
                for target in _JUMP.findall(rule):
                    if target in rules and target not in seen:
                        seen.add(target)
                        pending.append(target)


def _iptables_tables(saved: str) -> dict[str, dict[str, list[str]]]:
    """``{table: {chain: [rule, ...]}}`` from iptables-save output."""
    tables: dict[str, dict[str, list[str]]] = {}
    table: dict[str, list[str]] = {}
    for line in saved.splitlines():
        if line.startswith("*"):
            table = tables.setdefault(line[1:].strip(), {})
        elif line.startswith(":"):
            table.setdefault(line[1:].split()[0], [])
        elif line.startswith("-A "):
            table.setdefault(line.split()[1], []).append(line)
    return tables


def _iptables_drops_invalid(rule: str) -> bool:
    if not re.search(r"\s-j (DROP|REJECT)\b", rule):
        return False
    for negated, states in _STATE.findall(rule):
        if ("INVALID" in states.split(",")) != bool(negated):
            return True
    return False
