"""The seed proxy's TPROXY rules, for the lab's proxy host.

They are the iptables form of ``shared/seed-uproxy-README.md``, for IPv4 and IPv6: packets of
flows the proxy already holds (``-m socket``) are marked and routed locally; new flows to the
intercepted ports go to TPROXY, which hands them to the listener.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TproxySetup:
    """What to intercept and where to deliver it."""

    in_interface: str = "ens6"
    out_interface: str = "ens7"
    ports: str = "9090"
    """One port or an iptables range ``FIRST:LAST``."""
    listen_port: int = 9091
    listen_v4: str = "127.0.0.1"
    listen_v6: str = "::1"
    mark: int = 1
    table: int = 100
    syn_to_tproxy: bool = False
    """Add ``! --syn`` to the ``-m socket`` shortcut, so every SYN reaches TPROXY even when it
    matches a TIME_WAIT socket (the seed's rules lack it)."""

    def iptables_restore(self, version: int) -> str:
        """Input for ``iptables-restore`` (``version=4``) or ``ip6tables-restore`` (6)."""
        on_ip = self.listen_v4 if version == 4 else self.listen_v6
        in_, out = f"-i {self.in_interface} -p tcp", f"-i {self.out_interface} -p tcp"
        shortcut = "-m socket ! --syn" if self.syn_to_tproxy else "-m socket"
        tproxy = f"-j TPROXY --tproxy-mark {self.mark} --on-port {self.listen_port} --on-ip {on_ip}"
        return "\n".join(
            [
                "*mangle",
                ":DIVERT - [0:0]",
                f"-A PREROUTING {in_} {shortcut} --dport {self.ports} -j DIVERT",
                f"-A PREROUTING {out} {shortcut} --sport {self.ports} -j DIVERT",
                f"-A DIVERT -j MARK --set-mark {self.mark}",
                "-A DIVERT -j ACCEPT",
                f"-A PREROUTING {in_} --dport {self.ports} {tproxy}",
                f"-A PREROUTING {out} --sport {self.ports} {tproxy}",
                "COMMIT",
                "",
            ]
        )

    def ip_batch(self, version: int) -> str:
        """The policy routing that delivers marked packets to local sockets, for ``ip -batch``
        (``ip -6 -batch`` for ``version=6``)."""
        everything = "0.0.0.0/0" if version == 4 else "::/0"
        return (
            f"rule add fwmark {self.mark} lookup {self.table}\n"
            f"route add local {everything} dev lo table {self.table}\n"
        )

    def ip_unbatch(self, version: int) -> str:
        """The reverse of ``ip_batch``."""
        everything = "0.0.0.0/0" if version == 4 else "::/0"
        return (
            f"rule del fwmark {self.mark} lookup {self.table}\n"
            f"route del local {everything} dev lo table {self.table}\n"
        )
