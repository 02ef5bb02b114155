"""The three-host lab: a client, the proxy host (a router) and a server, each a namespace.

::

    client  eth0 ─── ens6  proxy  ens7 ─── eth0  server
    192.0.2.2/24    192.0.2.1   198.51.100.1    198.51.100.2/24
    2001:db8:1::2   2001:db8:1::1  2001:db8:2::1  2001:db8:2::2

The proxy host forwards between the two links and carries the seed's TPROXY rules, so a
client that connects to the server's address is handed to a proxy listening in the proxy
namespace, exactly as on a real router. Only documentation address ranges are used.
"""

from __future__ import annotations

import os
import secrets
from types import TracebackType
from typing import Self

from ._namespace import NETNS_DIR, LabError, Namespace
from ._rules import TproxySetup

CLIENT_V4 = "192.0.2.2"
PROXY_CLIENT_SIDE_V4 = "192.0.2.1"
PROXY_SERVER_SIDE_V4 = "198.51.100.1"
SERVER_V4 = "198.51.100.2"
CLIENT_V6 = "2001:db8:1::2"
PROXY_CLIENT_SIDE_V6 = "2001:db8:1::1"
PROXY_SERVER_SIDE_V6 = "2001:db8:2::1"
SERVER_V6 = "2001:db8:2::2"

# Names of labs that belong to a running process carry its pid, so a lab left behind by a
# killed test run can be recognised and swept; a lab meant to outlive its creator
# (`uproxy lab up`) is named without one.
_OWNED_PREFIX = "upx"
_KEPT_PREFIX = "upxlab"

_ROLES = ("client", "proxy", "server")

# The seed's rules: port 9090 intercepted, delivered to port 9091.
SEED_TPROXY = TproxySetup()


def _host_batch(interface: str, v4: str, v6: str, gateway_v4: str, gateway_v6: str) -> str:
    # nodad: without it an IPv6 address stays "tentative" for a second or two and connect()
    # fails with EADDRNOTAVAIL meanwhile.
    return "\n".join(
        [
            "link set lo up",
            f"link set {interface} up",
            f"addr add {v4}/24 dev {interface}",
            f"addr add {v6}/64 dev {interface} nodad",
            f"route add default via {gateway_v4}",
            f"route add default via {gateway_v6}",
            "",
        ]
    )


class Lab:
    """Three namespaces wired as client ─ proxy ─ server, with the TPROXY rules on the proxy.

    Use it as a context manager: the namespaces (and with them every interface, rule and
    socket in them) are deleted when the block ends, whatever happened inside.
    """

    def __init__(self, tag: str, tproxy: TproxySetup | None) -> None:
        self.tag = tag
        self.tproxy = tproxy
        self.client, self.proxy, self.server = (Namespace(f"{tag}-{role}") for role in _ROLES)

    @classmethod
    def owned(cls, tproxy: TproxySetup | None = SEED_TPROXY) -> Lab:
        """A lab named for this process, swept by a later run if this one dies uncleanly.

        ``tproxy=None`` builds a plain router: the proxy host forwards and intercepts nothing.
        """
        return cls(f"{_OWNED_PREFIX}{os.getpid()}-{secrets.token_hex(2)}", tproxy)

    @classmethod
    def kept(cls, tproxy: TproxySetup | None = SEED_TPROXY) -> Lab:
        """A lab meant to stay up after this process exits (``uproxy lab up``)."""
        return cls(f"{_KEPT_PREFIX}-{secrets.token_hex(2)}", tproxy)

    @classmethod
    def existing_kept(cls, tag: str) -> Lab:
        """The kept lab ``tag`` (as ``kept_labs`` lists it), to take down; ``LabError`` if
        there is none by that name."""
        if tag not in kept_labs():
            raise LabError(f"no lab named {tag!r} is up (uproxy lab status lists them)")
        return cls(tag, None)

    @property
    def namespaces(self) -> tuple[Namespace, Namespace, Namespace]:
        return (self.client, self.proxy, self.server)

    def __enter__(self) -> Self:
        self.up()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.down()

    def up(self) -> None:
        """Build the lab; on any failure, remove what was built and raise ``LabError``."""
        try:
            for namespace in self.namespaces:
                namespace.create()
                # Duplicate address detection holds even link-local addresses back for a
                # second or more, and neighbour discovery waits on them: a lab of fixed,
                # unique addresses has nothing to detect. Set before any interface exists.
                namespace.sysctl(
                    {"net.ipv6.conf.default.accept_dad": 0, "net.ipv6.conf.all.accept_dad": 0}
                )
            self._wire()
            wanted, self.tproxy = self.tproxy, None
            if wanted is not None:
                self.install_tproxy(wanted)
        except BaseException:
            self.down()
            raise

    def down(self) -> None:
        """Delete the lab's namespaces; safe to call twice, and after a partial ``up``."""
        errors = []
        for namespace in self.namespaces:
            try:
                namespace.delete()
            except LabError as exc:
                errors.append(str(exc))
        if errors:
            raise LabError("; ".join(errors))

    def _wire(self) -> None:
        # The veth pairs are created inside the namespaces, so no interface name ever touches
        # the host's own namespace, and two labs never clash.
        self.client.ip(f"link add eth0 type veth peer name ens6 netns {self.proxy.name}\n")
        self.server.ip(f"link add eth0 type veth peer name ens7 netns {self.proxy.name}\n")
        self.client.ip(
            _host_batch("eth0", CLIENT_V4, CLIENT_V6, PROXY_CLIENT_SIDE_V4, PROXY_CLIENT_SIDE_V6)
        )
        self.server.ip(
            _host_batch("eth0", SERVER_V4, SERVER_V6, PROXY_SERVER_SIDE_V4, PROXY_SERVER_SIDE_V6)
        )
        self.proxy.ip(
            "\n".join(
                [
                    "link set lo up",
                    "link set ens6 up",
                    "link set ens7 up",
                    f"addr add {PROXY_CLIENT_SIDE_V4}/24 dev ens6",
                    f"addr add {PROXY_CLIENT_SIDE_V6}/64 dev ens6 nodad",
                    f"addr add {PROXY_SERVER_SIDE_V4}/24 dev ens7",
                    f"addr add {PROXY_SERVER_SIDE_V6}/64 dev ens7 nodad",
                    "",
                ]
            )
        )
        self.proxy.sysctl(
            {
                "net.ipv4.ip_forward": 1,
                "net.ipv6.conf.all.forwarding": 1,
                "net.ipv4.conf.all.rp_filter": 0,
                "net.ipv4.conf.default.rp_filter": 0,
            }
        )

    def install_tproxy(self, tproxy: TproxySetup) -> None:
        """Put ``tproxy``'s rules on the proxy host, replacing any the lab had."""
        self.remove_tproxy()
        self.proxy.run(["iptables-restore"], input=tproxy.iptables_restore(4))
        self.proxy.run(["ip6tables-restore"], input=tproxy.iptables_restore(6))
        self.proxy.ip(tproxy.ip_batch(4))
        self.proxy.ip(tproxy.ip_batch(6), ipv6=True)
        self.tproxy = tproxy

    def remove_tproxy(self) -> None:
        """Take the TPROXY rules and policy routing off: the proxy host is a plain router."""
        if self.tproxy is None:
            return
        empty = "*mangle\nCOMMIT\n"
        self.proxy.run(["iptables-restore"], input=empty)
        self.proxy.run(["ip6tables-restore"], input=empty)
        self.proxy.ip(self.tproxy.ip_unbatch(4))
        self.proxy.ip(self.tproxy.ip_unbatch(6), ipv6=True)
        self.tproxy = None


def kept_labs() -> list[str]:
    """Tags of the labs ``Lab.kept()`` made that are still up, oldest name first.

    The namespace names are the whole record: a lab is a tag with any of its three
    namespaces still present, so nothing outside the namespaces has to be kept in step.
    """
    try:
        names = os.listdir(NETNS_DIR)
    except FileNotFoundError:
        return []
    tags = {
        name.rsplit("-", 1)[0]
        for name in names
        if name.startswith(f"{_KEPT_PREFIX}-") and name.rsplit("-", 1)[-1] in _ROLES
    }
    return sorted(tags)


def sweep_stale_labs() -> list[str]:
    """Delete namespaces of owned labs whose process is gone; return their names."""
    swept: list[str] = []
    try:
        names = os.listdir(NETNS_DIR)
    except FileNotFoundError:
        return swept
    for name in names:
        pid = _owner_pid(name)
        if pid is not None and not _alive(pid):
            Namespace(name).delete()
            swept.append(name)
    return swept


def _owner_pid(name: str) -> int | None:
    if not name.startswith(_OWNED_PREFIX) or name.startswith(_KEPT_PREFIX):
        return None
    digits = name[len(_OWNED_PREFIX) :].split("-", 1)[0]
    return int(digits) if digits.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
