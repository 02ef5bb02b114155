"""The one place that turns text and socket addresses into ``(host, port)`` pairs.

Transparent proxying only works with literal IP addresses (the kernel hands us the original
destination as an address, and we bind to the client's), so host names are refused rather than
resolved.
"""

from __future__ import annotations

import ipaddress
import socket

Address = tuple[str, int]
"""An IP literal (IPv4 dotted quad or IPv6 without brackets) and a port."""


def parse_address(text: str) -> Address:
    """Parse ``HOST:PORT`` or ``[V6HOST]:PORT``.

    Raises ``ValueError`` with a one-line reason a user can act on.
    """
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{text!r} is not HOST:PORT (IPv6 as [::1]:9091)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if ipaddress_version(host) != 6:
            raise ValueError(f"{text!r}: only an IPv6 address goes in brackets")
    elif text.startswith("["):
        # Bracketed, but not as [V6HOST]:PORT (no port, or no closing bracket): the
        # suggestion below would bracket the brackets.
        raise ValueError(f"{text!r} is not [IPV6]:PORT, as [::1]:9091")
    elif ":" in host:
        raise ValueError(f"{text!r}: write an IPv6 address in brackets, as [{host}]:{port_text}")
    if ipaddress_version(host) is None:
        raise ValueError(f"{text!r}: {host!r} is not an IP address")
    if not port_text.isdigit():
        raise ValueError(f"{text!r}: port {port_text!r} is not a number")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError(f"{text!r}: port {port} is out of range (1-65535)")
    return (str(ipaddress.ip_address(host)), port)


def format_address(address: Address) -> str:
    """Render an address the way ``parse_address`` reads it back."""
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def ipaddress_version(host: str) -> int | None:
    """4 or 6 for an IP literal, ``None`` for anything else."""
    try:
        return ipaddress.ip_address(host).version
    except ValueError:
        return None


def family_of(address: Address) -> socket.AddressFamily:
    return socket.AF_INET6 if ipaddress_version(address[0]) == 6 else socket.AF_INET


def from_sockaddr(sockaddr: tuple[object, ...]) -> Address:
    """Reduce a sockaddr from the kernel to ``(host, port)``.

    An IPv4 client reaching a dual-stack IPv6 socket shows up as ``::ffff:a.b.c.d``; we hand
    back the plain IPv4 form so the outgoing socket is IPv4, as the client's was.
    """
    host, port = str(sockaddr[0]), int(str(sockaddr[1]))
    if len(sockaddr) == 2:
        return (host, port)  # IPv4: the kernel's dotted quad is already canonical
    parsed = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        return (str(parsed.ipv4_mapped), port)
    return (str(parsed), port)
