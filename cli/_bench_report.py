"""How ``uproxy bench`` shows its figures: a table for people, JSON for scripts.

Every figure comes with the ratios a reader wants from it (each uproxy relay against kernel
forwarding and against HAProxy) and with the rules it was measured behind, since the TPROXY
rules are part of what is measured.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from uproxy_netns import BenchReport, HttpResult, Relay, RelayResult

# Relays each uproxy relay is compared with, in the order the ratios are printed.
BASELINES = (Relay.KERNEL, Relay.HAPROXY)

# (heading, JSON key, figure) for every measurement that has a ratio.
_Metric = tuple[str, str, Callable[[RelayResult], float]]
METRICS: tuple[_Metric, ...] = (
    ("c->s Gbit/s", "client_to_server", lambda result: result.client_to_server_bps / 1e9),
    ("s->c Gbit/s", "server_to_client", lambda result: result.server_to_client_bps / 1e9),
    ("keep-alive req/s", "keep_alive", lambda result: result.keep_alive.requests_per_s),
    ("new-conn req/s", "new_connection", lambda result: result.new_connection.requests_per_s),
)


def format_report(report: BenchReport) -> str:
    """The whole report as text: settings, figures, ratios, idle flows, errors."""
    settings = report.settings
    sections = [
        f"uproxy bench: {settings.duration_s} s per iperf3 (one TCP flow) and wrk "
        f"({settings.connections} connections) run; {settings.idle_flows} idle flows; "
        f"uproxy --workers {settings.workers}, haproxy nbthread {settings.workers}; "
        "uproxy at --log-level warning, uproxy-default-logging at serve's default; "
        "each relay on a fresh lab; one shared host, so ratios only",
        _figures_table(report.results),
        _ratios_table(report.results),
        *_idle_lines(report.results),
        _errors_line(report.results),
    ]
    return "\n\n".join(section for section in sections if section) + "\n"


def _figures_table(results: Sequence[RelayResult]) -> str:
    header = ["relay", *(heading for heading, _, _ in METRICS), "idle KiB/flow", "rules"]
    rows = [
        [
            str(result.relay),
            *(_figure(value(result)) for _, _, value in METRICS),
            f"{result.idle.kib_per_flow:.2f}" if result.idle is not None else "-",
            result.rules,
        ]
        for result in results
    ]
    return _aligned([header, *rows], left={0, len(header) - 1})


def _ratios_table(results: Sequence[RelayResult]) -> str:
    by_relay = {result.relay: result for result in results}
    rows = []
    for result in results:
        if not result.relay.is_uproxy:
            continue
        for baseline in BASELINES:
            if baseline in by_relay:
                rows.append(_ratio_row(result, by_relay[baseline]))
    if not rows:
        return ""
    header = ["ratio", *(heading.split(" ")[0] for heading, _, _ in METRICS)]
    return _aligned([header, *rows], left={0})


def _ratio_row(result: RelayResult, baseline: RelayResult) -> list[str]:
    ratios = _ratios(result, baseline)
    cells = [f"{ratio:.2f}" if ratio is not None else "-" for ratio in ratios]
    return [f"{result.relay} / {baseline.relay}", *cells]


def _ratios(result: RelayResult, baseline: RelayResult) -> list[float | None]:
    """``result`` over ``baseline`` for every metric; ``None`` where the baseline measured 0."""
    ratios: list[float | None] = []
    for _, _, value in METRICS:
        denominator = value(baseline)
        ratios.append(value(result) / denominator if denominator > 0 else None)
    return ratios


def _idle_lines(results: Sequence[RelayResult]) -> list[str]:
    lines = []
    for result in results:
        idle = result.idle
        if idle is None:
            continue
        lines.append(
            f"idle flows, {result.relay}: {idle.flows} flows held, proxy VmRSS "
            f"{idle.rss_before_kib} -> {idle.rss_after_kib} KiB ({idle.kib_per_flow:.2f} KiB "
            f"per flow); {idle.relayed}/{idle.flows} then relayed a byte both ways"
        )
    return ["\n".join(lines)] if lines else []


def _errors_line(results: Sequence[RelayResult]) -> str:
    """wrk's socket errors and bad responses: a rate earned with errors is not comparable."""
    counts = [
        f"{result.relay} {kind} {http.errors}"
        for result in results
        for kind, http in (("keep-alive", result.keep_alive), ("new-conn", result.new_connection))
        if http.errors
    ]
    return "wrk errors: " + (", ".join(counts) if counts else "none")


def _figure(value: float) -> str:
    return f"{value:.2f}" if value < 100 else f"{value:.0f}"


def _aligned(rows: Sequence[Sequence[str]], left: set[int]) -> str:
    """Columns padded to their widest cell; the ``left`` ones left-aligned, numbers right."""
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [
            cell.ljust(width) if column in left else cell.rjust(width)
            for column, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def report_as_json(report: BenchReport) -> dict[str, Any]:
    """The report as plain JSON values: figures in their measured units, ratios included."""
    by_relay = {result.relay: result for result in report.results}
    return {
        "settings": {
            "relays": [str(relay) for relay in report.settings.relays],
            "duration_s": report.settings.duration_s,
            "idle_flows": report.settings.idle_flows,
            "connections": report.settings.connections,
            "uproxy_syn_to_tproxy": report.settings.uproxy_syn_to_tproxy,
        },
        "results": {
            str(result.relay): _result_as_json(result, by_relay) for result in report.results
        },
    }


def _result_as_json(result: RelayResult, by_relay: dict[Relay, RelayResult]) -> dict[str, Any]:
    figures: dict[str, Any] = {
        "rules": result.rules,
        "client_to_server_bps": result.client_to_server_bps,
        "server_to_client_bps": result.server_to_client_bps,
        "keep_alive": _http_as_json(result.keep_alive),
        "new_connection": _http_as_json(result.new_connection),
        "idle": None,
        "lab": result.lab,
        "pids": list(result.pids),
        "command": list(result.command),
    }
    if result.idle is not None:
        figures["idle"] = {
            "flows": result.idle.flows,
            "rss_before_kib": result.idle.rss_before_kib,
            "rss_after_kib": result.idle.rss_after_kib,
            "kib_per_flow": result.idle.kib_per_flow,
            "relayed": result.idle.relayed,
        }
    if result.relay.is_uproxy:
        figures["ratios"] = {
            str(baseline): {
                key: ratio
                for (_, key, _), ratio in zip(
                    METRICS, _ratios(result, by_relay[baseline]), strict=True
                )
            }
            for baseline in BASELINES
            if baseline in by_relay
        }
    return figures


def _http_as_json(http: HttpResult) -> dict[str, Any]:
    return {
        "requests_per_s": http.requests_per_s,
        "requests": http.requests,
        "errors": http.errors,
    }
