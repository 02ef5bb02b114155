"""``uproxy rules``: what it renders, and that the rules it applies hold in the lab.

The lab tests build a plain-router lab, apply the generated rules in its proxy namespace with
``uproxy rules --apply`` (as a user would, through ``ip netns exec``), and run the real
``uproxy serve`` behind them.
"""

from __future__ import annotations

import re
import subprocess
import time

import pytest
import trio
from cli_tools import LISTEN_BOTH, run_uproxy
from lab_tools import (
    ADDRESSES,
    CliProxy,
    connect,
    listen,
    open_flow,
    recv_exactly,
    recv_until_eof,
    send_all,
)

from uproxy_netns import SERVER_V4, Lab, Namespace, TproxySetup
from uproxy_trio import format_address

BACKENDS = ["nft", "iptables"]
# The lab's proxy host: clients arrive on ens6, servers answer on ens7.
LAB_INTERFACES = ["--in-interface", "ens6", "--out-interface", "ens7"]

# Churn: more flows than the client has source ports, so every port comes back several times
# while the proxy still holds the TIME_WAIT of its last flow (60 s).
CHURN_FLOWS = 3000
CHURN_CLIENT_PORTS = (20000, 20499)
CHURN_CONCURRENCY = 50


def test_nft_rules_send_bare_syns_to_tproxy_and_everything_else_by_socket() -> None:
    done = run_uproxy(
        "rules", *LAB_INTERFACES, "--port", "9090", "--port", "9100-9199", *LISTEN_BOTH
    )
    assert done.returncode == 0, done.stderr
    script = done.stdout
    assert "nft -f - <<'EOF'" in script
    shortcut = (
        'iifname "ens6" meta nfproto ipv4 tcp dport { 9090, 9100-9199 } '
        "tcp flags & (fin | syn | rst | ack) != syn socket transparent 1 meta mark set 1 accept"
    )
    assert shortcut in script
    assert "tproxy ip to 127.0.0.1:9091 accept" in script
    assert "tproxy ip6 to [::1]:9091 accept" in script
    assert "nf_tproxy_handle_time_wait4" in script  # the why travels with the rules
    assert "ip rule show fwmark 1 lookup 100 | grep -q . || ip rule add fwmark 1 lookup 100" in (
        script
    )
    assert "ip -6 route replace local ::/0 dev lo table 100" in script


def test_iptables_rules_use_own_chains_and_skip_the_shortcut_for_bare_syns() -> None:
    done = run_uproxy(
        "rules",
        "-b",
        "iptables",
        *LAB_INTERFACES,
        "--listen",
        "127.0.0.1:9091",
        "--mark",
        "7",
        "-p",
        "80",
    )
    assert done.returncode == 0, done.stderr
    script = done.stdout
    assert "iptables-restore --noflush <<'EOF'" in script
    assert (
        "-A UPROXY_PREROUTING -i ens6 -p tcp --dport 80 ! --syn -m socket --transparent "
        "-j UPROXY_DIVERT"
    ) in script
    assert "--tproxy-mark 7 --on-port 9091 --on-ip 127.0.0.1" in script
    # Only the families with a listener are intercepted.
    assert "ip6tables" not in script
    assert "ip -6" not in script


def test_ports_are_merged_and_listeners_may_differ_per_family() -> None:
    setup = TproxySetup(ports="9100-9199,9090,9150:9300,9089", listen_port_v6=9092)
    assert setup.port_ranges == [(9089, 9090), (9100, 9300)]
    assert "tproxy ip6 to [::1]:9092" in setup.nft_ruleset()
    assert "--dport 9089:9090" in setup.iptables_chains(4)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--port", "0"], "Invalid value for '--port': '0': port 0 is out of range (1-65535)"),
        (["--port", "9199-9100"], "the range ends before it starts"),
        (["--port", "http"], "'http' is not a port or a range FIRST-LAST"),
        (["--listen", "127.0.0.1"], "Invalid value for '--listen'"),
        (["--listen", "127.0.0.1:1", "--listen", "127.0.0.2:1"], "more than one IPv4 listener"),
        (["--backend", "pf"], "'pf' is not one of nft, iptables"),
        (["--table", "254"], "table 254 is reserved"),
        (["--mark", "0"], "'--mark'"),
        (["--in-interface", "eth0; reboot"], "is not an interface name"),
        (["--apply", "--remove"], "--apply and --remove exclude each other"),
    ],
)
def test_bad_rules_input_is_one_line_and_exit_2(args: list[str], message: str) -> None:
    done = run_uproxy("rules", *LAB_INTERFACES, "--port", "9090", *args)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("uproxy: error: ")
    assert message in lines[0]


@pytest.mark.parametrize(
    ("args", "missing"),
    [
        ([], "missing --in-interface, --out-interface, --port or --udp-port: "),
        (["--in-interface", "eth1", "--port", "80"], "missing --out-interface: "),
        (
            ["--in-interface", "eth1", "--out-interface", "eth0", "--apply"],
            "missing --port or --udp-port: ",
        ),
    ],
)
def test_interfaces_and_ports_have_no_defaults(args: list[str], missing: str) -> None:
    """The seed's lab names (ens6, ens7, 9090) are nobody's host: nothing is guessed."""
    done = run_uproxy("rules", *args)
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"uproxy: error: {missing}uproxy rules needs the interface")


def host_state(namespace: Namespace) -> dict[str, str]:
    """Everything ``uproxy rules`` may touch, as text; a table never used reads as empty."""
    commands = {
        "nft": ["nft", "--stateless", "list", "ruleset"],
        "iptables": ["iptables-save"],
        "ip6tables": ["ip6tables-save"],
        "rules": ["ip", "rule"],
        "rules6": ["ip", "-6", "rule"],
        "table": ["ip", "route", "show", "table", "100"],
        "table6": ["ip", "-6", "route", "show", "table", "100"],
    }
    state = {}
    for name, argv in commands.items():
        done = subprocess.run(namespace.exec_argv(argv), capture_output=True, text=True)
        # iptables-save stamps its output with the time and chain counters; only the rules
        # matter.
        lines = [
            re.sub(r"\[\d+:\d+\]", "[]", line)
            for line in done.stdout.splitlines()
            if not line.startswith("#")
        ]
        state[name] = "\n".join(lines) if done.returncode == 0 else ""
    return state


@pytest.mark.lab
@pytest.mark.parametrize("backend", BACKENDS)
def test_apply_twice_changes_nothing_and_remove_leaves_nothing_behind(
    plain_lab: Lab, backend: str
) -> None:
    proxy = plain_lab.proxy
    args = ["rules", "--backend", backend, *LISTEN_BOTH]
    ports = ["--port", "9090", "--port", "9100-9199"]
    before = host_state(proxy)
    done = run_uproxy(*args, *LAB_INTERFACES, *ports, "--apply", namespace=proxy)
    assert done.returncode == 0, done.stderr
    applied = host_state(proxy)
    assert applied != before
    assert "fwmark 0x1 lookup 100" in applied["rules"]
    assert "fwmark 0x1 lookup 100" in applied["rules6"]
    assert "local default dev lo" in applied["table"]
    assert "local default dev lo" in applied["table6"]
    if backend == "nft":
        assert "table inet uproxy" in applied["nft"]
    else:
        assert "-A PREROUTING -j UPROXY_PREROUTING" in applied["iptables"]
        assert "--on-ip ::1" in applied["ip6tables"]
    assert run_uproxy(*args, *LAB_INTERFACES, *ports, "--apply", namespace=proxy).returncode == 0
    assert host_state(proxy) == applied
    # Removal needs no interfaces or ports: it takes away whatever our table or chains held.
    done = run_uproxy(*args, "--remove", namespace=proxy)
    assert done.returncode == 0, done.stderr
    assert host_state(proxy) == before
    # Removing what is not there is not an error either.
    assert run_uproxy(*args, "--remove", namespace=proxy).returncode == 0
    assert host_state(proxy) == before


@pytest.mark.lab
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("client_ip", "server_ip"), ADDRESSES)
async def test_flows_go_through_the_proxy_behind_the_rules_uproxy_rules_applies(
    plain_lab: Lab, backend: str, client_ip: str, server_ip: str
) -> None:
    lab = plain_lab
    done = run_uproxy(
        "rules",
        *("--backend", backend, *LAB_INTERFACES, "--port", "9090", *LISTEN_BOTH, "--apply"),
        namespace=lab.proxy,
    )
    assert done.returncode == 0, done.stderr
    proxy = CliProxy(lab)
    try:
        proxy.start()
        with trio.fail_after(10):
            async with open_flow(lab, server_ip) as (client, server, peer):
                assert peer[0] == client_ip
                await send_all(client, b"up")
                assert await recv_exactly(server, 2) == b"up"
                await send_all(server, b"down")
                assert await recv_exactly(client, 4) == b"down"
    finally:
        assert proxy.stop() == 0
    # Through the proxy, not past it: a plain router would carry the bytes as well.
    ends = (format_address((client_ip, peer[1])), format_address((server_ip, 9090)))
    assert "flow 1 close reason=closed client={} server={}".format(*ends) in proxy.log
    assert "client_to_server=2 server_to_client=4" in proxy.log


def tcp_counters(namespace: Namespace) -> dict[str, int]:
    """Absolute TCP retransmission counters of a namespace (nstat -s: no history update)."""
    output = namespace.run(["nstat", "-asz", "TcpRetransSegs", "TcpExtTCPSynRetrans"])
    return {line.split()[0]: int(line.split()[1]) for line in output.splitlines()[1:]}


async def churn(lab: Lab, flows: int, ports: set[int]) -> list[float]:
    """``flows`` short flows whose server closes first; each flow's duration in seconds.

    The client's source ports are added to ``ports``.
    """
    durations: list[float] = []
    limiter = trio.CapacityLimiter(CHURN_CONCURRENCY)

    async def serve(listener: trio.socket.SocketType) -> None:
        with listener:
            while True:
                sock, _ = await listener.accept()
                with sock:
                    # The server closes first, so the proxy's side towards the client is the
                    # one that ends in TIME_WAIT.
                    await send_all(sock, b"bye\n")

    async def one_flow() -> None:
        async with limiter:
            started = time.monotonic()
            client = await connect(lab.client, SERVER_V4, 9090)
            with client:
                ports.add(client.getsockname()[1])
                assert await recv_until_eof(client) == b"bye\n"
            durations.append(time.monotonic() - started)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve, await listen(lab.server, SERVER_V4, 9090, backlog=4096))
        with trio.fail_after(300):
            async with trio.open_nursery() as clients:
                for _ in range(flows):
                    clients.start_soon(one_flow)
        nursery.cancel_scope.cancel()
    return durations


@pytest.mark.lab
@pytest.mark.parametrize("backend", BACKENDS)
async def test_port_reuse_while_the_proxy_holds_time_wait_costs_no_syn_retransmit(
    plain_lab: Lab, backend: str
) -> None:
    lab = plain_lab
    done = run_uproxy(
        "rules",
        "-b",
        backend,
        *LAB_INTERFACES,
        "-p",
        "9090",
        *LISTEN_BOTH,
        "--apply",
        namespace=lab.proxy,
    )
    assert done.returncode == 0, done.stderr
    first, last = CHURN_CLIENT_PORTS
    lab.client.sysctl({"net.ipv4.ip_local_port_range": f"{first} {last}"})
    proxy = CliProxy(lab)
    ports: set[int] = set()
    try:
        proxy.start("--log-level", "warning")
        before = {ns.name: tcp_counters(ns) for ns in (lab.proxy, lab.client)}
        durations = await churn(lab, CHURN_FLOWS, ports)
        after = {ns.name: tcp_counters(ns) for ns in (lab.proxy, lab.client)}
        time_wait = lab.proxy.run(["ss", "-Htan", "state", "time-wait"]).splitlines()
    finally:
        assert proxy.stop() == 0
    retransmits = {
        f"{name.rsplit('-', 1)[1]} {counter}": after[name][counter] - before[name][counter]
        for name in before
        for counter in before[name]
    }
    print(
        f"{backend}: {len(durations)} flows from {len(ports)} ports, "
        f"slowest {max(durations) * 1000:.0f} ms, "
        f"proxy TIME_WAIT {len(time_wait)}, retransmits {retransmits}"
    )
    assert len(durations) == CHURN_FLOWS
    # The ports did come back while the proxy held their TIME_WAIT: the case under test.
    # (connect() takes even ports first, so 500 ports give 250 before odd ones are used.)
    assert len(ports) <= last - first + 1
    assert len(time_wait) >= len(ports)
    assert max(durations) < 1.0  # a SYN retransmit costs a whole second
    assert set(retransmits.values()) == {0}, retransmits


# The condition that keeps a bare SYN away from the "socket exists" shortcut, as `uproxy
# rules` writes it for each backend.
BARE_SYN_EXCLUSION = {"nft": "tcp flags & (fin | syn | rst | ack) != syn ", "iptables": "! --syn "}


@pytest.mark.lab
@pytest.mark.parametrize("backend", BACKENDS)
async def test_without_the_bare_syn_exclusion_reused_ports_cost_syn_retransmits(
    plain_lab: Lab, backend: str
) -> None:
    """The control for the test above: the script ``uproxy rules`` prints, with only the
    bare-SYN exclusion taken out, makes the same churn cost SYN retransmits. So the counters
    there do detect the fault, and the exclusion is what prevents it."""
    lab = plain_lab
    done = run_uproxy(
        "rules", "--backend", backend, *LAB_INTERFACES, "--port", "9090", *LISTEN_BOTH
    )
    assert done.returncode == 0, done.stderr
    exclusion = BARE_SYN_EXCLUSION[backend]
    # One shortcut rule each way (clients' packets, servers' answers) per IP version.
    assert done.stdout.count(exclusion) == 4
    lab.proxy.run(["bash"], input=done.stdout.replace(exclusion, ""))
    first, last = CHURN_CLIENT_PORTS
    lab.client.sysctl({"net.ipv4.ip_local_port_range": f"{first} {last}"})
    proxy = CliProxy(lab)
    try:
        proxy.start("--log-level", "warning")
        before = tcp_counters(lab.client)
        await churn(lab, 1000, set())
        after = tcp_counters(lab.client)
    finally:
        assert proxy.stop() == 0
    assert after["TcpExtTCPSynRetrans"] > before["TcpExtTCPSynRetrans"]
