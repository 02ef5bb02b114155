"""HAProxy as a transparent proxy behind the lab's TPROXY rules: the reference to compare with.

``bind ... transparent`` lets the TPROXY rule hand it flows for any address, and ``source
0.0.0.0 usesrc clientip`` connects out from the client's own address; a server address of
0.0.0.0 with no port means "the address and port the client asked for". Together that is what
``uproxy serve`` does. Splicing is left at HAProxy's default (off for TCP in 2.6 unless asked
for), so both relay through user space.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from uproxy_trio import format_address

from ._namespace import Namespace
from ._packages import find_command
from ._services import Service, running

# Plenty for 32 concurrent connections. HAProxy wants about two descriptors per connection
# and refuses to start when that exceeds the hard RLIMIT_NOFILE (20000 on a stock container).
_MAX_CONNECTIONS = 8000


def haproxy_config(listen_host: str, listen_port: int, pid_file: Path, threads: int = 1) -> str:
    """One TCP frontend on the TPROXY port, relaying to each flow's original destination."""
    listen = format_address((listen_host, listen_port))
    return f"""\
global
    maxconn {_MAX_CONNECTIONS}
    pidfile {pid_file}
    nbthread {threads}

defaults
    mode tcp
    timeout connect 10s
    timeout client 1h
    timeout server 1h

frontend tproxied
    bind {listen} transparent
    default_backend original_destination

backend original_destination
    source 0.0.0.0 usesrc clientip
    server original 0.0.0.0
"""


@contextmanager
def running_haproxy(
    namespace: Namespace, workdir: Path, listen_host: str, listen_port: int, threads: int = 1
) -> Iterator[Service]:
    """HAProxy in the foreground (``-db``) in ``namespace`` for the block, files in ``workdir``."""
    directory = workdir / "haproxy"
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "haproxy.cfg"
    config.write_text(haproxy_config(listen_host, listen_port, directory / "haproxy.pid", threads))
    argv = [find_command("haproxy") or "haproxy", "-db", "-f", str(config)]
    with running(namespace, "haproxy", argv, directory, ready_port=listen_port) as service:
        yield service
