"""``uproxy bench --udp``: every figure measured, for the kernel and uproxy, nothing left."""

from __future__ import annotations

import json
import subprocess

import pytest
from cli_tools import uproxy_argv
from test_bench import BENCH_TIMEOUT_S, assert_left_nothing

pytestmark = [pytest.mark.lab, pytest.mark.usefixtures("lab")]


def test_udp_bench_measures_bulk_packets_round_trips_and_idle_sessions() -> None:
    done = subprocess.run(
        uproxy_argv("bench", "--udp", "--duration", "1", "--idle-flows", "300", "--json"),
        capture_output=True,
        text=True,
        timeout=BENCH_TIMEOUT_S,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    assert [result["relay"] for result in results] == ["kernel", "uproxy", "uproxy-identity"]
    for result in results:
        assert result["bulk_bps"] > 0
        assert result["small_pps"] > 0
        assert 0 < result["rtt_median_us"] <= result["rtt_p99_us"]
        assert_left_nothing(result["lab"], [])
    idle = results[1]["idle"]
    assert idle["flows"] == 300
    assert idle["relayed"] == 300
