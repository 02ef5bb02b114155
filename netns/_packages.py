"""Debian packages the bench drives, installed with apt-get when their command is missing.

Only Debian's own packages are used, so nothing is fetched from anywhere the machine's apt
sources do not already trust.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from ._namespace import LabError, run

# The command each package provides, which is how we tell whether it is installed.
BENCH_PACKAGES: Mapping[str, str] = {
    "iperf3": "iperf3",
    "wrk": "wrk",
    "nginx": "nginx",
    "haproxy": "haproxy",
}

# Daemons live in sbin, which a non-login root shell may lack on its PATH.
_SBIN_DIRS = ("/usr/sbin", "/sbin")

# No debconf question may wait for an answer nobody is there to give.
_NONINTERACTIVE = ("env", "DEBIAN_FRONTEND=noninteractive")
# Two benches started at once on a fresh machine both install: the second waits for the first
# one's dpkg lock instead of failing at once.
_WAIT_FOR_LOCK = ("-o", "DPkg::Lock::Timeout=300")
POLICY_RC_D = Path("/usr/sbin/policy-rc.d")


def find_command(command: str) -> str | None:
    """The full path of ``command``, looking in sbin too."""
    found = shutil.which(command)
    if found is not None:
        return found
    for directory in _SBIN_DIRS:
        candidate = os.path.join(directory, command)
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def missing_packages(packages: Mapping[str, str]) -> list[str]:
    """The packages whose command is not on this machine, in the mapping's order."""
    return [package for package, command in packages.items() if find_command(command) is None]


def ensure_packages(packages: Mapping[str, str] = BENCH_PACKAGES) -> list[str]:
    """Install the missing ``packages`` (``apt-get update`` once first); return what was installed.

    Raises ``LabError`` if apt-get is unavailable or fails.
    """
    missing = missing_packages(packages)
    if not missing:
        return []
    if os.geteuid() != 0:
        raise LabError(f"missing {', '.join(missing)}; run as root to install them")
    if find_command("apt-get") is None:
        raise LabError(f"missing {', '.join(missing)} and there is no apt-get to install them")
    run(["apt-get", *_WAIT_FOR_LOCK, "update", "-qq"])
    with _no_service_starts():
        run(
            [
                *_NONINTERACTIVE,
                "apt-get",
                *_WAIT_FOR_LOCK,
                "install",
                "-y",
                "-qq",
                "--no-install-recommends",
                *missing,
            ]
        )
    still_missing = missing_packages(packages)
    if still_missing:
        raise LabError(f"apt-get installed nothing that provides {', '.join(still_missing)}")
    return missing


@contextmanager
def _no_service_starts() -> Iterator[None]:
    """Installing nginx or haproxy must not start the host's own services (nginx on port 80):
    Debian's policy-rc.d refuses every service start while it exists."""
    if POLICY_RC_D.exists():
        yield
        return
    POLICY_RC_D.write_text("#!/bin/sh\nexit 101\n")
    POLICY_RC_D.chmod(0o755)
    try:
        yield
    finally:
        POLICY_RC_D.unlink(missing_ok=True)
