"""``uproxy check`` in a lab's namespaces: with the set-up, without it, and half-way."""

from __future__ import annotations

import subprocess

import pytest
from lab_tools import uproxy_command

from uproxy_netns import Lab, Namespace

pytestmark = pytest.mark.lab

LISTEN_BOTH = ["--listen", "127.0.0.1:9091", "--listen", "[::1]:9091"]


def uproxy_in(namespace: Namespace, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        namespace.exec_argv([*uproxy_command(), *args]),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_proxy_host_with_the_set_up_passes(lab: Lab) -> None:
    done = uproxy_in(lab.proxy, "check", *LISTEN_BOTH)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "MISS" not in done.stdout
    assert "ok    a TPROXY rule delivers to [::1]:9091" in done.stdout
    assert "ok    interface ens6, named by the TPROXY rules, is up" in done.stdout
    assert "ok    interface ens7, named by the TPROXY rules, is up" in done.stdout
    assert done.stdout.rstrip().endswith("all 13 checks passed")


def test_a_plain_router_misses_the_set_up_until_uproxy_rules_applies_it(plain_lab: Lab) -> None:
    proxy = plain_lab.proxy
    done = uproxy_in(proxy, "check", *LISTEN_BOTH)
    assert done.returncode == 1
    lines = done.stdout.splitlines()
    for miss, fix in [
        ("ip rule fwmark 1 lookup 100 (IPv4)", "ip rule add fwmark 1 lookup 100"),
        ("ip -6 route local ::/0 dev lo table 100 (IPv6)", "ip -6 route add local ::/0 dev lo"),
        (
            "a TPROXY rule delivers to 127.0.0.1:9091",
            "uproxy rules --in-interface IFACE --out-interface IFACE --port PORT "
            "--listen 127.0.0.1:9091 --listen [::1]:9091 --apply",
        ),
    ]:
        assert f"MISS  {miss}" in lines, done.stdout
        assert any(line.startswith(f"      fix: {fix}") for line in lines), done.stdout
    assert "ok    forwarding is on (net.ipv4.ip_forward)" in lines
    assert lines[-1] == "6 of 11 checks missed"

    rules = ["rules", "--in-interface", "ens6", "--out-interface", "ens7", "--port", "9090"]
    assert uproxy_in(proxy, *rules, *LISTEN_BOTH, "--apply").returncode == 0
    done = uproxy_in(proxy, "check", *LISTEN_BOTH)
    assert done.returncode == 0, done.stdout

    # A listener the rules do not deliver to is a miss, whatever else is in place.
    done = uproxy_in(proxy, "check", "--listen", "127.0.0.1:9999")
    assert done.returncode == 1
    assert "MISS  a TPROXY rule delivers to 127.0.0.1:9999" in done.stdout.splitlines()


@pytest.mark.parametrize("backend", ["nft", "iptables"])
def test_interfaces_the_rules_name_must_exist_and_be_up(plain_lab: Lab, backend: str) -> None:
    """Rules for an interface this host lacks, or one that is down, intercept nothing: that
    is a miss, not 'all checks passed'."""
    proxy = plain_lab.proxy
    rules = ["rules", "-b", backend, "--in-interface", "nosuch0", "--out-interface", "ens7"]
    done = uproxy_in(proxy, *rules, "--port", "9090", *LISTEN_BOTH, "--apply")
    assert done.returncode == 0, done.stderr
    proxy.ip("link set ens7 down\n")
    done = uproxy_in(proxy, "check", *LISTEN_BOTH)
    assert done.returncode == 1
    lines = done.stdout.splitlines()
    missing = lines.index("MISS  interface nosuch0, named by the TPROXY rules, is up")
    assert lines[missing + 1] == "      (no such interface here)"
    assert lines[missing + 2].startswith("      fix: apply rules that name this host's interfaces")
    down = lines.index("MISS  interface ens7, named by the TPROXY rules, is up")
    assert lines[down + 1 : down + 3] == ["      (it is down)", "      fix: ip link set ens7 up"]
    assert lines[-1] == "2 of 13 checks missed"
    # The rp_filter check looks at the interfaces the rules name.
    assert "ok    reverse-path filter is not strict on ens7" in lines


def test_strict_reverse_path_filtering_and_no_forwarding_are_misses(plain_lab: Lab) -> None:
    plain_lab.proxy.sysctl({"net.ipv4.conf.ens6.rp_filter": 1})
    done = uproxy_in(plain_lab.proxy, "check")
    assert done.returncode == 1
    assert "MISS  reverse-path filter is not strict on ens6, ens7" in done.stdout
    assert "      fix: sysctl -w net.ipv4.conf.ens6.rp_filter=2" in done.stdout
    # The client host forwards nothing.
    done = uproxy_in(plain_lab.client, "check")
    assert done.returncode == 1
    assert "MISS  forwarding is on (net.ipv4.ip_forward)" in done.stdout
    assert "      fix: sysctl -w net.ipv4.ip_forward=1" in done.stdout


def test_bad_check_input_is_one_line_and_exit_2() -> None:
    done = subprocess.run(
        [*uproxy_command(), "check", "--listen", "nowhere"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.startswith("uproxy: error: Invalid value for '--listen'")
    assert len(done.stderr.strip().splitlines()) == 1


def test_without_cap_net_admin_the_capability_check_misses(lab: Lab) -> None:
    no_capabilities = ["setpriv", "--inh-caps=-all", "--bounding-set=-all", "--"]
    done = subprocess.run(
        lab.proxy.exec_argv([*no_capabilities, *uproxy_command(), "check", *LISTEN_BOTH]),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert "MISS  IP_TRANSPARENT can be set (CAP_NET_ADMIN)" in done.stdout
    assert "fix: run as root, or give uproxy CAP_NET_ADMIN" in done.stdout
    assert "Traceback" not in done.stderr
