"""Dropping root after the listeners are bound, keeping only what transparent sockets need.

Every outgoing connection binds to the client's address, so CAP_NET_ADMIN is needed for the
proxy's whole life, not only at start: we keep exactly that capability (through setuid, with
PR_SET_KEEPCAPS) and give up everything else root had.
"""

from __future__ import annotations

import ctypes
import grp
import os
import pwd
from dataclasses import dataclass

# <linux/prctl.h> and <linux/capability.h>
PR_SET_KEEPCAPS = 8
CAP_NET_ADMIN = 12
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


@dataclass(frozen=True, slots=True)
class Identity:
    user: str
    uid: int
    gid: int


def resolve_identity(user: str, group: str | None) -> Identity:
    """Look the names up before anything is bound; ``ValueError`` says which one is unknown."""
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise ValueError(f"no such user {user!r}") from None
    gid = entry.pw_gid
    if group is not None:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise ValueError(f"no such group {group!r}") from None
    return Identity(user, entry.pw_uid, gid)


def drop_to(identity: Identity) -> None:
    """Become ``identity`` with CAP_NET_ADMIN as the only capability left."""
    libc = ctypes.CDLL(None, use_errno=True)
    _check(libc.prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0), "prctl(PR_SET_KEEPCAPS)")
    os.setgroups([])
    os.setgid(identity.gid)
    os.setuid(identity.uid)
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    data[0].effective = data[0].permitted = 1 << CAP_NET_ADMIN
    _check(libc.capset(ctypes.byref(header), data), "capset")
    _check(libc.prctl(PR_SET_KEEPCAPS, 0, 0, 0, 0), "prctl(PR_SET_KEEPCAPS)")


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
