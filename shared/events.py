"""Job audit trail: one document per event under jobs/{job_id}/events, with actor and TTL field."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

EVENT_TTL = dt.timedelta(days=90)


@dataclass(frozen=True)
class Event:
    """One entry of a job's audit trail; `event_id` makes a retried step write it once."""

    type: str
    actor: str
    at: dt.datetime
    details: dict[str, Any] = field(default_factory=dict)
    event_id: str | None = None

    def to_doc(self) -> dict[str, Any]:
        return {"type": self.type, "actor": self.actor, "at": self.at, "details": self.details,
                "expire_at": self.at + EVENT_TTL}


def event_doc(type_: str, actor: str, now: dt.datetime, details: dict[str, Any] | None = None) -> dict[str, Any]:
    return Event(type_, actor, now, details or {}).to_doc()
