"""The TPROXY set-up for a proxy host, rendered as text: for the lab and for ``uproxy rules``.

Two forms live here. ``iptables_restore`` is the seed proxy's rules
(``shared/seed-uproxy-README.md``) as the lab installs them, replacing the whole mangle table
of a namespace it owns. ``nft_ruleset``, ``iptables_chains`` and ``shell_script`` are what a
real host gets: everything in a table or chains of our own, so it can be applied twice and
removed again without touching anyone else's rules.

Why the shortcut rule of those host forms skips bare SYNs: see ``_SHORTCUT_WHY``, which is
printed into the generated rules so the reader of a ruleset finds it there too.
"""

from __future__ import annotations

from dataclasses import dataclass

PortRange = tuple[int, int]

# The nft table and iptables chains that hold everything ``uproxy rules`` adds.
NFT_TABLE = "inet uproxy"
IPTABLES_CHAIN = "UPROXY_PREROUTING"
IPTABLES_DIVERT_CHAIN = "UPROXY_DIVERT"

BACKENDS = ("nft", "iptables")

# Kernel reasoning behind the shortcut, for comments in the generated output (one line each).
_SHORTCUT_WHY = (
    "Shortcut: a packet of a flow the proxy already holds is marked and routed to its",
    "socket without the TPROXY lookup. Only sockets the proxy made qualify (IP_TRANSPARENT).",
    "A bare SYN (SYN without ACK, RST, FIN) never takes it: the socket lookup also finds",
    "TIME_WAIT sockets, and a TIME_WAIT socket of a transparent socket is still transparent",
    "(inet_sk_transparent() returns tw_transparent), so a client reusing its port while the",
    "proxy holds TIME_WAIT would be sent to that dead socket, which answers with an ACK, not",
    "a SYN-ACK, and the client waits for its 1 s SYN retransmit. Sent on to TPROXY instead,",
    "the SYN meets nf_tproxy_handle_time_wait4(), which retires the TIME_WAIT socket and",
    "hands the SYN to the listener. The server's SYN-ACK to the relay's connect() from the",
    "client's port is not a bare SYN, so it keeps the shortcut to the relay's socket.",
)

_UDP_WHY = (
    "UDP: the servers' datagrams, and the ICMP errors about a session (port unreachable",
    "from a server, say), go to the session's own transparent socket, connected to its peer;",
    "without the ICMP rule a server's 'port unreachable' would be forwarded to the client and",
    "the session would wait for its idle timeout. The clients' datagrams all go to TPROXY,",
    "with no socket shortcut: TPROXY itself finds a session's connected socket first, and",
    "takes no socket that is not connected yet, while a shortcut would match a new session's",
    "socket between its bind() and connect() and hand it another client's datagram (or, once",
    "connected, drop it). The servers' side has no TPROXY rule for UDP: a server's datagram",
    "for a session the proxy no longer holds is routed to the client as it would be without",
    "the proxy, instead of opening a session from the server.",
)

_TPROXY_WHY = (
    "New flows: TPROXY hands the packet to the listener (or to the proxy's socket if the",
    "flow has one), marks it, and the mark routes it locally through the table below.",
    "On the server side this also catches packets of flows the proxy no longer holds, so",
    "they are answered by the proxy host instead of being forwarded to the client.",
)


def parse_port_range(text: str) -> PortRange:
    """``9090``, ``9100-9199`` or the iptables form ``9100:9199``, as ``(first, last)``.

    Raises ``ValueError`` with a one-line reason.
    """
    for separator in ("-", ":"):
        first_text, sep, last_text = text.strip().partition(separator)
        if sep:
            break
    else:
        first_text = last_text = text.strip()
    for part in (first_text, last_text):
        if not part.isdigit():
            raise ValueError(f"{text!r} is not a port or a range FIRST-LAST")
    first, last = int(first_text), int(last_text)
    for port in (first, last):
        if not 1 <= port <= 65535:
            raise ValueError(f"{text!r}: port {port} is out of range (1-65535)")
    if first > last:
        raise ValueError(f"{text!r}: the range ends before it starts")
    return (first, last)


def merge_port_ranges(ranges: list[PortRange]) -> list[PortRange]:
    """Sorted, with overlapping and adjacent ranges joined (nft refuses overlapping set
    elements, and one range is one rule less for iptables)."""
    merged: list[PortRange] = []
    for first, last in sorted(ranges):
        if merged and first <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], last))
        else:
            merged.append((first, last))
    return merged


def _comment(lines: tuple[str, ...], indent: str = "") -> list[str]:
    return [f"{indent}# {line}" for line in lines]


@dataclass(frozen=True, slots=True)
class TproxySetup:
    """What to intercept and where to deliver it."""

    in_interface: str = "ens6"
    out_interface: str = "ens7"
    ports: str = "9090"
    """Ports or ranges, comma-separated: ``9090``, ``9100-9199`` (or ``9100:9199``)."""
    listen_port: int = 9091
    listen_v4: str | None = "127.0.0.1"
    """Where IPv4 flows are delivered; ``None``: IPv4 is not intercepted."""
    listen_v6: str | None = "::1"
    """Where IPv6 flows are delivered; ``None``: IPv6 is not intercepted."""
    mark: int = 1
    table: int = 100
    syn_to_tproxy: bool = False
    """Add ``! --syn`` to the seed's ``-m socket`` shortcut in ``iptables_restore``, so every
    SYN reaches TPROXY even when it matches a TIME_WAIT socket (the seed's rules lack it).
    The host forms (nft, own iptables chains) always do."""
    listen_port_v6: int | None = None
    """The IPv6 listener's port when it differs from ``listen_port``."""
    udp_ports: str = ""
    """UDP ports or ranges to intercept, as ``ports``; empty: no UDP."""
    udp_listeners: tuple[tuple[str, int], ...] = ()
    """Where UDP is delivered, at most one address per IP version; empty: the same addresses
    as TCP (a UDP socket and a TCP socket share an address and port without a clash)."""

    @property
    def udp_port_ranges(self) -> list[PortRange]:
        return _ranges(self.udp_ports)

    @property
    def udp_versions(self) -> list[int]:
        """The IP versions whose UDP is intercepted: those with a UDP listener."""
        if not self.udp_ports:
            return []
        if not self.udp_listeners:
            return self.tcp_versions
        return sorted({6 if ":" in host else 4 for host, _ in self.udp_listeners})

    def udp_listener(self, version: int) -> tuple[str, int]:
        for host, port in self.udp_listeners:
            if (6 if ":" in host else 4) == version:
                return (host, port)
        return self.listener(version)

    @property
    def port_ranges(self) -> list[PortRange]:
        return _ranges(self.ports)

    @property
    def tcp_versions(self) -> list[int]:
        """The IP versions whose TCP is intercepted: those with a listener."""
        return [v for v, host in ((4, self.listen_v4), (6, self.listen_v6)) if host is not None]

    @property
    def versions(self) -> list[int]:
        """The IP versions intercepted, TCP or UDP: each needs the policy routing."""
        tcp = self.tcp_versions if self.ports else []
        return sorted({*tcp, *self.udp_versions})

    def listener(self, version: int) -> tuple[str, int]:
        host = self.listen_v4 if version == 4 else self.listen_v6
        if host is None:
            raise ValueError(f"no IPv{version} listener")
        port = self.listen_port if version == 4 else self.listen_port_v6 or self.listen_port
        return (host, port)

    # -- the lab's form: the seed's rules in a mangle table of the lab's own --------------

    def iptables_restore(self, version: int) -> str:
        """Input for ``iptables-restore`` (``version=4``) or ``ip6tables-restore`` (6)."""
        on_ip, on_port = self.listener(version)
        in_, out = f"-i {self.in_interface} -p tcp", f"-i {self.out_interface} -p tcp"
        shortcut = "-m socket ! --syn" if self.syn_to_tproxy else "-m socket"
        tproxy = f"-j TPROXY --tproxy-mark {self.mark} --on-port {on_port} --on-ip {on_ip}"
        lines = ["*mangle", ":DIVERT - [0:0]"]
        for ports in self._iptables_ports():
            lines += [
                f"-A PREROUTING {in_} {shortcut} --dport {ports} -j DIVERT",
                f"-A PREROUTING {out} {shortcut} --sport {ports} -j DIVERT",
            ]
        lines += self._lab_udp_shortcuts(version)
        lines += [f"-A DIVERT -j MARK --set-mark {self.mark}", "-A DIVERT -j ACCEPT"]
        for ports in self._iptables_ports():
            lines += [
                f"-A PREROUTING {in_} --dport {ports} {tproxy}",
                f"-A PREROUTING {out} --sport {ports} {tproxy}",
            ]
        lines += self._lab_udp_tproxy(version)
        return "\n".join([*lines, "COMMIT", ""])

    def _lab_udp_shortcuts(self, version: int) -> list[str]:
        """The lab's UDP shortcuts: datagrams and ICMP errors of a session the proxy holds
        go to its socket (see ``_UDP_WHY``)."""
        if not self.udp_ports:
            return []
        icmp = "icmp" if version == 4 else "ipv6-icmp"
        lines = [
            f"-A PREROUTING -i {self.out_interface} -p udp --sport {ports} "
            "-m socket --transparent -j DIVERT"
            for ports in _iptables_form(self.udp_port_ranges)
        ]
        for interface in (self.in_interface, self.out_interface):
            lines.append(
                f"-A PREROUTING -i {interface} -p {icmp} -m socket --transparent -j DIVERT"
            )
        return lines

    def _lab_udp_tproxy(self, version: int) -> list[str]:
        if not self.udp_ports:
            return []
        on_ip, on_port = self.udp_listener(version)
        tproxy = f"-j TPROXY --tproxy-mark {self.mark} --on-port {on_port} --on-ip {on_ip}"
        return [
            f"-A PREROUTING -i {self.in_interface} -p udp --dport {ports} {tproxy}"
            for ports in _iptables_form(self.udp_port_ranges)
        ]

    def ip_batch(self, version: int) -> str:
        """The policy routing that delivers marked packets to local sockets, for ``ip -batch``
        (``ip -6 -batch`` for ``version=6``)."""
        return f"{self.ip_rule(version)}\n{self.ip_route(version)}\n"

    def ip_unbatch(self, version: int) -> str:
        """The reverse of ``ip_batch``."""
        return f"{self.ip_rule_removal(version)}\n{self.ip_route_removal(version)}\n"

    def ip_rule_removal(self, version: int) -> str:
        return "rule del " + self.ip_rule(version).removeprefix("rule add ")

    def ip_route_removal(self, version: int) -> str:
        return "route del " + self.ip_route(version).removeprefix("route add ")

    def ip_rule(self, version: int) -> str:
        """``rule add ...`` for ``ip`` (``ip -6`` for version 6)."""
        return f"rule add fwmark {self.mark} lookup {self.table}"

    def ip_route(self, version: int) -> str:
        """``route add ...`` for ``ip``: every address is local in our table."""
        everything = "0.0.0.0/0" if version == 4 else "::/0"
        return f"route add local {everything} dev lo table {self.table}"

    def _iptables_ports(self) -> list[str]:
        return _iptables_form(self.port_ranges)

    # -- the host forms: own table / own chains, idempotent, removable -------------------

    def nft_ruleset(self) -> str:
        """One ``nft -f`` transaction that (re)defines ``table inet uproxy``.

        Declaring the table, deleting it and defining it again in one transaction works
        whether or not it existed, and the kernel applies it all or nothing.
        """
        port_set = _nft_set(self.port_ranges)
        udp_set = _nft_set(self.udp_port_ranges)
        tcp_versions = self.tcp_versions if self.ports else []
        bare_syn = "tcp flags & (fin | syn | rst | ack) == syn"
        not_bare_syn = bare_syn.replace("==", "!=")
        indent = " " * 8
        mark = f"meta mark set {self.mark}"
        in_, out = f'iifname "{self.in_interface}"', f'iifname "{self.out_interface}"'
        body: list[str] = []
        if tcp_versions:
            body += _comment(_SHORTCUT_WHY, indent)
        for version in tcp_versions:
            family = f"meta nfproto ipv{version}"
            body += [
                f"{indent}{in_} {family} tcp dport {port_set} "
                f"{not_bare_syn} socket transparent 1 {mark} accept",
                f"{indent}{out} {family} tcp sport {port_set} "
                f"{not_bare_syn} socket transparent 1 {mark} accept",
            ]
        if self.udp_versions:
            body += _comment(_UDP_WHY, indent)
        for version in self.udp_versions:
            family = f"meta nfproto ipv{version}"
            icmp = "icmp" if version == 4 else "ipv6-icmp"
            body += [
                f"{indent}{out} {family} udp sport {udp_set} socket transparent 1 {mark} accept",
                f'{indent}iifname {{ "{self.in_interface}", "{self.out_interface}" }} {family} '
                f"meta l4proto {icmp} socket transparent 1 {mark} accept",
            ]
        if tcp_versions:
            body += _comment(_TPROXY_WHY, indent)
        for version in tcp_versions:
            family = f"meta nfproto ipv{version}"
            target = _nft_target(version, self.listener(version))
            for side in (
                f"{in_} {family} tcp dport {port_set}",
                f"{out} {family} tcp sport {port_set}",
            ):
                body.append(f"{indent}{side} {mark} tproxy {target} accept")
        for version in self.udp_versions:
            family = f"meta nfproto ipv{version}"
            target = _nft_target(version, self.udp_listener(version))
            body.append(f"{indent}{in_} {family} udp dport {udp_set} {mark} tproxy {target} accept")
        return "\n".join(
            [
                "# uproxy TPROXY rules; applying them again replaces the table in one step.",
                f"table {NFT_TABLE}",
                f"delete table {NFT_TABLE}",
                f"table {NFT_TABLE} {{",
                "    chain prerouting {",
                "        type filter hook prerouting priority mangle; policy accept;",
                *body,
                "    }",
                "}",
                "",
            ]
        )

    @staticmethod
    def nft_removal() -> str:
        """An ``nft -f`` transaction that deletes our table, whether or not it exists."""
        return f"table {NFT_TABLE}\ndelete table {NFT_TABLE}\n"

    def iptables_chains(self, version: int) -> str:
        """``iptables-restore --noflush`` input that fills our own mangle chains.

        ``--noflush`` leaves every other chain alone and flushes the chains declared here, so
        applying twice gives the same chains. The jump from PREROUTING is added separately,
        once, after the chains are complete, so the set-up goes live in one step.
        """
        chain, divert = IPTABLES_CHAIN, IPTABLES_DIVERT_CHAIN
        in_, out = f"-i {self.in_interface}", f"-i {self.out_interface}"
        shortcut = "! --syn -m socket --transparent"
        tcp = self.ports and version in self.tcp_versions
        udp = version in self.udp_versions
        lines = ["*mangle", f":{chain} - [0:0]", f":{divert} - [0:0]"]
        if tcp:
            lines += _comment(_SHORTCUT_WHY)
            for ports in self._iptables_ports():
                lines += [
                    f"-A {chain} {in_} -p tcp --dport {ports} {shortcut} -j {divert}",
                    f"-A {chain} {out} -p tcp --sport {ports} {shortcut} -j {divert}",
                ]
        if udp:
            icmp = "icmp" if version == 4 else "ipv6-icmp"
            lines += _comment(_UDP_WHY)
            lines += [
                f"-A {chain} {out} -p udp --sport {ports} -m socket --transparent -j {divert}"
                for ports in _iptables_form(self.udp_port_ranges)
            ]
            lines += [
                f"-A {chain} {side} -p {icmp} -m socket --transparent -j {divert}"
                for side in (in_, out)
            ]
        if tcp:
            lines += _comment(_TPROXY_WHY)
            tproxy = _iptables_target(self.mark, self.listener(version))
            for ports in self._iptables_ports():
                lines += [
                    f"-A {chain} {in_} -p tcp --dport {ports} {tproxy}",
                    f"-A {chain} {out} -p tcp --sport {ports} {tproxy}",
                ]
        if udp:
            tproxy = _iptables_target(self.mark, self.udp_listener(version))
            lines += [
                f"-A {chain} {in_} -p udp --dport {ports} {tproxy}"
                for ports in _iptables_form(self.udp_port_ranges)
            ]
        lines += [f"-A {divert} -j MARK --set-mark {self.mark}", f"-A {divert} -j ACCEPT"]
        return "\n".join([*lines, "COMMIT", ""])

    def shell_script(self, backend: str) -> str:
        """The whole set-up as a bash script a user can read, keep, and run (idempotent)."""
        lines = ["#!/usr/bin/env bash", "# uproxy TPROXY set-up; running it twice changes nothing."]
        lines.append("# Policy routing: packets marked by the rules below are delivered locally.")
        for version in self.versions:
            ip = "ip" if version == 4 else "ip -6"
            rule = self.ip_rule(version).removeprefix("rule add ")
            lines += [
                f"{ip} rule show {rule} | grep -q . || {ip} rule add {rule}",
                f"{ip} {self.ip_route(version).replace('route add', 'route replace')}",
            ]
        if backend == "nft":
            lines += ["nft -f - <<'EOF'", self.nft_ruleset().rstrip("\n"), "EOF"]
        elif backend == "iptables":
            for version in self.versions:
                tool = "iptables" if version == 4 else "ip6tables"
                jump = f"-t mangle -C PREROUTING -j {IPTABLES_CHAIN}"
                lines += [
                    f"{tool}-restore --noflush <<'EOF'",
                    self.iptables_chains(version).rstrip("\n"),
                    "EOF",
                    f"{tool} {jump} 2>/dev/null || {tool} {jump.replace('-C', '-I')}",
                ]
        else:
            raise ValueError(f"unknown backend {backend!r} (one of {', '.join(BACKENDS)})")
        return "\n".join([*lines, ""])


def _iptables_form(ranges: list[PortRange]) -> list[str]:
    return [str(a) if a == b else f"{a}:{b}" for a, b in ranges]


def _ranges(text: str) -> list[PortRange]:
    """``ports`` or ``udp_ports`` as merged ranges; empty text: none."""
    if not text:
        return []
    return merge_port_ranges([parse_port_range(item) for item in text.split(",")])


def _nft_set(ranges: list[PortRange]) -> str:
    return "{ " + ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges) + " }"


def _nft_target(version: int, listener: tuple[str, int]) -> str:
    host, port = listener
    return f"ip to {host}:{port}" if version == 4 else f"ip6 to [{host}]:{port}"


def _iptables_target(mark: int, listener: tuple[str, int]) -> str:
    on_ip, on_port = listener
    return f"-j TPROXY --tproxy-mark {mark} --on-port {on_port} --on-ip {on_ip}"
