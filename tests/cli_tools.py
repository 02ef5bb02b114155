"""The ``uproxy`` command as a user runs it: the installed script, in a namespace or not.

Every test that runs the command goes through these, so the way it is started, the addresses
the lab's rules deliver to and the privileges it is denied are written once.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from uproxy_netns import Namespace

# Where the lab's TPROXY rules deliver, so where ``uproxy serve`` listens in the lab.
PROXY_PORT = 9091
PROXY_LISTEN_ADDRESSES = (f"127.0.0.1:{PROXY_PORT}", f"[::1]:{PROXY_PORT}")

# A command prefix that leaves the command no capability at all, root or not.
NO_CAPABILITIES = ("setpriv", "--inh-caps=-all", "--bounding-set=-all", "--")

# Long enough for a command that builds a lab; a hung command fails the test instead.
COMMAND_TIMEOUT_S = 120


def listen_args(addresses: Sequence[str]) -> list[str]:
    """``--listen A --listen B ...``, as ``uproxy serve``, ``rules`` and ``check`` take them."""
    return [arg for address in addresses for arg in ("--listen", address)]


# Both of the lab's listeners, for commands that must agree with ``uproxy serve``.
LISTEN_BOTH = listen_args(PROXY_LISTEN_ADDRESSES)


def uproxy_command() -> list[str]:
    """The installed console script, next to the interpreter running the tests."""
    script = Path(sys.executable).parent / "uproxy"
    return [str(script)] if script.exists() else [sys.executable, "-m", "uproxy_cli"]


def uproxy_argv(
    *args: str, namespace: Namespace | None = None, wrap: Sequence[str] = ()
) -> list[str]:
    """``uproxy ARGS``, behind the ``wrap`` prefix (``setpriv ...``), inside ``namespace``."""
    argv = [*wrap, *uproxy_command(), *args]
    return namespace.exec_argv(argv) if namespace is not None else argv


def run_uproxy(
    *args: str,
    namespace: Namespace | None = None,
    wrap: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    timeout: float = COMMAND_TIMEOUT_S,
) -> subprocess.CompletedProcess[str]:
    """Run ``uproxy ARGS`` to its end; its output is text in ``stdout`` and ``stderr``."""
    return subprocess.run(
        uproxy_argv(*args, namespace=namespace, wrap=wrap),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=env,
    )
