"""A real DNS exchange through a UDP session: dnsmasq in the server namespace, dig in the
client's, and the proxy rewriting the answer with the built-in ``replace``."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from lab_tools import ADDRESSES, CliProxy
from udp_tools import UDP_LISTEN_ARGS, UDP_PORT

from uproxy_netns import Lab

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(
        shutil.which("dnsmasq") is None or shutil.which("dig") is None,
        reason="needs dnsmasq and dig (netns/bootstrap installs them)",
    ),
]

ANSWER = "198.51.100.77"
REWRITTEN = "203.0.113.99"
# The answer's A record data, as the four bytes on the wire, in and out.
REWRITE = (
    "uproxy_trio.interceptors:replace("
    f"{bytes(map(int, ANSWER.split('.')))!r}, {bytes(map(int, REWRITTEN.split('.')))!r}, "
    'direction="server_to_client")'
)


@contextmanager
def dnsmasq(lab: Lab, server_ip: str) -> Iterator[Path]:
    """dnsmasq answering for example.test on ``server_ip``:9090, inside the server namespace
    only; yields its log."""
    log = Path(tempfile.mkdtemp(prefix="uproxy-dnsmasq-")) / "dnsmasq.log"
    argv = [
        "dnsmasq",
        "--keep-in-foreground",
        "--conf-file=/dev/null",
        "--no-resolv",
        "--no-hosts",
        "--pid-file",
        "--user=root",
        "--bind-interfaces",
        f"--listen-address={server_ip}",
        f"--port={UDP_PORT}",
        f"--address=/example.test/{ANSWER}",
        "--log-queries",
        f"--log-facility={log}",
    ]
    process = subprocess.Popen(lab.server.exec_argv(argv), stderr=subprocess.PIPE)
    try:
        yield log
    finally:
        process.terminate()
        process.wait(10)
        shutil.rmtree(log.parent, ignore_errors=True)


@pytest.mark.parametrize(("client_ip", "server_ip"), ADDRESSES)
def test_dig_asks_dnsmasq_through_the_proxy_which_rewrites_the_answer(
    lab: Lab, cli_proxy: CliProxy, client_ip: str, server_ip: str
) -> None:
    cli_proxy.start(*UDP_LISTEN_ARGS, "--interceptor", REWRITE)
    with dnsmasq(lab, server_ip) as log:
        dig = [
            "dig",
            f"@{server_ip}",
            "-p",
            str(UDP_PORT),
            "+short",
            "+tries=3",
            "+time=2",
            "example.test",
            "A",
        ]
        answer = lab.client.run(dig).strip()
        queries = log.read_text()
    assert answer == REWRITTEN
    # dnsmasq saw the query from the client's own address, and answered what we rewrote.
    assert f"query[A] example.test from {client_ip}" in queries
    assert f"config example.test is {ANSWER}" in queries
    assert cli_proxy.stop() == 0
    assert "intercepted=true transport=udp" in cli_proxy.log
