"""``uproxy bench --udp``: every figure measured, for the kernel and uproxy, nothing left."""

from __future__ import annotations

import json

import pytest
from cli_tools import run_uproxy
from test_bench import BENCH_TIMEOUT_S, assert_left_nothing

pytestmark = [pytest.mark.lab, pytest.mark.usefixtures("lab")]


def test_udp_bench_measures_bulk_packets_round_trips_and_idle_sessions() -> None:
    bench = ["bench", "--udp", "--relay", "kernel", "--relay", "uproxy"]
    done = run_uproxy(
        *bench, "--duration", "1", "--idle-flows", "300", "--json", timeout=BENCH_TIMEOUT_S
    )
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    assert [result["relay"] for result in results] == ["kernel", "uproxy"]
    for result in results:
        assert result["bulk_bps"] > 0
        assert result["small_pps"] > 0
        assert 0 < result["rtt_median_us"] <= result["rtt_p99_us"]
        assert_left_nothing(result["lab"], [])
    idle = results[1]["idle"]
    assert idle["flows"] == 300
    assert idle["relayed"] == 300


def test_udp_bench_refuses_a_relay_without_udp() -> None:
    done = run_uproxy("bench", "--udp", "--relay", "haproxy", timeout=30)
    assert done.returncode == 2
    assert "haproxy: no UDP" in done.stderr
    assert "Traceback" not in done.stderr
