"""What an operator sees of UDP sessions: their metrics and their access-log lines."""

from __future__ import annotations

from pathlib import Path

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


async def test_udp_with_workers_and_from_the_config_file(
    lab: Lab, cli_proxy: CliProxy, tmp_path: Path
) -> None:
    """``udp_listen`` and the UDP limits read from the config file; two workers share the
    UDP listener (SO_REUSEPORT), and every session is served by one of them."""
    config = tmp_path / "uproxy.toml"
    config.write_text(
        'udp_listen = ["127.0.0.1:9091", "[::1]:9091"]\nudp_idle_timeout = 30.0\n'
        "max_udp_sessions = 1000\n"
    )
    cli_proxy.start("--config", str(config), "--workers", "2")
    cli_proxy.wait_for_log("2 workers ready")
    server = (SERVER_V4, UDP_PORT)
    async with echo_server(lab, SERVER_V4):
        clients = [udp_socket(lab.client, CLIENT_V4) for _ in range(20)]
        try:
            for index, client in enumerate(clients):
                data = b"%d" % index
                with trio.fail_after(10):
                    while True:  # the workers' UDP listeners may still be coming up
                        with trio.move_on_after(0.2):
                            assert (await exchange(client, data, server))[0] == data
                            break
        finally:
            for client in clients:
                client.close()
    assert cli_proxy.stop() == 0, cli_proxy.log
    closes = [line for line in cli_proxy.log.splitlines() if "transport=udp" in line]
    assert len(closes) == 20
    assert any("worker 1/2" in line for line in closes)
    assert any("worker 2/2" in line for line in closes)
