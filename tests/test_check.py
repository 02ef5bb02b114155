"""``uproxy check`` in a lab's namespaces: with the set-up, without it, and half-way."""

from __future__ import annotations

import pytest
from cli_tools import LISTEN_BOTH, NO_CAPABILITIES, run_uproxy

from uproxy_netns import Lab

pytestmark = pytest.mark.lab


def test_a_proxy_host_with_the_set_up_passes(lab: Lab) -> None:
    done = run_uproxy("check", *LISTEN_BOTH, namespace=lab.proxy)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "MISS" not in done.stdout
    assert "ok    a TPROXY rule delivers to [::1]:9091" in done.stdout
    assert done.stdout.rstrip().endswith("all 11 checks passed")


def test_a_plain_router_misses_the_set_up_until_uproxy_rules_applies_it(plain_lab: Lab) -> None:
    proxy = plain_lab.proxy
    done = run_uproxy("check", *LISTEN_BOTH, namespace=proxy)
    assert done.returncode == 1
    lines = done.stdout.splitlines()
    for miss, fix in [
        ("ip rule fwmark 1 lookup 100 (IPv4)", "ip rule add fwmark 1 lookup 100"),
        ("ip -6 route local ::/0 dev lo table 100 (IPv6)", "ip -6 route add local ::/0 dev lo"),
        ("a TPROXY rule delivers to 127.0.0.1:9091", "uproxy rules --listen 127.0.0.1:9091"),
    ]:
        assert f"MISS  {miss}" in lines, done.stdout
        assert any(line.startswith(f"      fix: {fix}") for line in lines), done.stdout
    assert "ok    forwarding is on (net.ipv4.ip_forward)" in lines
    assert lines[-1] == "6 of 11 checks missed"

    assert run_uproxy("rules", *LISTEN_BOTH, "--apply", namespace=proxy).returncode == 0
    done = run_uproxy("check", *LISTEN_BOTH, namespace=proxy)
    assert done.returncode == 0, done.stdout

    # A listener the rules do not deliver to is a miss, whatever else is in place.
    done = run_uproxy("check", "--listen", "127.0.0.1:9999", namespace=proxy)
    assert done.returncode == 1
    assert "MISS  a TPROXY rule delivers to 127.0.0.1:9999" in done.stdout.splitlines()


def test_strict_reverse_path_filtering_and_no_forwarding_are_misses(plain_lab: Lab) -> None:
    plain_lab.proxy.sysctl({"net.ipv4.conf.ens6.rp_filter": 1})
    done = run_uproxy("check", namespace=plain_lab.proxy)
    assert done.returncode == 1
    assert "MISS  reverse-path filter is not strict on ens6, ens7" in done.stdout
    assert "      fix: sysctl -w net.ipv4.conf.ens6.rp_filter=2" in done.stdout
    # The client host forwards nothing.
    done = run_uproxy("check", namespace=plain_lab.client)
    assert done.returncode == 1
    assert "MISS  forwarding is on (net.ipv4.ip_forward)" in done.stdout
    assert "      fix: sysctl -w net.ipv4.ip_forward=1" in done.stdout


def test_bad_check_input_is_one_line_and_exit_2() -> None:
    done = run_uproxy("check", "--listen", "nowhere")
    assert done.returncode == 2
    assert done.stderr.startswith("uproxy: error: Invalid value for '--listen'")
    assert len(done.stderr.strip().splitlines()) == 1


def test_without_cap_net_admin_the_capability_check_misses(lab: Lab) -> None:
    done = run_uproxy("check", *LISTEN_BOTH, namespace=lab.proxy, wrap=NO_CAPABILITIES)
    assert done.returncode == 1
    assert "MISS  IP_TRANSPARENT can be set (CAP_NET_ADMIN)" in done.stdout
    assert "fix: run as root, or give uproxy CAP_NET_ADMIN" in done.stdout
    assert "Traceback" not in done.stderr
