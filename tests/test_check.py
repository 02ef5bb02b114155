"""``uproxy check`` in a lab's namespaces: with the set-up, without it, and half-way."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import trio
from cli_tools import LISTEN_BOTH, NO_CAPABILITIES, run_uproxy
from lab_tools import CliProxy, connect, echo_server, listen, recv_exactly, send_all

from uproxy_netns import SERVER_V4, Lab

pytestmark = pytest.mark.lab

LAB_RULES = ["rules", "--in-interface", "ens6", "--out-interface", "ens7", *LISTEN_BOTH]
CONNTRACK = "conntrack cannot drop intercepted packets as INVALID"

# Firewall rules that drop what conntrack marks INVALID, as people write them, with the
# chain each one is reported in. Intercepted flows are delivered locally, so a forward chain
# is harmless; the contents of a named verdict map are not read (no warning, no crash).
INVALID_DROPS = [
    pytest.param(
        [
            "nft",
            "add table inet fw; "
            "add chain inet fw input { type filter hook input priority filter; }; "
            "add rule inet fw input ct state invalid counter drop",
        ],
        "nft inet fw input",
        id="nft-input",
    ),
    pytest.param(
        [
            "nft",
            "add table ip fw; "
            "add chain ip fw output { type filter hook output priority filter; }; "
            "add chain ip fw states; add rule ip fw output jump states; "
            "add rule ip fw states ct state vmap { invalid : drop, established : accept }",
        ],
        "nft ip fw states",
        id="nft-vmap-behind-a-jump",
    ),
    pytest.param(
        ["iptables", "-A", "INPUT", "-m", "conntrack", "--ctstate", "INVALID", "-j", "DROP"],
        "iptables filter INPUT",
        id="iptables-conntrack",
    ),
    pytest.param(
        [
            "ip6tables",
            "-t",
            "mangle",
            "-A",
            "PREROUTING",
            "-m",
            "state",
            "--state",
            "INVALID",
            "-j",
            "DROP",
        ],
        "ip6tables mangle PREROUTING",
        id="ip6tables-state",
    ),
    pytest.param(
        [
            "nft",
            "add table inet fw; "
            "add chain inet fw forward { type filter hook forward priority filter; }; "
            "add rule inet fw forward ct state invalid drop",
        ],
        None,
        id="nft-forward-is-harmless",
    ),
    pytest.param(
        [
            "nft",
            "add table inet fw; "
            "add map inet fw states { type ct_state : verdict; elements = { invalid : drop }; }; "
            "add chain inet fw input { type filter hook input priority filter; }; "
            "add rule inet fw input ct state vmap @states",
        ],
        None,
        id="nft-named-vmap-is-not-read",
    ),
]


def test_a_proxy_host_with_the_set_up_passes(lab: Lab) -> None:
    done = run_uproxy("check", *LISTEN_BOTH, namespace=lab.proxy)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "MISS" not in done.stdout
    assert "ok    a TPROXY rule delivers to [::1]:9091" in done.stdout
    assert "ok    interface ens6, named by the TPROXY rules, is up" in done.stdout
    assert "ok    interface ens7, named by the TPROXY rules, is up" in done.stdout
    assert f"ok    {CONNTRACK}" in done.stdout
    assert done.stdout.rstrip().endswith("all 14 checks passed")


def test_a_plain_router_misses_the_set_up_until_uproxy_rules_applies_it(plain_lab: Lab) -> None:
    proxy = plain_lab.proxy
    done = run_uproxy("check", *LISTEN_BOTH, namespace=proxy)
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
    assert lines[-1] == "6 of 12 checks missed"

    assert run_uproxy(*LAB_RULES, "--port", "9090", "--apply", namespace=proxy).returncode == 0
    done = run_uproxy("check", *LISTEN_BOTH, namespace=proxy)
    assert done.returncode == 0, done.stdout

    # A listener the rules do not deliver to is a miss, whatever else is in place.
    done = run_uproxy("check", "--listen", "127.0.0.1:9999", namespace=proxy)
    assert done.returncode == 1
    assert "MISS  a TPROXY rule delivers to 127.0.0.1:9999" in done.stdout.splitlines()


def legacy_iptables(directory: Path) -> dict[str, str]:
    """An environment whose ``iptables`` tools are the legacy ones, as on a host that chose
    them: their rules do not show in ``nft list ruleset``, so check reads ``iptables-save``."""
    for tool in ("iptables", "ip6tables"):
        for suffix in ("", "-save", "-restore"):
            (directory / f"{tool}{suffix}").symlink_to(f"/usr/sbin/{tool}-legacy{suffix}")
    return {"PATH": f"{directory}:/usr/sbin:/usr/bin:/sbin:/bin"}


@pytest.mark.parametrize("backend", ["nft", "iptables", "iptables-legacy"])
def test_interfaces_the_rules_name_must_exist_and_be_up(
    plain_lab: Lab, backend: str, tmp_path: Path
) -> None:
    """Rules for an interface this host lacks, or one that is down, intercept nothing: that
    is a miss, not 'all checks passed'."""
    proxy = plain_lab.proxy
    env = legacy_iptables(tmp_path) if backend == "iptables-legacy" else None
    rules = ["rules", "-b", backend.removesuffix("-legacy")]
    rules += ["--in-interface", "nosuch0", "--out-interface", "ens7", "--port", "9090"]
    done = run_uproxy(*rules, *LISTEN_BOTH, "--apply", namespace=proxy, env=env)
    assert done.returncode == 0, done.stderr
    if env is not None:
        assert "nosuch0" not in proxy.run(["nft", "list", "ruleset"])
    proxy.ip("link set ens7 down\n")
    done = run_uproxy("check", *LISTEN_BOTH, namespace=proxy, env=env)
    assert done.returncode == 1
    lines = done.stdout.splitlines()
    missing = lines.index("MISS  interface nosuch0, named by the TPROXY rules, is up")
    assert lines[missing + 1] == "      (no such interface here)"
    assert lines[missing + 2].startswith("      fix: apply rules that name this host's interfaces")
    down = lines.index("MISS  interface ens7, named by the TPROXY rules, is up")
    assert lines[down + 1 : down + 3] == ["      (it is down)", "      fix: ip link set ens7 up"]
    assert lines[-1] == "2 of 14 checks missed"
    # The rp_filter check looks at the interfaces the rules name.
    assert "ok    reverse-path filter is not strict on ens7" in lines


def test_an_interface_given_to_check_that_this_host_lacks_is_a_miss_of_its_own(
    lab: Lab,
) -> None:
    """Mistyped on check's command line, it is that name to fix, not the rules (which name
    ens6 and ens7, both up)."""
    done = run_uproxy("check", *LISTEN_BOTH, "--in-interface", "nosuch1", namespace=lab.proxy)
    assert done.returncode == 1
    lines = done.stdout.splitlines()
    missing = lines.index("MISS  interface nosuch1 is up")
    assert lines[missing + 1 : missing + 3] == [
        "      (no such interface here)",
        "      fix: name an interface this host has (ip -br link lists them)",
    ]
    assert "ok    interface ens6, named by the TPROXY rules, is up" in lines
    assert lines[-1] == "1 of 15 checks missed"


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
    lines = done.stdout.splitlines()
    assert "MISS  IP_TRANSPARENT can be set (CAP_NET_ADMIN or CAP_NET_RAW)" in lines
    assert "      fix: run as root, or give uproxy CAP_NET_ADMIN or CAP_NET_RAW " in done.stdout
    # nft could not ask the kernel: that says nothing about its modules.
    kernel = lines.index("MISS  kernel supports TPROXY and socket matching")
    assert "Operation not permitted" in lines[kernel + 1]
    assert (
        lines[kernel + 2]
        == "      fix: run uproxy check as root (asking the kernel needs CAP_NET_ADMIN)"
    )
    assert "modprobe" not in done.stdout
    assert "module" not in done.stdout.lower()
    # Rules it cannot read are not rules that are missing (this host has them).
    assert "MISS  the installed firewall rules can be read" in lines
    assert "a TPROXY rule delivers to" not in done.stdout
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(("rule", "where"), INVALID_DROPS)
def test_a_rule_dropping_conntrack_invalid_packets_is_a_warning_with_its_fix(
    plain_lab: Lab, rule: list[str], where: str | None
) -> None:
    proxy = plain_lab.proxy
    applied = run_uproxy(*LAB_RULES, "-p", "9090", "-p", "9100-9199", "--apply", namespace=proxy)
    assert applied.returncode == 0, applied.stderr
    proxy.run(rule)
    done = run_uproxy("check", *LISTEN_BOTH, namespace=proxy)
    assert done.returncode == 0, done.stdout  # a warning, not a miss
    lines = done.stdout.splitlines()
    if where is None:
        assert f"ok    {CONNTRACK}" in lines
        assert lines[-1] == "all 14 checks passed"
        return
    warning = lines.index(f"WARN  {CONNTRACK}")
    assert lines[warning + 1].startswith(f"      (INVALID packets are dropped in {where};")
    fix = lines[warning + 2].removeprefix("      fix: ")
    tool = "nft" if rule[0] == "nft" else rule[0]
    assert fix.startswith(f"{tool} ")
    assert "9090" in fix
    assert "9100" in fix
    assert lines[-1] == "all 14 checks passed (1 warning)"
    # The fix, run as printed, puts the exemption in place and the warning goes.
    fixed = subprocess.run(proxy.exec_argv(["bash", "-c", fix]), capture_output=True, text=True)
    assert fixed.returncode == 0, fixed.stderr
    done = run_uproxy("check", *LISTEN_BOTH, namespace=proxy)
    assert f"ok    {CONNTRACK}" in done.stdout.splitlines(), done.stdout
    assert done.stdout.rstrip().endswith("all 14 checks passed")


async def test_with_the_fix_an_invalid_drop_rule_drops_no_relayed_packet(plain_lab: Lab) -> None:
    """Four flows echoing 32 MiB each, both ways at once, through ``uproxy serve`` on a host
    that drops INVALID packets on input and output: with the exemption check prints, every
    byte arrives (in about a second) and the drop rules count nothing. Without it the same
    flows have packets dropped and stall until the test's 60 s guard fires."""
    proxy = plain_lab.proxy
    applied = run_uproxy(*LAB_RULES, "-p", "9090", "--apply", namespace=proxy)
    assert applied.returncode == 0, applied.stderr
    proxy.run(
        [
            "nft",
            "add table inet fw; "
            "add chain inet fw input { type filter hook input priority filter; }; "
            "add chain inet fw output { type filter hook output priority filter; }; "
            "add rule inet fw input ct state invalid counter drop; "
            "add rule inet fw output ct state invalid counter drop",
        ]
    )
    lines = run_uproxy("check", *LISTEN_BOTH, namespace=proxy).stdout.splitlines()
    fix = lines[lines.index(f"WARN  {CONNTRACK}") + 2].removeprefix("      fix: ")
    proxy.run(["bash", "-c", fix])
    cli = CliProxy(plain_lab)
    size = 32 << 20
    try:
        cli.start("--log-level", "warning")

        async def one_flow() -> None:
            data = bytes(range(256)) * (size // 256)
            client = await connect(plain_lab.client, SERVER_V4, 9090)
            with client:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(send_all, client, data)
                    assert await recv_exactly(client, size) == data

        async with trio.open_nursery() as nursery:
            await nursery.start(echo_server, await listen(plain_lab.server, SERVER_V4, 9090))
            with trio.fail_after(60):
                async with trio.open_nursery() as flows:
                    for _ in range(4):
                        flows.start_soon(one_flow)
            nursery.cancel_scope.cancel()
    finally:
        assert cli.stop() == 0
    counters = re.findall(
        r"counter packets (\d+)", proxy.run(["nft", "list", "table", "inet", "fw"])
    )
    assert counters == ["0", "0"]
