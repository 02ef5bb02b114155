"""The bench's reading of wrk and iperf3, and its table, on fixed inputs (no root needed)."""

from __future__ import annotations

import json

import pytest

from uproxy_cli._bench_report import format_report, report_as_json
from uproxy_netns import (
    BenchReport,
    BenchSettings,
    HttpResult,
    IdleResult,
    LabError,
    Relay,
    RelayResult,
)
from uproxy_netns._iperf import parse_iperf_json
from uproxy_netns._wrk import parse_wrk_output

WRK_WITH_ERRORS = """\
Running 1s test @ http://198.51.100.2:9090/
  2 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     3.70ms    1.73ms  12.19ms   73.49%
  15928 requests in 2.01s, 2.19MB read
  Socket errors: connect 3, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:   7907.91
Transfer/sec:      1.09MB
"""


def test_wrk_errors_add_up_socket_errors_and_bad_responses() -> None:
    assert parse_wrk_output(WRK_WITH_ERRORS) == HttpResult(7907.91, 15928, 10)


def test_wrk_output_without_a_rate_is_an_error() -> None:
    with pytest.raises(LabError, match="wrk printed no request rate"):
        parse_wrk_output("unable to connect to 198.51.100.2:9090 Connection refused\n")


def test_iperf_reports_the_received_rate_or_its_error() -> None:
    report = {"end": {"sum_received": {"bits_per_second": 2.5e9}}}
    assert parse_iperf_json(json.dumps(report)) == 2.5e9
    with pytest.raises(LabError, match="iperf3 failed: unable to connect"):
        parse_iperf_json(json.dumps({"error": "unable to connect to server"}))


def result(relay: Relay, scale: float, idle: IdleResult | None = None) -> RelayResult:
    return RelayResult(
        relay,
        f"{relay} rules",
        client_to_server_bps=10e9 * scale,
        server_to_client_bps=8e9 * scale,
        keep_alive=HttpResult(40000 * scale, 1, 0),
        new_connection=HttpResult(8000 * scale, 1, 0),
        idle=idle,
        lab="upx1-abcd",
        pids=(),
    )


def row_of(lines: list[str], start: str) -> list[str]:
    return next(line for line in lines if line.startswith(start)).split()


def test_table_shows_figures_ratios_idle_memory_and_rules() -> None:
    idle = IdleResult(flows=1000, rss_before_kib=30000, rss_after_kib=40000, relayed=1000)
    report = BenchReport(
        BenchSettings(
            relays=(Relay.KERNEL, Relay.HAPROXY, Relay.UPROXY, Relay.UPROXY_DEFAULT_LOGGING)
        ),
        results=(
            result(Relay.KERNEL, 1.0),
            result(Relay.HAPROXY, 0.5),
            result(Relay.UPROXY, 0.25, idle),
            result(Relay.UPROXY_DEFAULT_LOGGING, 0.2),
        ),
    )
    text = format_report(report)
    assert "uproxy at --log-level warning, uproxy-default-logging at serve's default" in text
    lines = text.splitlines()[1:]  # below the title, which starts "uproxy bench: "
    figures = ["2.50", "2.00", "10000", "2000", "10.00"]
    assert row_of(lines, "uproxy ") == ["uproxy", *figures, "uproxy", "rules"]
    assert row_of(lines, "uproxy / kernel")[3:] == ["0.25"] * 4
    assert row_of(lines, "uproxy / haproxy")[3:] == ["0.50"] * 4
    # uproxy at serve's default log level: a row of its own, ratios of its own, no idle figure.
    logging_figures = ["2.00", "1.60", "8000", "1600", "-"]
    assert row_of(lines, "uproxy-default-logging ") == [
        "uproxy-default-logging",
        *logging_figures,
        "uproxy-default-logging",
        "rules",
    ]
    assert row_of(lines, "uproxy-default-logging / kernel")[3:] == ["0.20"] * 4
    assert row_of(lines, "uproxy-default-logging / haproxy")[3:] == ["0.40"] * 4
    assert "30000 -> 40000 KiB (10.00 KiB per flow); 1000/1000 then relayed" in text
    assert "idle flows, uproxy-default-logging" not in text
    assert "wrk errors: none" in text
    results = report_as_json(report)["results"]
    assert results["uproxy"]["ratios"]["haproxy"]["new_connection"] == pytest.approx(0.5)
    logged = results["uproxy-default-logging"]
    assert logged["ratios"]["haproxy"]["new_connection"] == pytest.approx(0.4)
    assert logged["idle"] is None
