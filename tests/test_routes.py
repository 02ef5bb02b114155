"""Routes without sockets: how their text is read, and which route a flow takes."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import pytest

from uproxy_trio import Direction, Flow, Route, Routes
from uproxy_trio._routes import parse_network, parse_ports

CLIENT = ("192.0.2.2", 40312)
SERVER = ("198.51.100.2", 5432)
CLIENT_V6 = ("2001:db8:1::2", 40312)
SERVER_V6 = ("2001:db8:2::2", 5432)


async def passthrough(
    flow: Flow, direction: Direction, chunks: AsyncIterator[bytes]
) -> AsyncIterator[bytes]:
    async for chunk in chunks:
        yield chunk


def taken(routes: Routes, client: tuple[str, int], server: tuple[str, int]) -> str | None:
    route = routes.match("tcp", client, server)
    return None if route is None else route.name


@pytest.mark.parametrize(
    ("text", "first", "last"),
    [
        ("192.0.2.0/24", 0xC0000200, 0xC00002FF),
        ("192.0.2.7", 0xC0000207, 0xC0000207),
        ("0.0.0.0/0", 0, 0xFFFFFFFF),
        ("2001:db8::/32", 0x20010DB8 << 96, (0x20010DB8 << 96) | ((1 << 96) - 1)),
        ("::/0", 0, (1 << 128) - 1),
    ],
)
def test_a_network_is_a_range_of_integers(text: str, first: int, last: int) -> None:
    network = parse_network(text)
    assert (network.first, network.last) == (first, last)
    assert network.version == (6 if ":" in text else 4)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("192.0.2.7/24", "'192.0.2.7/24' has host bits set (the network is 192.0.2.0/24)"),
        ("192.0.2.0/33", "'192.0.2.0/33' is not a network (192.0.2.0/24, 2001:db8::/32)"),
        ("db.example", "'db.example' is not a network"),
        ("", "'' is not a network"),
    ],
)
def test_a_bad_network_is_one_line_saying_why(text: str, message: str) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        parse_network(text)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (5432, (5432, 5432)),
        ("5432", (5432, 5432)),
        ("6000-6100", (6000, 6100)),
        ("1-65535", (1, 65535)),
    ],
)
def test_a_port_or_a_range(value: int | str, expected: tuple[int, int]) -> None:
    assert parse_ports(value) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("http", "'http' is not a port or FIRST-LAST (5432, 6000-6100)"),
        ("70000", "'70000': port 70000 is out of range (1-65535)"),
        (0, "'0': port 0 is out of range (1-65535)"),
        ("6100-6000", "'6100-6000': the range ends before it starts"),
        ("-5", "'-5' is not a port or FIRST-LAST"),
        (True, "True is not a port or FIRST-LAST"),
    ],
)
def test_a_bad_port_is_one_line_saying_why(value: int | str, message: str) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        parse_ports(value)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"name": "two words"}, "name: 'two words' must be one word"),
        ({"name": ""}, "name: '' must be one word"),
        ({"name": "r", "transport": "sctp"}, "transport: 'sctp' is not one of tcp, udp"),
        ({"name": "r", "client": "192.0.2.1/24"}, "client: '192.0.2.1/24' has host bits set"),
        ({"name": "r", "server": "nowhere"}, "server: 'nowhere' is not a network"),
        ({"name": "r", "port": "99999"}, "port: '99999': port 99999 is out of range"),
        ({"name": "r", "idle_timeout": 0}, "idle_timeout: 0 is not a positive number"),
        ({"name": "r", "connect_timeout": -1}, "connect_timeout: -1 is not a positive number"),
    ],
)
def test_a_route_is_checked_when_it_is_made(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        Route(**fields)  # type: ignore[arg-type]


def test_the_first_route_that_matches_wins_in_table_order() -> None:
    routes = Routes(
        [
            Route("db-from-lab", client="192.0.2.0/24", port=5432),
            Route("db", port=5432),
            Route("everything"),
        ]
    )
    assert taken(routes, CLIENT, SERVER) == "db-from-lab"
    assert taken(routes, ("203.0.113.9", 1), SERVER) == "db"
    assert taken(routes, CLIENT, ("198.51.100.2", 80)) == "everything"
    # The same routes in another order: the catch-all first takes every flow.
    assert taken(Routes(reversed(list(routes))), CLIENT, SERVER) == "everything"


def test_every_condition_of_a_route_must_hold() -> None:
    routes = Routes(
        [
            Route(
                "narrow",
                transport="tcp",
                client="192.0.2.0/24",
                server="198.51.100.0/24",
                port="5000-6000",
            )
        ]
    )
    assert taken(routes, CLIENT, SERVER) == "narrow"
    assert routes.match("udp", CLIENT, SERVER) is None
    assert taken(routes, ("203.0.113.2", 40312), SERVER) is None
    assert taken(routes, CLIENT, ("203.0.113.2", 5432)) is None
    assert taken(routes, CLIENT, ("198.51.100.2", 6001)) is None


@pytest.mark.parametrize(
    ("port", "expected"),
    [(5999, None), (6000, "range"), (6050, "range"), (6100, "range"), (6101, None), (80, "one")],
)
def test_a_port_range_includes_both_ends(port: int, expected: str | None) -> None:
    routes = Routes([Route("range", port="6000-6100"), Route("one", port=80)])
    assert taken(routes, CLIENT, ("198.51.100.2", port)) == expected


@pytest.mark.parametrize(
    ("client", "expected"),
    [
        (("192.0.2.0", 1), "v4"),
        (("192.0.2.255", 1), "v4"),
        (("192.0.3.0", 1), None),
        (("192.0.1.255", 1), None),
        (("2001:db8:1::2", 1), "v6"),
        (("2001:db8:1:0:ffff:ffff:ffff:ffff", 1), "v6"),
        (("2001:db8:1:1::", 1), None),
        (("2001:db8:2::", 1), None),
        # An IPv4 network never holds an IPv6 address, even one that embeds it.
        (("::ffff:192.0.2.2", 1), None),
        (("::c000:202", 1), None),
    ],
)
def test_client_networks_of_both_families(client: tuple[str, int], expected: str | None) -> None:
    routes = Routes([Route("v4", client="192.0.2.0/24"), Route("v6", client="2001:db8:1::/64")])
    assert taken(routes, client, SERVER) == expected


def test_server_networks_nested_and_at_the_ends_of_the_address_space() -> None:
    routes = Routes(
        [
            Route("one-host", server="198.51.100.2"),
            Route("subnet", server="198.51.100.0/24"),
            Route("last-v6", server="ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128"),
            Route("all-v4", server="0.0.0.0/0"),
        ]
    )
    assert taken(routes, CLIENT, ("198.51.100.2", 1)) == "one-host"
    assert taken(routes, CLIENT, ("198.51.100.3", 1)) == "subnet"
    assert taken(routes, CLIENT, ("255.255.255.255", 1)) == "all-v4"
    assert taken(routes, CLIENT, ("0.0.0.0", 1)) == "all-v4"
    assert taken(routes, CLIENT_V6, ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 1)) == "last-v6"
    assert taken(routes, CLIENT_V6, SERVER_V6) is None


def test_a_route_without_a_transport_takes_both_and_one_with_a_transport_only_its_own() -> None:
    routes = Routes([Route("udp-only", transport="udp"), Route("either")])
    assert routes.match("udp", CLIENT, SERVER) == routes[0]
    assert routes.match("tcp", CLIENT, SERVER) == routes[1]


def test_no_routes_match_nothing_and_a_hundred_misses_match_nothing() -> None:
    assert Routes().match("tcp", CLIENT, SERVER) is None
    misses = Routes(
        Route(f"r{i}", client=f"203.0.113.{i}", server="198.51.100.0/24", port="5000-6000")
        for i in range(100)
    )
    assert misses.match("tcp", CLIENT, SERVER) is None
    assert misses.position("tcp", ("203.0.113.42", 1), SERVER) == 42


def test_route_names_are_unique() -> None:
    with pytest.raises(ValueError, match=r"^two routes are named 'db'$"):
        Routes([Route("db", port=5432), Route("db", port=5433)])


def test_a_route_holds_its_interceptors_as_a_tuple() -> None:
    chain = [passthrough]
    route = Route("r", interceptors=chain)
    chain.append(passthrough)  # the caller's list changing later does not change the route
    assert route.interceptors == (passthrough,)
    assert list(Routes([route])) == [route]
