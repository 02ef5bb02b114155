"""What an operator sees of UDP sessions: their metrics and their access-log lines."""

from __future__ import annotations

import pytest
import trio
from lab_tools import CliProxy, eventually_async
from test_observability import METRICS_PORT, scrape, value
from udp_tools import UDP_LISTEN_ARGS, UDP_PORT, echo_server, exchange, udp_socket

from uproxy_netns import CLIENT_V4, SERVER_V4, Lab

pytestmark = pytest.mark.lab


async def test_udp_metrics_count_sessions_datagrams_and_drops(
    lab: Lab, cli_proxy: CliProxy
) -> None:
    cli_proxy.start(
        "--metrics",
        f"127.0.0.1:{METRICS_PORT}",
        *UDP_LISTEN_ARGS,
        "--max-udp-sessions",
        "1",
        "--udp-idle-timeout",
        "30",
    )
    server = (SERVER_V4, UDP_PORT)
    async with echo_server(lab, SERVER_V4):
        with udp_socket(lab.client, CLIENT_V4) as inside, udp_socket(lab.client, CLIENT_V4) as over:
            for data in (b"a", b"bb", b"ccc"):
                assert (await exchange(inside, data, server))[0] == data
            with pytest.raises(trio.TooSlowError):
                await exchange(over, b"no room", server, timeout=0.3)

            async def sampled() -> bool:
                text = await scrape(lab)
                return value(text, 'uproxy_udp_dropped_total{reason="session_limit"}') == 1

            await eventually_async(sampled)
            text = await scrape(lab)
    assert value(text, "uproxy_udp_sessions_total") == 1
    assert value(text, "uproxy_udp_sessions_active") == 1
    assert value(text, 'uproxy_datagrams_total{direction="client_to_server"}') == 3
    assert value(text, 'uproxy_datagrams_total{direction="server_to_client"}') == 3
    assert value(text, 'uproxy_udp_dropped_total{reason="too_big"}') == 0
    assert value(text, "uproxy_flows_total") == 0  # TCP's: no TCP flow here
    assert cli_proxy.stop() == 0
    closes = [line for line in cli_proxy.log.splitlines() if " close reason=" in line]
    (close,) = closes
    assert close.endswith(" transport=udp")
    assert "client_to_server=6 server_to_client=6" in close
