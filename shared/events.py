"""Job audit trail: one document per event under jobs/{job_id}/events, with actor and TTL field."""

from __future__ import annotations

import datetime as dt
from typing import Any

from shared.model import EVENTS

EVENT_TTL = dt.timedelta(days=90)


def event_doc(type_: str, actor: str, now: dt.datetime, details: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"type": type_, "actor": actor, "at": now, "details": details or {}, "expire_at": now + EVENT_TTL}


def record_event(job_ref, type_: str, actor: str, now: dt.datetime, details: dict | None = None, *,
                 tx=None, batch=None, event_id: str | None = None) -> None:
    """Append an event; pass `event_id` to make a retried step write it once, `tx`/`batch` to join a write."""
    ref = job_ref.collection(EVENTS).document(event_id) if event_id else job_ref.collection(EVENTS).document()
    doc = event_doc(type_, actor, now, details)
    writer = tx or batch
    if writer is not None:
        writer.set(ref, doc)
    else:
        ref.set(doc)
