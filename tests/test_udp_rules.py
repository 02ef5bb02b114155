"""``uproxy rules --udp-port``: what it renders, and that UDP sessions work behind the rules
it applies (nft and iptables, IPv4 and IPv6), ICMP errors included."""

from __future__ import annotations

import pytest
from cli_tools import LISTEN_BOTH, run_uproxy
from lab_tools import ADDRESSES, CliProxy, eventually
from test_rules import LAB_INTERFACES, host_state
from udp_tools import CLOSED_UDP_PORT, UDP_LISTEN_ARGS, UDP_PORT, echo_server, exchange, udp_socket

from uproxy_netns import Lab

BACKENDS = ["nft", "iptables"]
UDP_ARGS = ["--udp-port", "9090-9099", "--udp-port", "53", *UDP_LISTEN_ARGS]


def test_nft_rules_for_udp_have_the_shortcut_the_icmp_rule_and_tproxy_on_the_client_side() -> None:
    done = run_uproxy("rules", *LAB_INTERFACES, "--port", "80", *LISTEN_BOTH, *UDP_ARGS)
    assert done.returncode == 0, done.stderr
    script = done.stdout
    for version, target in ((4, "ip to 127.0.0.1:9091"), (6, "ip6 to [::1]:9091")):
        family = f"meta nfproto ipv{version}"
        icmp = "icmp" if version == 4 else "ipv6-icmp"
        # No socket shortcut for the clients' datagrams: TPROXY finds a session's socket.
        assert f'iifname "ens6" {family} udp dport {{ 53, 9090-9099 }} socket' not in script
        assert (
            f'iifname "ens7" {family} udp sport {{ 53, 9090-9099 }} socket transparent 1' in script
        )
        assert (
            f'iifname {{ "ens6", "ens7" }} {family} meta l4proto {icmp} socket transparent 1 '
            "meta mark set 1 accept"
        ) in script
        udp = f"{family} udp dport {{ 53, 9090-9099 }}"
        assert f'iifname "ens6" {udp} meta mark set 1 tproxy {target} accept' in script
        # No TPROXY for UDP on the servers' side: a late answer is not a new session.
        assert (
            f'iifname "ens7" {family} udp sport {{ 53, 9090-9099 }} meta mark set 1 tproxy'
            not in script
        )
    assert "tcp dport { 80 }" in script


def test_iptables_rules_for_udp_only() -> None:
    done = run_uproxy(
        "rules",
        "-b",
        "iptables",
        *LAB_INTERFACES,
        "--udp-port",
        "53",
        "--udp-listen",
        "127.0.0.1:5353",
    )
    assert done.returncode == 0, done.stderr
    script = done.stdout
    assert "-p tcp" not in script
    assert (
        "-A UPROXY_PREROUTING -i ens7 -p udp --sport 53 -m socket --transparent -j UPROXY_DIVERT"
        in script
    )
    assert "-i ens6 -p udp --dport 53 -m socket" not in script
    assert "-A UPROXY_PREROUTING -i ens7 -p icmp -m socket --transparent -j UPROXY_DIVERT" in script
    assert (
        "-A UPROXY_PREROUTING -i ens6 -p udp --dport 53 -j TPROXY --tproxy-mark 1 --on-port 5353 "
        "--on-ip 127.0.0.1"
    ) in script
    assert "ip6tables" not in script  # one IPv4 UDP listener: IPv4 only


@pytest.mark.lab
@pytest.mark.parametrize("backend", BACKENDS)
def test_udp_rules_apply_twice_and_remove_exactly(plain_lab: Lab, backend: str) -> None:
    proxy = plain_lab.proxy
    args = ["rules", "--backend", backend, *LISTEN_BOTH]
    before = host_state(proxy)
    apply = [*args, *LAB_INTERFACES, "--port", "9090", *UDP_ARGS, "--apply"]
    done = run_uproxy(*apply, namespace=proxy)
    assert done.returncode == 0, done.stderr
    applied = host_state(proxy)
    assert "udp" in applied["nft" if backend == "nft" else "iptables"]
    assert run_uproxy(*apply, namespace=proxy).returncode == 0
    assert host_state(proxy) == applied
    done = run_uproxy(*args, "--remove", namespace=proxy)
    assert done.returncode == 0, done.stderr
    assert host_state(proxy) == before


@pytest.mark.lab
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("client_ip", "server_ip"), ADDRESSES)
async def test_udp_sessions_work_behind_the_rules_uproxy_rules_applies(
    plain_lab: Lab, backend: str, client_ip: str, server_ip: str
) -> None:
    """Only UDP rules (no --port): the client's address reaches the server, the server's
    answer comes from the original destination, and a closed port's ICMP error ends the
    session through the ICMP rule."""
    lab = plain_lab
    done = run_uproxy(
        "rules",
        *(
            "--backend",
            backend,
            *LAB_INTERFACES,
            "--udp-port",
            "9090-9099",
            *LISTEN_BOTH,
            "--apply",
        ),
        namespace=lab.proxy,
    )
    assert done.returncode == 0, done.stderr
    proxy = CliProxy(lab)
    try:
        proxy.start(*UDP_LISTEN_ARGS)
        async with echo_server(lab, server_ip):
            with udp_socket(lab.client, client_ip) as client:
                data, source = await exchange(client, b"hello", (server_ip, UDP_PORT))
                assert (data, source[:2]) == (b"hello", (server_ip, UDP_PORT))
                await client.sendto(b"anyone?", (server_ip, CLOSED_UDP_PORT))
                await eventually(lambda: "reason=server_refused" in proxy.log, timeout=3)
    finally:
        assert proxy.stop() == 0
    # Through the proxy, not past it: the session's close line names the client.
    client_text = f"[{client_ip}]" if ":" in client_ip else client_ip
    assert f"close reason=cancelled client={client_text}:" in proxy.log
    assert "transport=udp" in proxy.log


@pytest.mark.lab
def test_check_udp_listen_misses_the_udp_rules_until_uproxy_rules_applies_them(
    plain_lab: Lab,
) -> None:
    proxy = plain_lab.proxy
    rules = ["rules", *LAB_INTERFACES, *LISTEN_BOTH]
    assert run_uproxy(*rules, "--port", "9090", "--apply", namespace=proxy).returncode == 0
    done = run_uproxy("check", *LISTEN_BOTH, *UDP_LISTEN_ARGS, namespace=proxy)
    assert done.returncode == 1
    lines = done.stdout.splitlines()
    assert "MISS  a UDP TPROXY rule delivers to 127.0.0.1:9091" in lines
    assert "MISS  a UDP TPROXY rule delivers to [::1]:9091" in lines
    assert "WARN  ICMP errors reach the UDP sessions' sockets (IPv6)" in lines
    assert "ok    a TPROXY rule delivers to 127.0.0.1:9091" in lines  # TCP's, not UDP's

    applied = run_uproxy(*rules, "--port", "9090", *UDP_ARGS, "--apply", namespace=proxy)
    assert applied.returncode == 0, applied.stderr
    done = run_uproxy("check", *LISTEN_BOTH, *UDP_LISTEN_ARGS, namespace=proxy)
    assert done.returncode == 0, done.stdout
    assert "ok    a UDP TPROXY rule delivers to [::1]:9091" in done.stdout.splitlines()
    assert "ok    ICMP errors reach the UDP sessions' sockets (IPv4)" in done.stdout.splitlines()


@pytest.mark.lab
def test_the_lab_has_udp_rules_that_check_accepts(lab: Lab) -> None:
    done = run_uproxy("check", *LISTEN_BOTH, *UDP_LISTEN_ARGS, namespace=lab.proxy)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "WARN" not in done.stdout
