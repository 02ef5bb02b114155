"""nginx as the lab server's small-response HTTP server, confined to a directory of its own.

Debian's nginx has /etc/nginx, /var/log/nginx, /var/lib/nginx and /run/nginx.pid compiled in;
every one of them is overridden here (``-p``, ``-c``, ``-e`` and the paths in the config), so
a bench run leaves the machine's own nginx, running or not, untouched.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from uproxy_trio import format_address

from ._namespace import Namespace
from ._packages import find_command
from ._services import Service, running

# The body of every response: small, so wrk measures per-request cost, not bandwidth.
RESPONSE_BODY = "ok"

# Paths nginx would otherwise take from its build (/var/lib/nginx/...) even when unused.
_TEMP_PATHS = (
    "client_body_temp_path",
    "proxy_temp_path",
    "fastcgi_temp_path",
    "uwsgi_temp_path",
    "scgi_temp_path",
)


def nginx_config(prefix: Path, host: str, port: int) -> str:
    """One worker answering ``RESPONSE_BODY`` to every request on ``host:port``.

    ``keepalive_requests`` is raised from its default of 1000 so that a keep-alive benchmark
    really keeps its connections; ``access_log off`` keeps disk writes out of the figures.
    """
    temp_paths = "\n".join(f"    {name} {prefix / 'tmp' / name};" for name in _TEMP_PATHS)
    listen = format_address((host, port))
    return f"""\
daemon off;
worker_processes 1;
pid {prefix / "nginx.pid"};
error_log {prefix / "error.log"} warn;
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 60s;
    default_type text/plain;
{temp_paths}
    server {{
        listen {listen} backlog=4096;
        location / {{
            return 200 "{RESPONSE_BODY}";
        }}
    }}
}}
"""


@contextmanager
def running_nginx(namespace: Namespace, workdir: Path, host: str, port: int) -> Iterator[Service]:
    """nginx in ``namespace`` on ``host:port`` for the block, all its files under ``workdir``."""
    prefix = workdir / "nginx"
    (prefix / "tmp").mkdir(parents=True, exist_ok=True)
    config = prefix / "nginx.conf"
    config.write_text(nginx_config(prefix, host, port))
    argv = [
        find_command("nginx") or "nginx",
        "-p",
        str(prefix),
        "-c",
        str(config),
        "-e",
        str(prefix / "error.log"),
    ]
    with running(namespace, "nginx", argv, prefix, ready_port=port) as service:
        yield service
