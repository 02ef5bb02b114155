"""How ``uproxy`` logs: readable text, or one JSON object per line for machines.

The library attaches each flow event to its log record (``record.flow_event``); the JSON
formatter turns it into fields, so a flow's end is an object with ``"event": "flow_close"``,
addresses as ``"ip:port"``, byte counts, the duration, whether interceptors ran and the route
the flow took (``"route"``, absent when none did), ready for jq or a log pipeline.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from datetime import UTC, datetime
from typing import Any

from uproxy_trio import (
    FlowClosed,
    FlowEvent,
    FlowOpened,
    FlowRefused,
    HalfClosed,
    InterceptorFailed,
    UpstreamConnected,
    UpstreamFailed,
    format_address,
)

LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")

EVENT_NAMES: dict[type[Any], str] = {
    FlowOpened: "flow_open",
    UpstreamConnected: "upstream_connected",
    UpstreamFailed: "upstream_failed",
    FlowRefused: "flow_refused",
    HalfClosed: "half_closed",
    InterceptorFailed: "interceptor_failed",
    FlowClosed: "flow_close",
}


def setup_logging(level: str, log_format: str, worker: str | None) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(worker) if log_format == "json" else TextFormatter(worker))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Nothing we write names a thread or a process (a worker says ``worker I/N`` itself), so
    # a record need not look them up: about a microsecond of every flow's access-log line.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


class TextFormatter(logging.Formatter):
    """``TIME LEVEL [worker I/N] LOGGER: MESSAGE``, one line per record.

    The time's date-and-seconds part is formatted once per second rather than per record: at
    one access-log line per flow, ``strftime`` was a tenth of the line's cost.
    """

    def __init__(self, worker: str | None) -> None:
        prefix = f"{worker} " if worker else ""
        super().__init__(f"%(asctime)s %(levelname)s {prefix}%(name)s: %(message)s")
        self._second = -1
        self._second_text = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        if second != self._second:
            self._second = second
            self._second_text = time.strftime(self.default_time_format, self.converter(second))
        return f"{self._second_text},{int(record.msecs):03d}"


def event_fields(event: FlowEvent) -> dict[str, Any]:
    """A flow event as flat JSON-ready fields."""
    flow = event.flow
    fields: dict[str, Any] = {
        "event": EVENT_NAMES[type(event)],
        "flow": flow.id,
        "client": format_address(flow.client),
        "server": format_address(flow.server),
        "transport": flow.transport,
    }
    if isinstance(event, UpstreamConnected):
        fields["connect_s"] = round(event.connect_s, 6)
    elif isinstance(event, UpstreamFailed | FlowRefused):
        fields["reason"] = event.reason
        if isinstance(event, UpstreamFailed):
            fields["detail"] = event.detail
    elif isinstance(event, HalfClosed):
        fields["side"] = event.side
    elif isinstance(event, InterceptorFailed):
        fields["direction"] = event.direction.value
        fields["error"] = f"{type(event.error).__name__}: {event.error}"
    elif isinstance(event, FlowClosed):
        fields["reason"] = event.reason
        fields["first_closed"] = event.first_closed
        fields["bytes_client_to_server"] = event.bytes_client_to_server
        fields["bytes_server_to_client"] = event.bytes_server_to_client
        fields["duration_s"] = round(event.duration_s, 6)
        fields["intercepted"] = event.intercepted
        if event.route is not None:
            fields["route"] = event.route
    return fields


class JsonFormatter(logging.Formatter):
    """One JSON object per line; never a line that is not JSON, tracebacks included."""

    def __init__(self, worker: str | None) -> None:
        super().__init__()
        self._worker = worker

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self._worker:
            entry["worker"] = self._worker
        event = getattr(record, "flow_event", None)
        if event is not None:
            entry.update(event_fields(event))
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, separators=(",", ":"))
