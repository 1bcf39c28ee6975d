"""States and document shapes of jobs and items; the one source of truth for field names."""

from __future__ import annotations

import datetime as dt
import enum
from dataclasses import dataclass, field
from typing import Any


class JobStatus(str, enum.Enum):
    INGESTING = "ingesting"  # job exists, file being planned / chunks fanning out
    RUNNING = "running"  # fan-out done, items in flight
    # The circuit breaker or an operator stopped new side effects; an operator resumes or cancels.
    PAUSED = "paused"
    COMPLETED = "completed"
    COMPLETED_WITH_FAILURES = "completed_with_failures"
    CANCELLED = "cancelled"
    FAILED = "failed"  # the file itself could not be processed (binary, missing, too large)

    @property
    def is_final(self) -> bool:
        return self in FINAL_JOB_STATUSES


FINAL_JOB_STATUSES = frozenset(
    {JobStatus.COMPLETED, JobStatus.COMPLETED_WITH_FAILURES, JobStatus.CANCELLED, JobStatus.FAILED}
)


class ItemStatus(str, enum.Enum):
    QUEUED = "queued"
    PROCESSING = "processing"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_ITEM_STATUSES


TERMINAL_ITEM_STATUSES = frozenset({ItemStatus.SUCCEEDED, ItemStatus.FAILED, ItemStatus.CANCELLED})
OPEN_ITEM_STATUSES = frozenset({ItemStatus.QUEUED, ItemStatus.PROCESSING})


class LineOutcome(str, enum.Enum):
    """What became of a data line that did not become an item of its own."""

    INVALID = "invalid"
    DUPLICATE = "duplicate"


# Collections
JOBS = "jobs"
ITEMS = "items"  # jobs/{job_id}/items/{gtin}
CHUNKS = "chunks"  # jobs/{job_id}/chunks/{start_byte:012d}
LINES = "lines"  # jobs/{job_id}/lines/{line_no:09d}: invalid and duplicate lines
EVENTS = "events"  # jobs/{job_id}/events/{auto}
STALL_EVENTS = "stall_events"  # top level: stall_events/{auto}
ALERT_STATE = "alert_state"  # top level: alert_state/{job_id or "systemic"}

# jobs/{id}.item_birth: where the job's items are born. "fanout": every item document is created
# (queued, attempt 0) before its task, so once fan-out is done no item is unborn and the sweeper's
# never-claimed count needs one aggregation, not two. Absent on jobs from before (born at first claim).
ITEM_BIRTH = "item_birth"
ITEM_BIRTH_FANOUT = "fanout"

# jobs/{id} fields set when a progress check could not be enqueued (shared/worker/progress_requests.py),
# cleared by the next check; the sweeper reports a running job that carries them.
PROGRESS_CHECK_MISSED_AT = "progress_check_missed_at"
PROGRESS_CHECK_MISSED_ERROR = "progress_check_missed_error"
# While a progress check of the job counts its items, until when (shared/progress.py: one at a time).
PROGRESS_CHECK_UNTIL = "progress_check_until"

ITEM_HISTORY_LIMIT = 8
# The owner written into an item's history when an operator's retry round re-queues it.
RETRY_OWNER_PREFIX = "retry:"


def as_utc(value: Any) -> dt.datetime | None:
    """A stored timestamp as an aware UTC datetime (Firestore gives aware ones; older code naive)."""
    if isinstance(value, dt.datetime):
        return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)
    return None


@dataclass(frozen=True)
class Item:
    """A typed view of one `jobs/{job_id}/items/{gtin}` document (the stored dict stays the truth:
    `doc` is what was read, so fields this type does not name are never lost)."""

    gtin: str
    status: str
    attempt: int
    round: int
    lease_owner: str | None
    lease_expires_at: dt.datetime | None
    history: tuple[dict, ...]
    doc: dict = field(repr=False, compare=False)
    # The store's token for "this version of the document" (Firestore: its update time), so a write
    # decided on this read can be refused if the item moved since.
    version: Any = field(default=None, repr=False, compare=False)

    @classmethod
    def from_doc(cls, doc: dict, gtin: str = "", version: Any = None) -> "Item":
        return cls(
            gtin=str(doc.get("gtin") or gtin),
            status=str(doc.get("status") or ""),
            attempt=int(doc.get("attempt") or 0),
            round=int(doc.get("round") or 1),
            lease_owner=doc.get("lease_owner"),
            lease_expires_at=as_utc(doc.get("lease_expires_at")),
            history=tuple(doc.get("history") or ()),
            doc=dict(doc),
            version=version,
        )

    @property
    def is_final(self) -> bool:
        return self.status in _TERMINAL_VALUES

    def leased_at(self, at: dt.datetime) -> bool:
        """Whether a live lease holds the item at `at` (processing and not yet expired)."""
        return (self.status == ItemStatus.PROCESSING.value and self.lease_expires_at is not None
                and self.lease_expires_at > at)

    @property
    def never_claimed(self) -> bool:
        """Born at fan-out (`queued`, attempt 0) and not yet claimed by any delivery."""
        return self.status == ItemStatus.QUEUED.value and self.attempt == 0

    def started_in_current_round(self) -> bool:
        """Whether a delivery of this round already ran the item's handler (its effect may exist).

        Such an item is finished truthfully even when its job is cancelled: the idempotent handler
        finds its own earlier effect, so the record says `succeeded` rather than `cancelled` while a
        draft exists. Items re-queued by an operator's retry round have not started yet.
        """
        if self.status == ItemStatus.PROCESSING.value:
            return True
        if self.status != ItemStatus.QUEUED.value or not self.history or self.never_claimed:
            return False
        return not str(self.history[-1].get("owner") or "").startswith(RETRY_OWNER_PREFIX)

    def history_with(self, entry: dict) -> list[dict]:
        """The history as it is after `entry`, keeping the newest ITEM_HISTORY_LIMIT entries."""
        return [*self.history, entry][-ITEM_HISTORY_LIMIT:]


@dataclass(frozen=True)
class Job:
    """A typed view of one `jobs/{job_id}` document; `doc` keeps every stored field."""

    job_id: str
    status: str
    round: int
    options: dict
    totals: dict | None
    fanout_done_at: dt.datetime | None
    retry: dict
    doc: dict = field(repr=False, compare=False)

    @classmethod
    def from_doc(cls, doc: dict, job_id: str = "") -> "Job":
        return cls(
            job_id=str(doc.get("job_id") or job_id),
            status=str(doc.get("status") or ""),
            round=int(doc.get("round") or 1),
            options=dict(doc.get("options") or {}),
            totals=doc.get("totals"),
            fanout_done_at=as_utc(doc.get("fanout_done_at")),
            retry=dict(doc.get("retry") or {}),
            doc=dict(doc),
        )

    @property
    def total_items(self) -> int | None:
        items = (self.totals or {}).get("items")
        return None if items is None else int(items)

    @property
    def resumed_at(self) -> dt.datetime | None:
        """When an operator last resumed the job: its open items' retry windows restart there."""
        return as_utc(self.doc.get("resumed_at"))

    @property
    def item_lane(self) -> str:
        """The lane its item tasks go to, decided once at planning (`shared.ingest`); a job planned
        before lanes existed (no field) is bulk, where its tasks have always been."""
        from shared.config import BULK_LANE

        return str(self.doc.get("item_lane") or BULK_LANE)

    @property
    def retry_enqueuing(self) -> bool:
        """An operator's retry round of this job's current round is still re-queueing items."""
        return self.retry.get("state") == RETRY_ENQUEUING and int(self.retry.get("round") or 0) == self.round


# `jobs/{id}.retry.state` while an operator's retry round re-queues failed items, then when done.
RETRY_ENQUEUING = "enqueuing"
RETRY_DONE = "done"

_TERMINAL_VALUES = frozenset(s.value for s in TERMINAL_ITEM_STATUSES)


def started_in_current_round(item: dict) -> bool:
    """`Item.started_in_current_round` for a stored item dict."""
    return Item.from_doc(item).started_in_current_round()
