"""docs/operations.md's Cloud Logging cookbook names only fields and events the code writes: every
`jsonPayload.event="X"` (or a list of them) is an event some `log_event` call or sweep plan emits, and
every `jsonPayload.<field>` is a field of the JSON line shared/log.py writes for such an event."""

from __future__ import annotations

import io
import json
import logging
import re
from pathlib import Path

from shared.log import JsonFormatter, log_event

ROOT = Path(__file__).resolve().parents[2]


def _cookbook() -> str:
    text = (ROOT / "docs" / "operations.md").read_text()
    start = text.index("### Cloud Logging query cookbook")
    return text[start:text.index("\n## ", start)]


def _emitted_events() -> set[str]:
    code = "\n".join(p.read_text() for d in ("shared", "functions") for p in (ROOT / d).rglob("*.py"))
    return set(re.findall(r'log_event\(\s*"([a-z_]+)"', code)) | set(re.findall(r'"event": "([a-z_]+)"', code))


def test_every_event_the_cookbook_queries_is_emitted_by_the_code():
    events = set()
    for clause in re.findall(r'jsonPayload\.event=\(?([^)`|]+)\)?', _cookbook()):
        events |= set(re.findall(r'"([a-z_]+)"', clause))
    assert events >= {"sweep_done", "job_paused", "redrive_examined", "stall_flagged", "job_completed"}
    assert sorted(events - _emitted_events()) == []


def test_every_payload_field_the_cookbook_names_is_in_a_written_line():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("upcfan")
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.INFO)
    try:
        log_event("job_paused", severity="WARNING", job_id="J", status="paused", code="operator", error="e", actor="a")
        log_event("redrive_examined", job_id="J", actor="a", dry_run=True, examined=1, stranded=0)
        log_event("item_claimed", job_id="J", gtin="00012345678905", round=1)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    written = set().union(*lines) - {"severity", "time"}  # Cloud Run lifts these out of jsonPayload
    named = set(re.findall(r"jsonPayload\.([a-z_]+)", _cookbook()))
    assert named >= {"event", "job_id", "actor", "code", "logger", "message", "gtin"}
    assert sorted(named - written) == []
    assert all(line["event"] == line["message"] for line in lines)
