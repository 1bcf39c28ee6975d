"""The item state machine as pure functions: (the item as read, inputs) → (what happened, the write to make).

Nothing here touches a store. A store runs a transition inside one transaction
(`Store.transact_item`), so the read and the write it decides are atomic; the same functions run
on Firestore and on the in-memory store the unit tests use.

    (absent) ──claim──▶ processing ──complete ok──▶ succeeded
                 │          │  ├──complete permanent / retry window spent──▶ failed ──operator round──▶ queued
                 │          │  ├──complete retryable (window left)──▶ queued ──claim──▶ processing
                 │          │  └──stop for job: paused──▶ queued (no failure counted) | cancelled──▶ cancelled
                 │          └──lease expired: next claim takes it over (attempt + 1)
                 └──job cancelled──▶ cancelled        queued (not started) ──cancel──▶ cancelled

An item's retry budget is time: its first retryable failure is recorded (`first_failed_at`); a later
retryable failure ends it `failed` once `retry_window_s` has passed since then, or since its job was
last resumed (`window_floor`), whichever is later: a pause never spends an item's budget.
"""

from __future__ import annotations

import datetime as dt
import enum
from dataclasses import dataclass
from typing import Any, Union

from shared.durations import format_duration
from shared.exceptions import ItemError
from shared.model import RETRY_OWNER_PREFIX, Item, ItemStatus, as_utc
from shared.naming import lease_shard_for, task_name_for
from shared.payloads import ItemTask

JOB_CANCELLED_CODE = "job_cancelled"
JOB_PAUSED_CODE = "job_paused"


@dataclass(frozen=True)
class Create:
    """Create the item document (it must not exist)."""

    doc: dict[str, Any]


@dataclass(frozen=True)
class Update:
    """Update these fields of the existing item document."""

    fields: dict[str, Any]


ItemWrite = Union[Create, Update]


def history_entry(status: ItemStatus, attempt: int, owner: str | None, at: dt.datetime,
                  error_code: str | None = None) -> dict[str, Any]:
    return {"status": status.value, "attempt": attempt, "owner": owner, "at": at, "error_code": error_code}


def new_item(task: ItemTask, task_name: str, at: dt.datetime, status: ItemStatus, *, attempt: int, owner: str,
             lease_until: dt.datetime | None = None, error_code: str | None = None) -> dict[str, Any]:
    """An item document: leased (`processing`), already final (`cancelled`), or `queued` (see
    `born_queued`). Items are born at fan-out; older jobs' items were born at their first claim."""
    leased = status is ItemStatus.PROCESSING
    return {
        "job_id": task.job_id,
        "gtin": task.gtin,
        "upc": task.upc,
        "line": task.line,
        "status": status.value,
        "attempt": attempt,
        "round": task.round,
        "lease_owner": owner if leased else None,
        "lease_shard": lease_shard_for(task.gtin),
        "lease_expires_at": lease_until if leased else None,
        "heartbeat_at": at if leased else None,
        "task_name": task_name,
        "error": None,
        "result": None,
        "first_failed_at": None,
        "history": [history_entry(status, attempt, owner, at, error_code)],
        "created_at": at,
        "updated_at": at,
        "finished_at": None if leased else at,
    }


def born_queued(task: ItemTask, task_name: str, at: dt.datetime, *, owner: str) -> dict[str, Any]:
    """An item document as born at fan-out: `queued`, attempt 0 (never claimed), before its task
    exists. Created with create-if-absent, it is the durable record of which line owns the GTIN
    (duplicate-in-file is decided from it, not from task-name tombstones); its first claim makes
    attempt 1. `owner` names the chunk that created it."""
    return {**new_item(task, task_name, at, ItemStatus.QUEUED, attempt=0, owner=owner), "finished_at": None}


# --------------------------------------------------------------------------------------------- claim


class ClaimKind(str, enum.Enum):
    CLAIMED = "claimed"
    BUSY = "busy"  # another delivery holds a live lease
    CONTENDED = "contended"  # other deliveries kept the item's lock: the claim transaction gave up
    TERMINAL = "terminal"  # already succeeded / failed / cancelled
    STALE_ROUND = "stale_round"  # delivery of an older round than the item's
    UNKNOWN_STATE = "unknown_state"


@dataclass(frozen=True)
class Claim:
    kind: ClaimKind
    status: str | None = None
    attempt: int = 0
    round: int = 0
    previous_owner: str | None = None
    lease_expires_at: dt.datetime | None = None
    reclaimed: bool = False
    created: bool = False


def claim(item: Item | None, task: ItemTask, task_name: str, owner: str, at: dt.datetime,
          lease_until: dt.datetime) -> tuple[Claim, ItemWrite | None]:
    """Take the item's lease for this delivery, creating the item on its first claim."""
    if item is None:
        doc = new_item(task, task_name, at, ItemStatus.PROCESSING, attempt=1, owner=owner, lease_until=lease_until)
        return Claim(ClaimKind.CLAIMED, ItemStatus.PROCESSING.value, 1, task.round, created=True,
                     lease_expires_at=lease_until), Create(doc)
    if task.round < item.round:
        return Claim(ClaimKind.STALE_ROUND, item.status, item.attempt, item.round), None
    if item.is_final:
        return Claim(ClaimKind.TERMINAL, item.status, item.attempt, item.round), None
    if item.status == ItemStatus.PROCESSING.value:
        if item.leased_at(at) and item.lease_owner != owner:
            return Claim(ClaimKind.BUSY, item.status, item.attempt, item.round, item.lease_owner,
                         item.lease_expires_at), None
    elif item.status != ItemStatus.QUEUED.value:
        return Claim(ClaimKind.UNKNOWN_STATE, item.status, item.attempt, item.round), None

    attempt = item.attempt + 1
    new_round = max(item.round, task.round)
    update = Update({
        "status": ItemStatus.PROCESSING.value,
        "attempt": attempt,
        "round": new_round,
        "lease_owner": owner,
        # Items born before the shard existed get it at their next claim, before they can overrun.
        "lease_shard": lease_shard_for(item.gtin),
        "lease_expires_at": lease_until,
        "heartbeat_at": at,
        "task_name": task_name,
        "updated_at": at,
        "history": item.history_with(history_entry(ItemStatus.PROCESSING, attempt, owner, at)),
    })
    return Claim(ClaimKind.CLAIMED, ItemStatus.PROCESSING.value, attempt, new_round,
                 previous_owner=item.lease_owner, lease_expires_at=lease_until,
                 reclaimed=item.status == ItemStatus.PROCESSING.value), update


def extend_lease(item: Item | None, owner: str, at: dt.datetime, lease_until: dt.datetime) -> tuple[bool, ItemWrite | None]:
    """Heartbeat: push the lease forward if this delivery still owns the processing item."""
    if item is None or item.status != ItemStatus.PROCESSING.value or item.lease_owner != owner:
        return False, None
    return True, Update({"lease_expires_at": lease_until, "heartbeat_at": at})


# --------------------------------------------------------------------------------------------- cancel


class CancelKind(str, enum.Enum):
    CANCELLED = "cancelled"
    TERMINAL = "terminal"  # already final
    BUSY = "busy"  # a live lease will complete it
    STARTED = "started"  # an earlier delivery ran the handler: finish it through the normal claim instead
    NOT_QUEUED = "not_queued"  # (operator cancel) only queued items are cancelled by an operator


def cancelled_update(item: Item, at: dt.datetime, owner: str | None, error_code: str | None) -> Update:
    """The one way an existing item becomes `cancelled` (worker and operator cancels alike)."""
    return Update({
        "status": ItemStatus.CANCELLED.value,
        "lease_owner": None,
        "lease_expires_at": None,
        "updated_at": at,
        "finished_at": at,
        "history": item.history_with(history_entry(ItemStatus.CANCELLED, item.attempt, owner, at, error_code)),
    })


def cancel_for_cancelled_job(item: Item | None, task: ItemTask, task_name: str, owner: str,
                             at: dt.datetime) -> tuple[CancelKind, ItemWrite | None]:
    """A delivery for a cancelled job: record the item as cancelled unless it is final, leased by a
    live delivery, or already started in this round (then it is finished truthfully)."""
    if item is None:
        return CancelKind.CANCELLED, Create(new_item(task, task_name, at, ItemStatus.CANCELLED, attempt=0,
                                                     owner=owner, error_code=JOB_CANCELLED_CODE))
    if item.status == ItemStatus.PROCESSING.value:
        if item.leased_at(at):
            return CancelKind.BUSY, None
    elif item.status != ItemStatus.QUEUED.value:
        return CancelKind.TERMINAL, None
    if item.started_in_current_round():
        return CancelKind.STARTED, None
    return CancelKind.CANCELLED, cancelled_update(item, at, owner, JOB_CANCELLED_CODE)


def cancel_queued(item: Item | None, at: dt.datetime) -> tuple[CancelKind, ItemWrite | None]:
    """An operator's cancel of a job: a queued item that has not started in this round is cancelled."""
    if item is None or item.status != ItemStatus.QUEUED.value:
        return CancelKind.NOT_QUEUED, None
    if item.started_in_current_round():
        return CancelKind.STARTED, None
    return CancelKind.CANCELLED, cancelled_update(item, at, None, JOB_CANCELLED_CODE)


# --------------------------------------------------------------------------------------------- complete


@dataclass(frozen=True)
class HandlerOutcome:
    """What the handler produced: a result, or an `ItemError`; with a retryable error, the item's
    retry window (`retry_window_s`, counted from its first failure or `window_floor`, the job's last
    resume, whichever is later) decides between queued and failed."""

    result: dict[str, Any] | None = None
    error: ItemError | None = None
    retry_window_s: float | None = None  # None: settings().item_retry_window_s
    window_floor: dt.datetime | None = None


class CompleteKind(str, enum.Enum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    REQUEUED = "requeued"
    LEASE_LOST = "lease_lost"  # another delivery holds or re-queued the item: it is still open
    FINISHED_ELSEWHERE = "finished_elsewhere"  # another delivery already brought it to a final status


def retry_window_start(item: Item, at: dt.datetime, floor: dt.datetime | None) -> dt.datetime:
    """When the item's current retry window began: its first failure (`at` if this is it), moved up to
    the job's last resume, so the time a job spent paused is never charged to its items."""
    first = as_utc(item.doc.get("first_failed_at")) or at
    floor = as_utc(floor)
    return max(first, floor) if floor else first


def _window_s(outcome: HandlerOutcome) -> float:
    if outcome.retry_window_s is not None:
        return outcome.retry_window_s
    from shared.config import settings  # lazy: the pure transitions need settings only for the default

    return settings().item_retry_window_s


def complete(item: Item | None, owner: str, at: dt.datetime, outcome: HandlerOutcome) -> tuple[CompleteKind, ItemWrite | None]:
    """Write the handler's outcome, only if this delivery still owns the processing item."""
    if item is not None and item.is_final:
        return CompleteKind.FINISHED_ELSEWHERE, None
    if item is None or item.status != ItemStatus.PROCESSING.value or item.lease_owner != owner:
        return CompleteKind.LEASE_LOST, None
    fields: dict[str, Any] = {"updated_at": at, "lease_expires_at": None}
    error = outcome.error
    if error is None:
        kind, status, error_code = CompleteKind.SUCCEEDED, ItemStatus.SUCCEEDED, None
        fields.update({"result": outcome.result or {}, "error": None, "finished_at": at})
    else:
        error_code = error.code
        message = error.message
        if error.retryable:
            if not item.doc.get("first_failed_at"):
                fields["first_failed_at"] = at
            window_s = _window_s(outcome)
            spent = (at - retry_window_start(item, at, outcome.window_floor)).total_seconds()
            window_left = spent < window_s
        else:
            window_left = False
        if window_left:
            kind, status = CompleteKind.REQUEUED, ItemStatus.QUEUED
            fields["lease_owner"] = None
        else:
            kind, status = CompleteKind.FAILED, ItemStatus.FAILED
            fields["finished_at"] = at
            if error.retryable:
                message = (f"retry window of {format_duration(window_s)} spent after {item.attempt} attempts; "
                           f"last error: {message}")
        fields["error"] = {"code": error.code, "message": message, "retryable": error.retryable}
    fields["status"] = status.value
    fields["history"] = item.history_with(history_entry(status, item.attempt, owner, at, error_code))
    return kind, Update(fields)


# --------------------------------------------------------------------------------------------- stop for the job


class StopKind(str, enum.Enum):
    RELEASED = "released"  # paused job: back to queued, no failure counted, the task retries later
    CANCELLED = "cancelled"  # cancelled job: finished as cancelled
    LEASE_LOST = "lease_lost"
    FINISHED_ELSEWHERE = "finished_elsewhere"


def stop_for_job(item: Item | None, owner: str, at: dt.datetime, *, cancelled: bool,
                 side_effects_started: bool = False) -> tuple[StopKind, ItemWrite | None]:
    """The handler stopped before a side effect because its job is now paused (→ queued, neither an
    attempt's failure nor its retry window charged) or cancelled (→ cancelled)."""
    if item is not None and item.is_final:
        return StopKind.FINISHED_ELSEWHERE, None
    if item is None or item.status != ItemStatus.PROCESSING.value or item.lease_owner != owner:
        return StopKind.LEASE_LOST, None
    if cancelled:
        update = cancelled_update(item, at, owner, JOB_CANCELLED_CODE)
        # Effects of this delivery before the stop may exist (e.g. an inventory upsert before the offer).
        return StopKind.CANCELLED, Update({**update.fields, "cancelled_midway": side_effects_started})
    return StopKind.RELEASED, Update({
        "status": ItemStatus.QUEUED.value, "lease_owner": None, "lease_expires_at": None, "updated_at": at,
        "history": item.history_with(history_entry(ItemStatus.QUEUED, item.attempt, owner, at, JOB_PAUSED_CODE)),
    })


# --------------------------------------------------------------------------------------------- retry round


def requeue_for_round(item: Item | None, job_id: str, round_: int, at: dt.datetime,
                      actor: str) -> tuple[bool, ItemWrite | None]:
    """An operator's retry round: a failed item of an earlier round → queued in `round_`."""
    if item is None or item.status != ItemStatus.FAILED.value or item.round >= round_:
        return False, None
    error = item.doc.get("error") or {}
    entry = history_entry(ItemStatus.QUEUED, item.attempt, f"{RETRY_OWNER_PREFIX}{actor}", at, error.get("code"))
    # The error stays on the item (and in history) until the new round overwrites it.
    # A new round is a new retry window (`first_failed_at` cleared).
    return True, Update({
        "status": ItemStatus.QUEUED.value, "round": round_, "updated_at": at, "finished_at": None,
        "first_failed_at": None,
        "task_name": task_name_for(job_id, item.gtin, round_),
        "lease_owner": None, "lease_expires_at": None, "history": item.history_with(entry),
    })
