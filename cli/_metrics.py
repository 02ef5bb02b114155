"""Prometheus metrics for ``uproxy serve --metrics HOST:PORT`` (and ``--control``'s server).

One process: the proxy records into its own registry and serves it. With ``--workers``, the
workers record into prometheus-client's multiprocess files (PROMETHEUS_MULTIPROC_DIR, set by
the parent before they start) and the parent serves the sum, so a scrape sees the whole proxy
whichever worker handled which flow.

Flow counts, failures and durations come from the flow events; bytes and active flows are
sampled from the proxy twice a second, so a long bulk flow shows up while it runs, and the
data path pays nothing for metrics. UDP sessions have metrics of their own
(``uproxy_udp_*``, ``uproxy_datagrams_total``): the ``uproxy_flows*`` ones count TCP flows.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import trio
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from uproxy_trio import (
    Address,
    Direction,
    FlowClosed,
    FlowEvent,
    FlowOpened,
    Proxy,
    UdpDrop,
    UpstreamFailed,
)

from ._http import serve_http

LOGGER = logging.getLogger("uproxy.metrics")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
SAMPLE_INTERVAL_S = 0.5
# Flow durations span milliseconds (a refused connect) to hours (an idle session).
DURATION_BUCKETS = (0.001, 0.01, 0.1, 0.5, 1, 5, 30, 120, 600, 3600, float("inf"))


class Metrics:
    def __init__(self) -> None:
        # In a worker the values go to the multiprocess files whatever the registry; a
        # registry of our own keeps prometheus-client's global one out of it.
        self.registry = CollectorRegistry()
        registry = self.registry
        self.flows = Counter("uproxy_flows", "Flows accepted.", registry=registry)
        self.active = Gauge(
            "uproxy_flows_active",
            "Flows in flight.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.bytes = Counter(
            "uproxy_bytes", "Bytes delivered, by direction.", ["direction"], registry=registry
        )
        self.connect_failures = Counter(
            "uproxy_connect_failures",
            "Upstream connections that failed, by reason.",
            ["reason"],
            registry=registry,
        )
        self.closed = Counter(
            "uproxy_flows_closed", "Flows ended, by reason.", ["reason"], registry=registry
        )
        self.duration = Histogram(
            "uproxy_flow_duration_seconds",
            "How long flows lasted.",
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.udp_sessions = Counter(
            "uproxy_udp_sessions", "UDP sessions opened.", registry=registry
        )
        self.udp_active = Gauge(
            "uproxy_udp_sessions_active",
            "UDP sessions in flight.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.udp_closed = Counter(
            "uproxy_udp_sessions_closed",
            "UDP sessions ended, by reason.",
            ["reason"],
            registry=registry,
        )
        self.datagrams = Counter(
            "uproxy_datagrams",
            "UDP datagrams read from a session's source, by direction.",
            ["direction"],
            registry=registry,
        )
        self.udp_dropped = Counter(
            "uproxy_udp_dropped",
            "UDP datagrams dropped, by reason.",
            ["reason"],
            registry=registry,
        )
        self._sampled = dict.fromkeys(Direction, 0)
        self._sampled_datagrams = dict.fromkeys(Direction, 0)
        self._sampled_drops = dict.fromkeys(UdpDrop, 0)
        for direction in Direction:
            self.bytes.labels(direction.value)  # present from the first scrape, at 0
            self.datagrams.labels(direction.value)
        for drop in UdpDrop:
            self.udp_dropped.labels(drop.value)

    def on_event(self, event: FlowEvent) -> None:
        if event.flow.transport == "udp":
            if isinstance(event, FlowOpened):
                self.udp_sessions.inc()
            elif isinstance(event, FlowClosed):
                self.udp_closed.labels(event.reason).inc()
            return
        if isinstance(event, FlowOpened):
            self.flows.inc()
        elif isinstance(event, UpstreamFailed):
            self.connect_failures.labels(event.reason).inc()
        elif isinstance(event, FlowClosed):
            self.closed.labels(event.reason).inc()
            self.duration.observe(event.duration_s)

    def sample(self, proxy: Proxy) -> None:
        self.active.set(proxy.active_flows)
        for direction, total in proxy.bytes_moved().items():
            self.bytes.labels(direction.value).inc(total - self._sampled[direction])
            self._sampled[direction] = total
        udp = proxy.udp
        self.udp_active.set(udp.active)
        for direction, total in udp.datagrams_moved().items():
            self.datagrams.labels(direction.value).inc(total - self._sampled_datagrams[direction])
            self._sampled_datagrams[direction] = total
        for drop, total in udp.dropped.items():
            self.udp_dropped.labels(drop.value).inc(total - self._sampled_drops[drop])
            self._sampled_drops[drop] = total

    async def keep_sampling(self, proxy: Proxy) -> None:
        try:
            while True:
                self.sample(proxy)
                await trio.sleep(SAMPLE_INTERVAL_S)
        finally:
            self.sample(proxy)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def render_multiprocess() -> bytes:
    """The sum over every worker's files, for the parent of ``--workers`` to serve."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return generate_latest(registry)


def metrics_route(render: Callable[[], bytes]) -> Route:
    """``GET /metrics``, for whichever server serves it (``--metrics``, ``--control``)."""

    async def metrics(request: Request) -> Response:
        return Response(render(), media_type=CONTENT_TYPE_LATEST)

    return Route("/metrics", metrics, methods=["GET"])


async def serve_metrics(
    address: Address,
    render: Callable[[], bytes],
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """``--metrics HOST:PORT``: a server with ``GET /metrics`` and nothing else."""
    app = Starlette(routes=[metrics_route(render)])
    await serve_http(address, app, "metrics", "/metrics", task_status=task_status)


def in_multiprocess_mode() -> bool:
    return MULTIPROC_ENV in os.environ
