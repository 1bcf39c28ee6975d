"""Job transitions as pure functions: (the job as read, inputs) → (what happened, the write to make).

A store runs each inside one transaction (`Store.transact_job`), so a job moves to a final status
once, whichever of several racing callers gets there first; the event that records the move is
written in the same transaction.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from shared.config import settings
from shared.events import Event
from shared.exceptions import ConflictError, NotFoundError
from shared.model import PROGRESS_CHECK_UNTIL, RETRY_DONE, RETRY_ENQUEUING, ItemStatus, Job, JobStatus, as_utc

TOTAL_KEYS = ("lines", "items", "invalid", "duplicate", "skipped")

# A job may be completed from these states once fan-out is done (ingest flips to running at fan-out);
# never from `paused`: a paused job whose items are all final completes after its resume.
COMPLETABLE = frozenset({JobStatus.RUNNING.value, JobStatus.INGESTING.value})
# A job that has not finished: it may be cancelled (or fail) from any of these.
CANCELLABLE = frozenset({JobStatus.INGESTING.value, JobStatus.RUNNING.value, JobStatus.PAUSED.value})
PAUSABLE = frozenset({JobStatus.INGESTING.value, JobStatus.RUNNING.value})


@dataclass(frozen=True)
class JobWrite:
    """Fields to update on the job document and events to record, in one transaction."""

    fields: dict[str, Any]
    events: tuple[Event, ...] = ()


def job_not_found(job_id: str) -> NotFoundError:
    return NotFoundError(f"job {job_id!r} not found", code="job_not_found")


# --------------------------------------------------------------------------------------------- ingest


def fail(job: Job | None, error: dict, at: dt.datetime) -> tuple[dict, JobWrite | None]:
    """The file cannot be processed: an ingesting or running job → failed (once)."""
    doc = dict(job.doc) if job else {}
    if job is None or job.status not in CANCELLABLE:
        return doc, None
    fields = {"status": JobStatus.FAILED.value, "error": error, "completed_at": at, "updated_at": at}
    event = Event("failed", "ingest", at, {"error": error}, event_id="failed")
    return {**doc, **fields}, JobWrite(fields, (event,))


def finish_fanout(job: Job | None, chunks: list[dict], at: dt.datetime) -> tuple[dict | None, JobWrite | None]:
    """Every chunk is done: sum their totals into the job once, mark fan-out done, start running."""
    if job is None or job.fanout_done_at is not None:
        return None, None
    totals = {k: 0 for k in TOTAL_KEYS}
    for chunk in chunks:
        for k, v in (chunk.get("totals") or {}).items():
            totals[k] = totals.get(k, 0) + int(v)
    fields: dict[str, Any] = {"totals": totals, "fanout_done_at": at, "last_progress_at": at, "updated_at": at}
    if job.status == JobStatus.INGESTING.value:
        fields["status"] = JobStatus.RUNNING.value
    elif job.status == JobStatus.PAUSED.value and (job.doc.get("pause") or {}).get("previous_status") == \
            JobStatus.INGESTING.value:
        # Paused while ingesting: fan-out still finishes, and a resume returns it to running.
        fields["pause"] = {**job.doc["pause"], "previous_status": JobStatus.RUNNING.value}
    event = Event("fanout_done", "ingest", at, {"totals": totals}, event_id="fanout_done")
    return {**job.doc, **fields}, JobWrite(fields, (event,))


# --------------------------------------------------------------------------------------------- progress


@dataclass(frozen=True)
class Completion:
    """What a completion check did: the final status it wrote (None: not completable, or another
    check won) and the job as its transaction read it (for the job-finished note)."""

    final: str | None
    job: Job | None


def begin_progress_check(job: Job | None, at: dt.datetime,
                         until: dt.datetime) -> tuple[tuple[Job | None, bool], JobWrite | None]:
    """(the job, True) and the job held for this check until `until`, unless another check holds it
    past `at` (then (the job, False), no write). A job's items are counted by one check at a time:
    a count costs time in proportion to the job's items, and checks asked for every few seconds
    would otherwise overlap and add up on a large job. A finished job is not held (nothing to finish)."""
    if job is None or job.status not in CANCELLABLE:
        return (job, True), None
    held = job.doc.get(PROGRESS_CHECK_UNTIL)
    if held is not None and as_utc(held) > as_utc(at):
        return (job, False), None
    return (job, True), JobWrite({PROGRESS_CHECK_UNTIL: until})


def complete(job: Job | None, counts: dict[str, int], at: dt.datetime) -> tuple[Completion, JobWrite | None]:
    """Move a job whose items are all final to completed / completed_with_failures, once."""
    if job is None or job.status not in COMPLETABLE or job.fanout_done_at is None:
        return Completion(None, job), None
    # An operator retry round is re-queueing failed items: they still look terminal until it is done.
    if job.retry.get("state") == RETRY_ENQUEUING:
        return Completion(None, job), None
    final = JobStatus.COMPLETED_WITH_FAILURES if counts.get(ItemStatus.FAILED.value, 0) else JobStatus.COMPLETED
    fields = {"status": final.value, "counts": counts, "completed_at": at, "last_progress_at": at, "updated_at": at,
              PROGRESS_CHECK_UNTIL: None}
    event = Event("completed", "progress_check", at,
                  {"status": final.value, "counts": counts, "total_items": (job.totals or {}).get("items")})
    return Completion(final.value, job), JobWrite(fields, (event,))


# --------------------------------------------------------------------------------------------- operators


def cancel(job: Job | None, job_id: str, actor: str, at: dt.datetime) -> tuple[bool, JobWrite | None]:
    """ingesting/running → cancelled (True); already cancelled → False; finished → ConflictError."""
    if job is None:
        raise job_not_found(job_id)
    if job.status == JobStatus.CANCELLED.value:
        return False, None
    if job.status not in CANCELLABLE:
        raise ConflictError(f"job {job_id!r} is already {job.status}; a finished job cannot be cancelled",
                            code="job_finished")
    fields = {"status": JobStatus.CANCELLED.value, "cancelled_at": at, "updated_at": at}
    return True, JobWrite(fields, (Event("cancelled", actor, at, {"previous_status": job.status}),))


@dataclass(frozen=True)
class PauseResult:
    """`changed`: this transaction paused (or resumed) the job; `status`: the job's status after it."""

    changed: bool
    status: str
    job: Job | None = None
    # Not paused because an operator resumed the job after the evidence for this pause was gathered
    # (e.g. a 401 from a call made before the key was fixed): the evidence is stale, not the job.
    stale_evidence: bool = False


def pause(job: Job | None, job_id: str, reason: dict, actor: str, at: dt.datetime,
          evidence_at: dt.datetime | None = None) -> tuple[PauseResult, JobWrite | None]:
    """ingesting/running → paused, recording why (`reason` {code, message}), by whom and the status to
    resume to. Already paused or finished: nothing changes (the caller decides whether that is an error).
    `evidence_at`: when what calls for the pause began (the failing call's attempt); a job an operator
    resumed after that is not paused again by it."""
    if job is None:
        raise job_not_found(job_id)
    if job.status not in PAUSABLE:
        return PauseResult(False, job.status, job), None
    resumed_at = job.doc.get("resumed_at")
    if evidence_at is not None and resumed_at is not None and as_utc(resumed_at) > as_utc(evidence_at):
        return PauseResult(False, job.status, job, stale_evidence=True), None
    reason = {"code": str(reason.get("code") or "paused"), "message": str(reason.get("message") or "")}
    fields = {
        "status": JobStatus.PAUSED.value, "paused_at": at, "updated_at": at,
        "pause": {**reason, "actor": actor, "previous_status": job.status, "paused_at": at},
    }
    event = Event("paused", actor, at, {**reason, "previous_status": job.status})
    return PauseResult(True, JobStatus.PAUSED.value, job), JobWrite(fields, (event,))


def resume(job: Job | None, job_id: str, actor: str, at: dt.datetime) -> tuple[PauseResult, JobWrite | None]:
    """paused → the status it was paused from, `resumed_at` = now (open items' retry windows restart
    there). Not paused: nothing changes."""
    if job is None:
        raise job_not_found(job_id)
    if job.status != JobStatus.PAUSED.value:
        return PauseResult(False, job.status, job), None
    pause_doc = dict(job.doc.get("pause") or {})
    previous = pause_doc.get("previous_status")
    status = previous if previous in PAUSABLE else JobStatus.RUNNING.value
    fields = {"status": status, "resumed_at": at, "updated_at": at, "last_progress_at": at}
    event = Event("resumed", actor, at, {"status": status, "paused_code": pause_doc.get("code"),
                                         "paused_at": pause_doc.get("paused_at")})
    return PauseResult(True, status, job), JobWrite(fields, (event,))


def refuse_unless_retryable(job_id: str, job: Job) -> None:
    """Why a job's failed items cannot be retried now, as a ConflictError; nothing if they can."""
    if job.status in CANCELLABLE:
        raise ConflictError(f"job {job_id!r} is still {job.status}; retry-failed runs only after the job has "
                            "finished", code="job_not_final")
    if job.status == JobStatus.CANCELLED.value:
        raise ConflictError(f"job {job_id!r} was cancelled; its failed items are not retried",
                            code="job_cancelled")
    if job.status == JobStatus.FAILED.value:
        raise ConflictError(f"job {job_id!r} failed as a whole ({(job.doc.get('error') or {}).get('message', 'no items')}); "
                            "there are no failed items to retry", code="job_failed")
    rounds_used = job.round - 1
    limit = settings().max_retry_rounds
    if rounds_used >= limit:
        raise ConflictError(f"job {job_id!r} has used all {limit} retry rounds (now in round "
                            f"{rounds_used + 1}); retry-failed is refused", code="retry_rounds_exhausted")


@dataclass(frozen=True)
class RetryRound:
    round: int
    resumed: bool


def begin_retry_round(job: Job | None, job_id: str, actor: str, at: dt.datetime,
                      failed: int) -> tuple[RetryRound, JobWrite | None]:
    """Start round r+1 (the job runs again), or resume round r when its enqueuing was interrupted."""
    if job is None:
        raise job_not_found(job_id)
    if job.retry_enqueuing:
        return RetryRound(job.round, resumed=True), None
    refuse_unless_retryable(job_id, job)
    new_round = job.round + 1
    fields = {
        "round": new_round,
        "status": JobStatus.RUNNING.value,
        "completed_at": None,
        "updated_at": at,
        "retry": {"round": new_round, "state": RETRY_ENQUEUING, "items": failed, "actor": actor,
                  "started_at": at, "done_at": None, "previous_status": job.status},
    }
    event = Event("retry_round", actor, at, {"round": new_round, "items": failed, "previous_status": job.status})
    return RetryRound(new_round, resumed=False), JobWrite(fields, (event,))


def finish_retry_round(job: Job | None, round_: int, at: dt.datetime, requeued: int,
                       created: int) -> tuple[bool, JobWrite | None]:
    """The round's items are all re-queued with their tasks: completion checks may count it again."""
    if job is None or int(job.retry.get("round") or 0) != round_ or job.retry.get("state") != RETRY_ENQUEUING:
        return False, None
    retry = {**job.retry, "state": RETRY_DONE, "done_at": at, "requeued": requeued, "tasks_created": created}
    return True, JobWrite({"retry": retry, "updated_at": at})


# --------------------------------------------------------------------------------------------- re-drive


def refuse_unless_redrivable(job_id: str, job: Job | None) -> None:
    """Why an operator's re-drive of a job's stranded items cannot run now, as an error; nothing if it can.

    A finished job is never touched (its items are final or deliberately left: a cancelled job's tasks
    drain as no-ops). While ingesting, fan-out is still creating the items' tasks; while a retry round is
    enqueuing, retry-failed itself resumes it. A paused job may be re-driven: its deliveries back off."""
    if job is None:
        raise job_not_found(job_id)
    status = job.status
    if status in {s.value for s in JobStatus if s.is_final}:
        raise ConflictError(f"job {job_id!r} is already {status}; a finished job is never re-driven",
                            code="job_finished")
    if status == JobStatus.INGESTING.value:
        raise ConflictError(f"job {job_id!r} is still ingesting: fan-out is creating its items' tasks; re-drive "
                            "runs once fan-out is done", code="job_ingesting")
    if job.retry_enqueuing:
        raise ConflictError(f"job {job_id!r} has retry round {job.round} still enqueuing; run retry-failed again "
                            "to resume it (it creates the round's missing tasks)", code="retry_round_enqueuing")


@dataclass(frozen=True)
class Redrive:
    """An operator's re-drive of a job: its number `n` (1, 2, …; part of the new tasks' names)."""

    n: int


def begin_redrive(job: Job | None, job_id: str, actor: str, at: dt.datetime, items: int) -> tuple[Redrive, JobWrite]:
    """Take the job's next re-drive number, with a `redrive` event naming actor, number and item count."""
    refuse_unless_redrivable(job_id, job)
    n = int((job.doc.get("redrive") or {}).get("n") or 0) + 1
    fields = {"redrive": {"n": n, "actor": actor, "at": at, "items": items}, "updated_at": at}
    event = Event("redrive", actor, at, {"n": n, "items": items, "status": job.status}, event_id=f"redrive-{n}")
    return Redrive(n), JobWrite(fields, (event,))
