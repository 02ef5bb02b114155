"""UDP sockets for transparent sessions: the listener TPROXY delivers to, the original
destination read from each datagram's control message, and a session's two connected sockets.

A TPROXY'd UDP datagram keeps its destination (the server's address) and is handed to our
listener, whose own address is elsewhere: with ``IP_RECVORIGDSTADDR`` the kernel tells us,
per datagram, where it was going. A session then answers from that address: a socket bound
there with ``IP_TRANSPARENT`` and connected to the client. Connected, that socket is also
what TPROXY finds for the client's later datagrams (its rule first looks for a socket that
already holds the packet's 4-tuple), so they no longer reach the listener at all.
"""

from __future__ import annotations

import errno
import os
import socket
import struct

from ._address import Address, family_of, format_address, from_sockaddr
from ._transparent import transparent_datagram_socket

# <linux/in.h>, <linux/in6.h>: ask for the original destination of each datagram.
IP_RECVORIGDSTADDR = getattr(socket, "IP_RECVORIGDSTADDR", 20)
IPV6_RECVORIGDSTADDR = getattr(socket, "IPV6_RECVORIGDSTADDR", 74)
# The control messages that carry it have the same numbers (IP_ORIGDSTADDR, IPV6_ORIGDSTADDR).
_ORIGDSTADDR = {socket.IPPROTO_IP: IP_RECVORIGDSTADDR, socket.IPPROTO_IPV6: IPV6_RECVORIGDSTADDR}

# Path MTU discovery, set deliberately (<linux/in.h>, <linux/in6.h>). IPv4: never set DF and
# fragment to the interface's MTU, as a router does with a datagram that has no DF: a client's
# 60,000-byte datagram, which reached us in fragments, leaves in fragments, and an ICMP
# "fragmentation needed" never turns into an error on the session. IPv6 routers never
# fragment, so there the sender must fragment to the path MTU it has learnt: "want".
IP_MTU_DISCOVER = getattr(socket, "IP_MTU_DISCOVER", 10)
IP_PMTUDISC_DONT = 0
IPV6_MTU_DISCOVER = getattr(socket, "IPV6_MTU_DISCOVER", 23)
IPV6_PMTUDISC_WANT = 1

# The largest UDP payload (IPv6's 65,527; IPv4's is 65,507) fits, so a datagram is never cut.
MAX_DATAGRAM = 65536

# UDP segmentation offload (<linux/udp.h>): one send hands the kernel a run of datagrams of
# one size (the last may be shorter), and the stack routes, filters and crosses a veth once
# for the run, cutting it into datagrams as late as it can (often at the receiving socket).
SOL_UDP = getattr(socket, "SOL_UDP", 17)
UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)
# At most this many datagrams in one send (the kernel's UDP_MAX_SEGMENTS, 64 before 6.9) ...
MAX_SEGMENTS = 64
# ... and this many bytes, the most one IPv4 packet can carry (IPv6's limit is higher).
MAX_SEGMENTED_BYTES = 65507
_SEGMENT = struct.Struct("=H")
# The path MTU of a connected socket (<linux/in.h>, <linux/in6.h>), and the headers under a
# datagram's payload: a segment must fit one packet on the path, unfragmented.
IP_MTU = getattr(socket, "IP_MTU", 14)
IPV6_MTU = getattr(socket, "IPV6_MTU", 24)
_UDP_IP_HEADERS = {socket.AF_INET: 28, socket.AF_INET6: 48}
# Room for one original-destination control message (a sockaddr_in6 is the larger).
_CMSG_SPACE = socket.CMSG_SPACE(28)
# A listener takes floods of first datagrams, each a new session: a buffer that absorbs a
# burst while sessions are being set up (SO_RCVBUFFORCE: we hold CAP_NET_ADMIN anyway).
LISTENER_RCVBUF = 4 << 20
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
# A session socket's receive buffer (the kernel doubles it for its bookkeeping, and charges
# only what is queued). The default holds about 90 datagrams of 1400 bytes: bulk at under 1%
# loss went from 0.12 of kernel forwarding to 0.39-0.52 with 1 MiB, 0.40-0.61 with 4 MiB.
SESSION_RCVBUF = 4 << 20

_SOCKADDR_IN = struct.Struct("=H")  # sa_family, in host order; the rest is read by offset


class NoOriginalDestination(ValueError):
    """A datagram came without its original destination: not delivered by TPROXY."""


def open_datagram_listener(address: Address, *, reuse_port: bool = False) -> socket.socket:
    """Bind a transparent UDP socket on ``address`` that reports each datagram's original
    destination."""
    family = family_of(address)
    sock = transparent_datagram_socket(family)
    try:
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVORIGDSTADDR, 1)
        else:
            sock.setsockopt(socket.IPPROTO_IP, IP_RECVORIGDSTADDR, 1)
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, LISTENER_RCVBUF)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, LISTENER_RCVBUF)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
        raise OSError(
            exc.errno, f"cannot listen on UDP {format_address(address)}: {reason}"
        ) from exc
    except BaseException:
        sock.close()
        raise
    return sock


def receive_delivered(listener: socket.socket) -> tuple[bytes, Address, Address, bool]:
    """One datagram from ``listener``: ``(data, client, original destination, truncated)``.

    Raises ``BlockingIOError`` when there is none, ``NoOriginalDestination`` for a datagram
    without one (sent to the listener's own address, not delivered by TPROXY).
    """
    data, ancillary, flags, source = listener.recvmsg(MAX_DATAGRAM, _CMSG_SPACE)
    for level, kind, payload in ancillary:
        if _ORIGDSTADDR.get(level) == kind:
            return (
                data,
                from_sockaddr(source),
                parse_sockaddr(payload),
                bool(flags & socket.MSG_TRUNC),
            )
    raise NoOriginalDestination(f"a datagram from {format_address(from_sockaddr(source))}")


def parse_sockaddr(raw: bytes) -> Address:
    """A ``sockaddr_in`` or ``sockaddr_in6`` as the kernel wrote it, as ``(host, port)``."""
    (family,) = _SOCKADDR_IN.unpack_from(raw)
    port = int.from_bytes(raw[2:4], "big")
    if family == socket.AF_INET:
        return (socket.inet_ntop(socket.AF_INET, raw[4:8]), port)
    if family == socket.AF_INET6:
        # As a 4-tuple, as the kernel's own IPv6 addresses come: an IPv4-mapped one is
        # then made plain IPv4.
        return from_sockaddr((socket.inet_ntop(socket.AF_INET6, raw[8:24]), port, 0, 0))
    raise ValueError(f"address family {family} is neither IPv4 nor IPv6")


def open_session_socket(local: Address, peer: Address) -> socket.socket:
    """A transparent UDP socket bound to ``local`` (an address this host need not own) and
    connected to ``peer``, path MTU discovery set as above.

    Between ``bind`` and ``connect`` TPROXY may hand the socket a datagram meant for another
    session (it matches the bound address, and nothing else yet): whoever reads the socket
    checks each datagram's source against ``peer``. Raises ``OSError``; nothing is left open.
    """
    family = family_of(local)
    sock = transparent_datagram_socket(family)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER, IPV6_PMTUDISC_WANT)
        else:
            sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DONT)
        # Room for a burst while the proxy is busy elsewhere (a scheduling hiccup on a shared
        # host, a turn of other sessions): the kernel only charges what is queued.
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, SESSION_RCVBUF)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SESSION_RCVBUF)
        sock.bind(local)
        sock.connect(peer)
    except BaseException:
        sock.close()
        raise
    return sock


def segment_limit(sock: socket.socket) -> int:
    """The largest datagram ``sock`` (connected) can send in a segmented run: one that fits
    the path MTU whole. 0 if the kernel will not say."""
    family = sock.family
    try:
        if family == socket.AF_INET6:
            mtu = sock.getsockopt(socket.IPPROTO_IPV6, IPV6_MTU)
        else:
            mtu = sock.getsockopt(socket.IPPROTO_IP, IP_MTU)
    except OSError:
        return 0
    return max(0, mtu - _UDP_IP_HEADERS.get(family, 48))


def send_segmented(sock: socket.socket, run: bytes | memoryview, segment: int) -> None:
    """Send ``run`` as datagrams of ``segment`` bytes (the last may be shorter) in one call.

    Raises ``OSError`` as ``send`` does; the kernel takes the whole run or none of it.
    """
    sock.sendmsg([run], [(SOL_UDP, UDP_SEGMENT, _SEGMENT.pack(segment))])


# Errors of a connected UDP socket that an ICMP message from its peer's side raised: the peer
# (or the way to it) is gone. ``EMSGSIZE`` is not among them: it only says that the path MTU
# went down, which the kernel has noted already.
PEER_GONE_ERRNOS = frozenset(
    {
        errno.ECONNREFUSED,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.EHOSTDOWN,
        errno.ENETDOWN,
        errno.ENONET,
        errno.EPROTO,
        errno.ECONNRESET,
    }
)
