"""What a delivery answers Cloud Tasks, in one place.

The rule that keeps every item driven to a final status: a delivery answers 2xx only when the item
is final (or belongs to a newer round, or can never run). Any delivery's 2xx may end the task, and
the task is the only thing that ever re-drives its item; so "someone else holds it" is a 409, never
a 200: that someone may die, or re-queue the item, after the task is gone. A re-queued item answers
503 so Cloud Tasks backs off before the next attempt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shared.item_state import Claim, CompleteKind
from shared.payloads import ItemTask

OK, HELD, RETRY_LATER = 200, 409, 503

# The item status each completion leaves, as answered and logged.
STATUS_AFTER_COMPLETE = {
    CompleteKind.SUCCEEDED: "succeeded",
    CompleteKind.FAILED: "failed",
    CompleteKind.REQUEUED: "queued",
    CompleteKind.LEASE_LOST: "lease_lost",
    CompleteKind.FINISHED_ELSEWHERE: "finished_elsewhere",
}
_HTTP_AFTER_COMPLETE = {CompleteKind.REQUEUED: RETRY_LATER, CompleteKind.LEASE_LOST: HELD}


@dataclass(frozen=True)
class WorkerOutcome:
    """What the HTTP entry point answers: 200 done/no-op, 409 held elsewhere, 503 retry later."""

    http_status: int
    body: dict[str, Any]


def ids(task: ItemTask) -> dict[str, Any]:
    return {"job_id": task.job_id, "gtin": task.gtin}


def bad_payload(message: str) -> WorkerOutcome:
    # 200: a malformed task can never succeed, so it must not be retried.
    return WorkerOutcome(OK, {"status": "bad_payload", "error": {"code": "bad_payload", "message": message}})


def done(task: ItemTask, status: str, **extra: Any) -> WorkerOutcome:
    return WorkerOutcome(OK, {"status": status, **extra, **ids(task)})


def held(task: ItemTask, *, reason: str, claim: Claim | None = None) -> WorkerOutcome:
    """Another delivery holds the item (or its lock): the task must stay."""
    body: dict[str, Any] = {"status": "busy", "reason": reason, **ids(task)}
    if claim is not None and claim.previous_owner:
        body["holder"] = claim.previous_owner
    if claim is not None and claim.lease_expires_at:
        body["lease_expires_at"] = str(claim.lease_expires_at)
    return WorkerOutcome(HELD, body)


def lease_lost(task: ItemTask) -> WorkerOutcome:
    return WorkerOutcome(HELD, {"status": "lease_lost", **ids(task)})


def after_complete(task: ItemTask, kind: CompleteKind, attempt: int, error: dict | None,
                   result: dict | None) -> WorkerOutcome:
    body: dict[str, Any] = {"status": STATUS_AFTER_COMPLETE[kind], "attempt": attempt, **ids(task)}
    if error and kind not in (CompleteKind.LEASE_LOST, CompleteKind.FINISHED_ELSEWHERE):
        body["error"] = error
    if kind is CompleteKind.SUCCEEDED:
        body["result"] = result
    return WorkerOutcome(_HTTP_AFTER_COMPLETE.get(kind, OK), body)


def paused(task: ItemTask, **extra: Any) -> WorkerOutcome:
    """The item's job is paused: 503 so Cloud Tasks backs off; the item's retry budget is not spent."""
    return WorkerOutcome(RETRY_LATER, {"status": "job_paused", **extra, **ids(task)})


def delivery_error(task: ItemTask, code: str, message: str) -> WorkerOutcome:
    """A store fault or a bug: 503 so Cloud Tasks tries again later."""
    return WorkerOutcome(RETRY_LATER, {"status": "error", "error": {"code": code, "message": message}, **ids(task)})
