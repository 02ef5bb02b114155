"""Putting a ``TproxySetup`` on the host this process runs on, and taking it off again.

Everything is checked before it is added, so applying twice changes nothing, and removal
takes away only our nft table, our iptables chains (and the one jump to them) and the
fwmark rule and local route of our mark and table. The firewall part is one transaction
(``nft -f``, or ``iptables-restore`` followed by a single jump insertion); the policy routing
goes in first, so the first marked packet already finds its route.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess

from ._namespace import LabError, run
from ._rules import IPTABLES_CHAIN, IPTABLES_DIVERT_CHAIN, NFT_TABLE, TproxySetup


def apply_setup(setup: TproxySetup, backend: str) -> None:
    """Install ``setup`` with ``backend`` (``nft`` or ``iptables``); idempotent."""
    for version in setup.versions:
        _ensure_policy_routing(setup, version)
    if backend == "nft":
        run(["nft", "-f", "-"], input=setup.nft_ruleset())
        return
    for version in setup.versions:
        tool = _iptables(version)
        run([f"{tool}-restore", "--noflush"], input=setup.iptables_chains(version))
        if not _succeeds([tool, "-t", "mangle", "-C", "PREROUTING", "-j", IPTABLES_CHAIN]):
            run([tool, "-t", "mangle", "-I", "PREROUTING", "-j", IPTABLES_CHAIN])


def remove_setup(setup: TproxySetup, backend: str) -> None:
    """Take off what ``apply_setup`` added; what is already gone is skipped."""
    if backend == "nft":
        if _succeeds(["nft", "list", "table", *NFT_TABLE.split()]):
            run(["nft", "-f", "-"], input=setup.nft_removal())
    else:
        for version in (4, 6):
            _remove_iptables_chains(_iptables(version))
    for version in setup.versions:
        family = ["-6"] if version == 6 else []
        if has_local_route(setup, version):
            run(["ip", *family, *setup.ip_route_removal(version).split()])
        while has_policy_rule(setup, version):
            run(["ip", *family, *setup.ip_rule_removal(version).split()])


def _ensure_policy_routing(setup: TproxySetup, version: int) -> None:
    family = ["-6"] if version == 6 else []
    if not has_policy_rule(setup, version):
        run(["ip", *family, *setup.ip_rule(version).split()])
    if not has_local_route(setup, version):
        run(["ip", *family, *setup.ip_route(version).split()])


def has_policy_rule(setup: TproxySetup, version: int) -> bool:
    """Whether the ``fwmark MARK lookup TABLE`` rule of ``setup`` is there (``ip rule``)."""
    return any(
        rule.get("fwmark") == hex(setup.mark) and rule.get("table") == str(setup.table)
        for rule in _ip_json(version, ["rule", "show"])
    )


def has_local_route(setup: TproxySetup, version: int) -> bool:
    """Whether ``setup``'s table routes every address to ``lo`` as local."""
    return any(
        route.get("type") == "local" and route.get("dst") == "default" and route.get("dev") == "lo"
        for route in _ip_json(version, ["route", "show", "table", str(setup.table)])
    )


def _ip_json(version: int, argv: list[str]) -> list[dict[str, object]]:
    family = ["-6"] if version == 6 else []
    try:
        output = run(["ip", "-j", *family, *argv])
    except LabError:
        return []  # a routing table that was never used "does not exist"
    entries = json.loads(output or "[]")
    return [entry for entry in entries if isinstance(entry, dict)]


def _remove_iptables_chains(tool: str) -> None:
    while _succeeds([tool, "-t", "mangle", "-C", "PREROUTING", "-j", IPTABLES_CHAIN]):
        run([tool, "-t", "mangle", "-D", "PREROUTING", "-j", IPTABLES_CHAIN])
    # Flush both before deleting either: the first chain jumps to the second.
    present = [
        chain
        for chain in (IPTABLES_CHAIN, IPTABLES_DIVERT_CHAIN)
        if _succeeds([tool, "-t", "mangle", "-S", chain])
    ]
    for chain in present:
        run([tool, "-t", "mangle", "-F", chain])
    for chain in present:
        run([tool, "-t", "mangle", "-X", chain])
    if present:
        _drop_empty_nft_mangle(tool)


# What iptables-save shows of a mangle table that holds nothing: the built-in chains, each
# with policy ACCEPT.
_EMPTY_MANGLE_LINE = re.compile(
    r":(PREROUTING|INPUT|FORWARD|OUTPUT|POSTROUTING) ACCEPT \[\d+:\d+\]"
)


def _drop_empty_nft_mangle(tool: str) -> None:
    """iptables-nft creates ``table ip mangle`` (``ip6``) with its base chains when a first
    mangle rule is added, and leaves it behind when the last goes; an empty table does
    nothing, so we delete it and leave the ruleset as it was before we came."""
    if "nf_tables" not in run([tool, "--version"]) or shutil.which("nft") is None:
        return
    saved = run([f"{tool}-save", "-t", "mangle"]).splitlines()
    contents = [line for line in saved if line and not line.startswith(("#", "*", "COMMIT"))]
    if not all(_EMPTY_MANGLE_LINE.fullmatch(line) for line in contents):
        return
    family = "ip" if tool == "iptables" else "ip6"
    if _succeeds(["nft", "list", "table", family, "mangle"]):
        run(["nft", "delete", "table", family, "mangle"])


def _iptables(version: int) -> str:
    return "iptables" if version == 4 else "ip6tables"


def _succeeds(argv: list[str]) -> bool:
    try:
        done = subprocess.run(argv, capture_output=True, check=False)
    except FileNotFoundError as exc:
        raise LabError(f"{argv[0]} is not installed") from exc
    return done.returncode == 0
