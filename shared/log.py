"""Structured JSON logging fit for Cloud Logging: one line per event, severity and ids as fields."""

from __future__ import annotations

import datetime as _dt
import json
import logging
import sys
from typing import Any

_CONFIGURED = False


class JsonFormatter(logging.Formatter):
    """Renders a record as one JSON object; fields passed via `extra={"fields": {...}}` are merged."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "severity": record.levelname,
            "message": record.getMessage(),
            "logger": record.name,
            "time": _dt.datetime.fromtimestamp(record.created, tz=_dt.timezone.utc).isoformat(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            payload.update(fields)
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str, separators=(",", ":"))


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever `sys.stdout` is at emit time (a captured or replaced stdout included)."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _value) -> None:
        pass


def setup_logging(level: int = logging.INFO) -> None:
    """Install the JSON formatter on the root logger once per process."""
    global _CONFIGURED
    if _CONFIGURED:
        return
    handler = _StdoutHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("urllib3", "google", "grpc", "werkzeug"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    _CONFIGURED = True


def log_event(event: str, *, severity: str = "INFO", logger: str = "upcfan", **fields: Any) -> None:
    """Log one state transition or step: `event` names it, fields carry job_id, gtin, attempt..."""
    level = getattr(logging, severity.upper(), logging.INFO)
    fields = {"event": event, **{k: v for k, v in fields.items() if v is not None}}
    logging.getLogger(logger).log(level, event, extra={"fields": fields})
