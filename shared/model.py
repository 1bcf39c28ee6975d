"""States and document shapes of jobs and items; the one source of truth for field names."""

from __future__ import annotations

import enum


class JobStatus(str, enum.Enum):
    INGESTING = "ingesting"  # job exists, file being planned / chunks fanning out
    RUNNING = "running"  # fan-out done, items in flight
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

ITEM_HISTORY_LIMIT = 8


def started_in_current_round(item: dict) -> bool:
    """Whether a delivery of this round already ran the item's handler (its effect may exist).

    Such an item is finished truthfully even when its job is cancelled: the idempotent handler
    finds its own earlier effect, so the record says `succeeded` rather than `cancelled` while a
    draft exists. Items re-queued by an operator's retry round have not started yet.
    """
    status = item.get("status")
    if status == ItemStatus.PROCESSING.value:
        return True
    if status != ItemStatus.QUEUED.value:
        return False
    history = item.get("history") or []
    return bool(history) and not str(history[-1].get("owner") or "").startswith("retry:")
