"""What 100 routes that match nothing cost the proxy, in requests per CPU-second (as root).

    .venv/bin/python tests/perf_routes_cpu.py [ROUNDS]

In a lab of its own, wrk asks nginx for small responses through ``uproxy serve``, once with
no config file and once with ``--config`` holding 100 routes that no flow matches, each of
them naming every dimension (transport, client, server, port range) and missing on the
client only, so that a flow pays for the whole match; each route has an interceptor, which
the flows never meet. Both run at ``--log-level warning``, as ``uproxy bench`` runs uproxy, so
that nothing else hides the cost. The proxy's CPU time comes from /proc/PID/stat, since the
wall-clock rate on a shared host swings by more than the difference sought. The two take
turns, ROUNDS times (default 3), each turn in a fresh lab; prints each turn, the totals, and
the ratio routes / no config for new connections (one flow per request, where the match is
paid) and kept-alive requests (where it is not).
"""

from __future__ import annotations

import os
import sys
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from uproxy_netns._bench import HTTP_PORT, SYN_RULES
from uproxy_netns._lab import SERVER_V4, Lab
from uproxy_netns._nginx import running_nginx
from uproxy_netns._services import kill_everything_in, running
from uproxy_netns._wrk import HttpResult, measure_http

ROUTES = 100
DURATION_S = 3
CONNECTIONS = 32
THREADS = 2


def routes_that_match_nothing() -> str:
    """The lab's client is 192.0.2.2: every route names a client in 203.0.113.0/24."""
    tables = [
        f'[[routes]]\nname = "miss-{i}"\ntransport = "tcp"\nclient = "203.0.113.{i}"\n'
        f'server = "198.51.100.0/24"\nport = "9000-9099"\n'
        'interceptors = ["uproxy_netns.interceptors:identity"]\n'
        for i in range(ROUTES)
    ]
    return "\n".join(tables)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Tally:
    requests: int = 0
    cpu_s: float = 0.0

    @property
    def per_cpu_second(self) -> float:
        return self.requests / self.cpu_s


def one_turn(workdir: Path, extra: list[str]) -> list[tuple[int, HttpResult, float]]:
    """A fresh lab, nginx and proxy (so no client port of an earlier turn is in TIME_WAIT
    anywhere), then new connections and kept-alive requests: (keep, wrk's result, CPU s)."""
    measured = []
    with ExitStack() as stack:
        lab = stack.enter_context(Lab.owned(tproxy=SYN_RULES))
        stack.callback(kill_everything_in, lab.namespaces)
        stack.enter_context(running_nginx(lab.server, workdir, SERVER_V4, HTTP_PORT))
        argv = [sys.executable, "-m", "uproxy_cli", "serve", "--listen", "127.0.0.1:9091"]
        argv += ["--log-level", "warning", *extra]
        proxy = stack.enter_context(running(lab.proxy, "uproxy", argv, workdir, ready_port=9091))
        url = f"http://{SERVER_V4}:{HTTP_PORT}/"
        measure_http(lab.client, url, 1, CONNECTIONS, THREADS, keep_alive=True)  # warm-up
        for keep in (0, 1):
            before = cpu_seconds(proxy.pid)
            result = measure_http(
                lab.client, url, DURATION_S, CONNECTIONS, THREADS, keep_alive=bool(keep)
            )
            used = cpu_seconds(proxy.pid) - before
            assert result.errors == 0, result
            measured.append((keep, result, used))
    return measured


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    tallies = {(variant, keep): Tally() for variant in ("none", "routes") for keep in (0, 1)}
    with tempfile.TemporaryDirectory() as temp:
        workdir = Path(temp)
        config = workdir / "routes.toml"
        config.write_text(routes_that_match_nothing())
        for turn in range(rounds):
            for variant, extra in (("none", []), ("routes", ["--config", str(config)])):
                for keep, result, used in one_turn(workdir / f"{variant}-{turn}", extra):
                    tally = tallies[(variant, keep)]
                    tally.requests += result.requests
                    tally.cpu_s += used
                    kind = "keep-alive" if keep else "new-conn"
                    print(
                        f"round {turn + 1} {variant:6} {kind:10} {result.requests_per_s:8.0f}"
                        f" req/s {result.requests / used:8.0f} req per CPU-s",
                        flush=True,
                    )
    for keep in (0, 1):
        name = "keep-alive" if keep else "new-conn"
        none, routes = tallies[("none", keep)], tallies[("routes", keep)]
        print(
            f"{name:10} no config {none.per_cpu_second:8.0f} req/CPU-s"
            f"   {ROUTES} routes {routes.per_cpu_second:8.0f} req/CPU-s"
            f"   ratio {routes.per_cpu_second / none.per_cpu_second:.3f}"
        )


if __name__ == "__main__":
    main()
