"""``uproxy bench`` run for real with tiny settings: it measures, and leaves nothing behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from cli_tools import run_uproxy, uproxy_argv

from uproxy_netns import Lab, Namespace, Relay
from uproxy_netns._bench import uproxy_log_level
from uproxy_netns._services import kill_everything_in
from uproxy_netns._uproxy import uproxy_serve_argv

# Whole seconds per iperf3 and wrk run, and idle flows: enough to measure, quick to run.
TINY = ["--duration", "1", "--idle-flows", "200"]
BENCH_TIMEOUT_S = 120
ROLES = ("client", "proxy", "server")


def start_bench(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        uproxy_argv("bench", *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(bench: subprocess.Popen[str]) -> dict[str, Any]:
    stdout, stderr = bench.communicate(timeout=BENCH_TIMEOUT_S)
    assert bench.returncode == 0, stderr
    assert "Traceback" not in stderr
    report: dict[str, Any] = json.loads(stdout)
    return report


def assert_left_nothing(lab_tag: str, pids: list[int]) -> None:
    for role in ROLES:
        assert not Namespace(f"{lab_tag}-{role}").exists(), f"{lab_tag}-{role} left behind"
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists(), f"process {pid} left behind"


def assert_measured(figures: dict[str, Any]) -> None:
    assert figures["client_to_server_bps"] > 0
    assert figures["server_to_client_bps"] > 0
    for run in (figures["keep_alive"], figures["new_connection"]):
        assert run["requests"] > 0
        assert run["requests_per_s"] > 0
        assert run["errors"] == 0, run


@pytest.mark.lab
@pytest.mark.usefixtures("lab")
def test_two_benches_at_once_measure_every_relay_and_leave_nothing_behind() -> None:
    # Two at once: their labs, daemons and files must not meet.
    first = start_bench(*TINY, "--relay", "kernel", "--relay", "uproxy", "--json")
    second = start_bench(
        *TINY,
        *("--relay", "uproxy-identity", "--relay", "haproxy"),
        *("--relay", "uproxy-default-logging", "--json"),
    )
    reports = [finish(first), finish(second)]

    assert list(reports[0]["results"]) == ["kernel", "uproxy"]
    # In bench order, whatever order --relay gave.
    assert list(reports[1]["results"]) == ["haproxy", "uproxy-default-logging", "uproxy-identity"]
    labs = [figures["lab"] for report in reports for figures in report["results"].values()]
    assert len(set(labs)) == 5, "each relay of each bench gets a lab of its own"
    for report in reports:
        for figures in report["results"].values():
            assert_measured(figures)
            assert_left_nothing(figures["lab"], figures["pids"])

    kernel = reports[0]["results"]["kernel"]
    assert kernel["rules"] == "none (plain router)"
    assert kernel["idle"] is None
    uproxy = reports[0]["results"]["uproxy"]
    assert "! --syn" not in uproxy["rules"]
    assert "! --syn" in reports[1]["results"]["haproxy"]["rules"]
    for name, report in (("uproxy", reports[0]), ("uproxy-identity", reports[1])):
        idle = report["results"][name]["idle"]
        assert idle["flows"] == 200
        assert idle["relayed"] == 200, "every idle flow must still relay both ways"
        assert idle["rss_after_kib"] > idle["rss_before_kib"]
        assert idle["kib_per_flow"] > 0
    # Each uproxy relay is compared with the baselines its own bench measured, and only
    # those; every figure was measured, so every ratio is a number above zero.
    identity = reports[1]["results"]["uproxy-identity"]
    logged = reports[1]["results"]["uproxy-default-logging"]
    for figures, baseline in ((uproxy, "kernel"), (identity, "haproxy"), (logged, "haproxy")):
        assert list(figures["ratios"]) == [baseline]
        ratios = figures["ratios"][baseline]
        assert set(ratios) == {
            "client_to_server",
            "server_to_client",
            "keep_alive",
            "new_connection",
        }
        assert all(ratio is not None and ratio > 0 for ratio in ratios.values()), ratios
    assert "ratios" not in kernel
    assert "ratios" not in reports[1]["results"]["haproxy"]
    # uproxy at serve's default log level is measured like uproxy, idle flows aside.
    assert logged["idle"] is None
    # ... and it really ran at serve's default, the others at warning, as the header says.
    assert "--log-level" not in logged["command"], logged["command"]
    for figures in (uproxy, identity):
        level = figures["command"].index("--log-level")
        assert figures["command"][level + 1] == "warning", figures["command"]
    assert kernel["command"] == []
    assert "serve" in logged["command"]
    assert "! --syn" not in logged["rules"]


def test_only_uproxy_default_logging_runs_serve_at_its_default_log_level() -> None:
    levels = {relay: uproxy_log_level(relay) for relay in Relay if relay.is_uproxy}
    assert levels == {
        Relay.UPROXY: "warning",
        Relay.UPROXY_DEFAULT_LOGGING: None,
        Relay.UPROXY_IDENTITY: "warning",
    }
    quiet = uproxy_serve_argv("127.0.0.1", 9091, [], log_level="warning")
    assert quiet[quiet.index("--log-level") + 1] == "warning"
    assert "--log-level" not in uproxy_serve_argv("127.0.0.1", 9091, [], log_level=None)


@pytest.mark.lab
@pytest.mark.usefixtures("lab")
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_mid_run_stops_every_daemon_and_deletes_the_lab(signum: int) -> None:
    bench = start_bench("--duration", "5", "--relay", "uproxy")
    assert bench.stderr is not None
    lab_tag, workdir = "", ""
    deadline = time.monotonic() + BENCH_TIMEOUT_S
    for line in bench.stderr:
        if "files in " in line:
            workdir = line.rsplit(" ", 1)[1].strip()
        if " up" in line and "lab " in line:
            lab_tag = line.split("lab ", 1)[1].split(" ", 1)[0]
        if "uproxy: iperf3" in line:
            break
        assert time.monotonic() < deadline
    assert lab_tag
    assert workdir
    daemons = processes_under(workdir)
    assert len(daemons) >= 3, "nginx, iperf3 and uproxy should be running"
    lab_netns = {net_namespace_of(Namespace(f"{lab_tag}-{role}").path) for role in ROLES}
    bench.send_signal(signum)
    _, stderr = bench.communicate(timeout=BENCH_TIMEOUT_S)

    assert bench.returncode == 130
    assert stderr.strip().splitlines()[-1] == "uproxy: error: interrupted"
    assert "Traceback" not in stderr
    assert_left_nothing(lab_tag, daemons)
    assert not Path(workdir).exists()
    # Not even a client the interrupt caught half-spawned lives on in the deleted namespaces.
    assert not processes_in(lab_netns)


def net_namespace_of(path: str) -> str:
    """``net:[INODE]``, as /proc/PID/ns/net reads for a process in that namespace."""
    return f"net:[{os.stat(path).st_ino}]"


def processes_in(net_namespaces: set[str]) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and os.readlink(entry / "ns" / "net") in net_namespaces:
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def processes_under(workdir: str) -> list[int]:
    """Processes whose working directory is in ``workdir``: the bench starts each daemon there."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if cwd.startswith(workdir):
            found.append(int(entry.name))
    return found


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--duration", "0"], "Invalid value for '--duration'"),
        (["--idle-flows", "many"], "Invalid value for '--idle-flows'"),
        (["--relay", "nginx"], "Invalid value for '--relay'"),
    ],
)
def test_bad_bench_options_are_one_line_and_exit_2(args: list[str], message: str) -> None:
    done = run_uproxy("bench", *args)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("uproxy: error: ")
    assert message in lines[0]


@pytest.mark.lab
@pytest.mark.usefixtures("lab")
def test_a_stray_process_in_a_bench_lab_is_killed_before_the_lab_goes() -> None:
    with Lab.owned(tproxy=None) as lab:
        stray = subprocess.Popen(lab.client.exec_argv(["sleep", "600"]))
        try:
            # `ip netns exec` joins the namespace a moment after it starts.
            deadline = time.monotonic() + 10
            while str(stray.pid) not in lab.client.pids():
                assert time.monotonic() < deadline, "the stray never entered the namespace"
                time.sleep(0.02)
            kill_everything_in(lab.namespaces)
            assert stray.wait(timeout=10) == -signal.SIGKILL
        finally:
            stray.kill()
            stray.wait()
