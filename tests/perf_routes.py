"""What choosing a route costs a flow, without sockets.

    .venv/bin/python tests/perf_routes.py

``Routes.position`` with 100 routes that the flow does not match, in four shapes: routes that
differ by port only; by server network (every route on the flow's port, so the server's
address is looked at); routes that name every dimension and miss on the client only (the
flow pays for all of them); the same over IPv6. Then the last of 100 routes matching, and
no routes at all. Prints microseconds per flow; the best of five runs, since the machine is
shared and noise only ever adds time.
"""

from __future__ import annotations

import timeit

from uproxy_trio import Route, Routes

CALLS = 100_000
COUNT = 100
CLIENT_V4, SERVER_V4 = ("192.0.2.2", 40312), ("198.51.100.2", 5432)
CLIENT_V6, SERVER_V6 = ("2001:db8:1::2", 40312), ("2001:db8:2::2", 5432)


def by_port() -> Routes:
    return Routes(Route(f"r{i}", port=10000 + i) for i in range(COUNT))


def by_server() -> Routes:
    return Routes(Route(f"r{i}", server=f"203.0.113.{i}", port=5432) for i in range(COUNT))


def every_dimension(version: int) -> Routes:
    def networks(i: int) -> tuple[str, str]:
        if version == 4:
            return f"203.0.113.{i}/32", "198.51.100.0/24"
        return f"2001:db8:3::{i:x}/128", "2001:db8:2::/48"

    return Routes(
        Route(
            f"r{i}",
            transport="tcp",
            client=networks(i)[0],
            server=networks(i)[1],
            port="5000-6000",
        )
        for i in range(COUNT)
    )


def last_matches() -> Routes:
    return Routes([*list(by_port())[:-1], Route("last", port=5432)])


def per_call_us(routes: Routes, client: tuple[str, int], server: tuple[str, int]) -> float:
    position = routes.position
    runs = timeit.repeat(lambda: position("tcp", client, server), number=CALLS, repeat=5)
    return min(runs) / CALLS * 1e6


def main() -> None:
    shapes = [
        ("100 routes, missed on the port", by_port(), CLIENT_V4, SERVER_V4, None),
        ("100 routes, missed on the server", by_server(), CLIENT_V4, SERVER_V4, None),
        ("100 routes, missed on the client only", every_dimension(4), CLIENT_V4, SERVER_V4, None),
        ("the same, IPv6", every_dimension(6), CLIENT_V6, SERVER_V6, None),
        ("100 routes, the last one matches", last_matches(), CLIENT_V4, SERVER_V4, COUNT - 1),
        ("no routes", Routes(), CLIENT_V4, SERVER_V4, None),
    ]
    for title, routes, client, server, expected in shapes:
        assert routes.position("tcp", client, server) == expected, title
        print(f"{title:40} {per_call_us(routes, client, server):5.2f} us per flow")


if __name__ == "__main__":
    main()
