"""``uproxy demo`` and ``uproxy lab``: the commands a newcomer runs first."""

from __future__ import annotations

import os
import re
import signal
import subprocess

import pytest
from cli_tools import run_uproxy, uproxy_argv

from uproxy_netns import CLIENT_V4, CLIENT_V6, Lab, Namespace, kept_labs
from uproxy_netns._namespace import NETNS_DIR

pytestmark = pytest.mark.lab


def namespaces_of(tag: str) -> list[str]:
    names = os.listdir(NETNS_DIR) if os.path.isdir(NETNS_DIR) else []
    return [name for name in names if name.startswith(f"{tag}-")]


def lab_tag(transcript: str) -> str:
    found = re.search(r"building lab (\S+):", transcript)
    assert found, transcript
    return found.group(1)


def test_demo_tells_the_story_and_leaves_nothing_behind(lab: Lab) -> None:
    # (`lab` only makes the test skip, or fail under CI, where no lab can be built.)
    done = run_uproxy("demo")
    assert done.returncode == 0, done.stderr
    transcript = done.stdout
    for client in (CLIENT_V4, CLIENT_V6):
        shown = re.escape(f"[{client}]" if ":" in client else client)
        for server_saw in ("accepted a connection from", "got b'Q example.test A' from"):
            assert re.search(
                rf"server +{re.escape(server_saw)} {shown}:\d+ \(the client's own address\)",
                transcript,
            ), transcript
        assert f"server got    b'HELLO FROM {client.upper()}'" in transcript
        assert f"b'hello from {client}' -> b'HELLO FROM {client.upper()}'" in transcript
    assert transcript.count("client got    b'hello back'") == 2
    assert transcript.count("client got    b'A example.test 203.0.113.99'") == 2
    assert transcript.count("(the original destination)") == 2
    assert "took flow 2" in transcript
    tag = lab_tag(transcript)
    assert transcript.rstrip().endswith(f"lab {tag} removed")
    assert namespaces_of(tag) == []
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_demo_interrupted_removes_its_lab_and_exits_0(lab: Lab, sig: int) -> None:
    demo = subprocess.Popen(uproxy_argv("demo", "--wait"), stdout=subprocess.PIPE, text=True)
    lines = []
    try:
        assert demo.stdout is not None
        for line in demo.stdout:
            lines.append(line)
            if line.startswith("press Ctrl-C"):
                break
        tag = lab_tag("".join(lines))
        assert len(namespaces_of(tag)) == 3
        demo.send_signal(sig)
        rest, _ = demo.communicate(timeout=60)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    assert demo.returncode == 0
    assert rest.rstrip().endswith(f"lab {tag} removed")
    assert namespaces_of(tag) == []


def test_lab_up_status_down(lab: Lab) -> None:
    up = run_uproxy("lab", "up")
    found = re.search(r"^lab (upxlab-\w+) is up", up.stdout)
    assert up.returncode == 0, up.stderr
    assert found, up.stdout
    tag = found.group(1)
    try:
        assert sorted(namespaces_of(tag)) == [f"{tag}-client", f"{tag}-proxy", f"{tag}-server"]
        for role in ("client", "proxy", "server"):
            assert f"ip netns exec {tag}-{role} bash" in up.stdout
        assert re.search(rf"ip netns exec {tag}-proxy \S*uproxy serve --listen", up.stdout)
        assert "--udp-listen 127.0.0.1:9091 --udp-listen [::1]:9091" in up.stdout
        for save in ("iptables-save", "ip6tables-save"):
            rules = Namespace(f"{tag}-proxy").run([save, "-t", "mangle"])
            assert "-p udp -m udp --dport 9090:9099 -j TPROXY" in rules
        status = run_uproxy("lab", "status")
        assert tag in status.stdout.split()
        down = run_uproxy("lab", "down", tag)
        assert down.returncode == 0, down.stderr
        assert down.stdout.strip() == f"lab {tag} removed"
        assert namespaces_of(tag) == []
        assert tag not in kept_labs()
        status = run_uproxy("lab", "status")
        assert tag not in status.stdout.split()
        if not kept_labs():
            assert status.stderr.strip() == "no lab is up (uproxy lab up starts one)"
        again = run_uproxy("lab", "down", tag)
        assert again.returncode == 1
        assert again.stderr.strip() == (
            f"uproxy: error: no lab named '{tag}' is up (uproxy lab status lists them)"
        )
    finally:
        Lab(tag, None).down()
