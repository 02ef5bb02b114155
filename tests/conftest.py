"""Fixtures: the three-host lab (one per test session) and proxies running inside it.

Lab tests need root and network namespaces. Elsewhere they skip with the reason; under CI
(``CI`` set) a lab that cannot be built is a failure, so the suite can never go green by
skipping everything.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Iterator

import pytest
import trio
from cli_tools import PROXY_PORT
from lab_tools import CliProxy, EventLog, run_library_proxy

from uproxy_netns import Lab, LabError, TproxySetup, sweep_stale_labs

# The lab intercepts this range; tests use 9090 for servers that answer and the rest for
# destinations that refuse, drop or misbehave.
LAB_PORTS = "9090:9099"


def _lab_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "the lab needs root (network namespaces, iptables)"
    for tool in ("ip", "iptables-restore", "ip6tables-restore", "sysctl"):
        if shutil.which(tool) is None:
            return f"the lab needs {tool} (the README's test command installs it)"
    return None


def _build_lab(tproxy: TproxySetup | None) -> Lab:
    reason = _lab_unavailable()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the lab tests, but {reason}")
        pytest.skip(reason)
    sweep_stale_labs()
    try:
        built = Lab.owned(tproxy)
        built.up()
    except LabError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"cannot build the lab here: {exc}")
    return built


@pytest.fixture(scope="session")
def lab() -> Iterator[Lab]:
    built = _build_lab(TproxySetup(ports=LAB_PORTS, listen_port=PROXY_PORT, udp_ports=LAB_PORTS))
    try:
        yield built
    finally:
        built.down()


@pytest.fixture
def plain_lab() -> Iterator[Lab]:
    """A lab of its own whose proxy host is a plain router: no TPROXY rules, no policy
    routing, for tests that put their own set-up there."""
    built = _build_lab(None)
    try:
        yield built
    finally:
        built.down()


@pytest.fixture
def inside_proxy(lab: Lab) -> Iterator[Lab]:
    """Run the test's event loop in the proxy namespace, where an in-process proxy belongs.

    Client and server sockets are still made in their own namespaces by ``lab_tools``.
    """
    with lab.proxy.entered():
        yield lab


@pytest.fixture
async def library_proxy(inside_proxy: Lab) -> AsyncIterator[EventLog]:
    """``uproxy_trio.serve`` in-process on the lab's TPROXY port, reporting to an EventLog."""
    events = EventLog()
    async with trio.open_nursery() as nursery:
        await nursery.start(run_library_proxy, events, {})
        yield events
        nursery.cancel_scope.cancel()


@pytest.fixture
def cli_proxy(lab: Lab, tmp_path: object) -> Iterator[CliProxy]:
    """The real ``uproxy serve`` command in the proxy namespace; call ``start(*args)``."""
    proxy = CliProxy(lab)
    try:
        yield proxy
    finally:
        proxy.stop()
