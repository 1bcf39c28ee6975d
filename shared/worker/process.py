"""One delivery of an item task: claim (lease) → handler with heartbeats → complete; two transactions."""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass
from typing import Any, Mapping

from google.api_core import exceptions as gexc
from pydantic import ValidationError

from shared import breaker
from shared.config import settings
from shared.exceptions import BadRequestError, ItemError, LeaseLostError, PermanentItemError, RetryableItemError
from shared.handlers import ItemContext, ItemHandler, handler_for
from shared.handlers.base import HANDLER_BUDGET_S
from shared.item_state import CancelKind, Claim, ClaimKind, CompleteKind, HandlerOutcome, StopKind
from shared.log import log_event
from shared.model import ItemStatus, Job, JobStatus
from shared.payloads import ItemTask, describe_validation_error
from shared.retry import is_contention
from shared.store import Store, default_store
from shared.worker import answers
from shared.worker.answers import WorkerOutcome
from shared.worker.delivery import Clock, TaskDelivery, utc
from shared.worker.job_cache import JOB_CACHE
from shared.worker.lanes import LANE_PRIORITY
from shared.worker.lease import Heartbeat, last_attempt_wait_s, while_held
from shared.worker.progress_requests import request_progress_check

_COMPLETE_SEVERITY = {CompleteKind.SUCCEEDED: "INFO", CompleteKind.FAILED: "ERROR"}


@dataclass(frozen=True)
class _Run:
    """Everything one delivery works with, passed between its steps."""

    task: ItemTask
    delivery: TaskDelivery
    clock: Clock
    store: Store
    lease_s: float
    heartbeat_s: float
    fields: dict[str, Any]

    def lease_until(self, now: float) -> tuple[dt.datetime, dt.datetime]:
        return utc(now), utc(now + self.lease_s)

    @property
    def wait_s(self) -> float:
        return last_attempt_wait_s(self.lease_s) if self.delivery.last_attempt else 0.0


def process_item_delivery(
    payload: Any,
    headers: Mapping[str, str] | None,
    now: float | dt.datetime | None = None,
    *,
    handler: ItemHandler | None = None,
    store: Store | None = None,
    lease_s: float | None = None,
    heartbeat_s: float | None = None,
) -> WorkerOutcome:
    """Process one Cloud Tasks delivery of an item task. Never raises; the outcome is the HTTP answer."""
    try:
        task = ItemTask.model_validate(payload)
    except ValidationError as exc:
        message = f"item task payload is malformed and can never succeed: {describe_validation_error(exc)}"
        log_event("bad_payload", severity="ERROR", error_code="bad_payload", message_detail=message)
        return answers.bad_payload(message)

    s = settings()
    delivery = TaskDelivery.from_headers(headers, s.item_max_attempts)
    run = _Run(task, delivery, Clock(now), store or default_store(), lease_s or s.lease_s,
               heartbeat_s or s.heartbeat_s,
               {"job_id": task.job_id, "gtin": task.gtin, "owner": delivery.owner, "round": task.round})
    try:
        return _deliver(run, handler)
    except Exception as exc:  # store faults and bugs: answer 503 so Cloud Tasks tries again later
        code = "store_unavailable" if isinstance(exc, gexc.GoogleAPICallError) else "worker_error"
        message = f"worker could not process the delivery: {type(exc).__name__}: {exc}"
        log_event("delivery_error", severity="ERROR", error_code=code, error=message, **run.fields)
        return answers.delivery_error(task, code, message)


def _deliver(run: _Run, handler: ItemHandler | None) -> WorkerOutcome:
    job = JOB_CACHE.get(run.store, run.task.job_id)
    if job is None:
        log_event("job_missing", severity="WARNING", status="noop", **run.fields)
        return answers.done(run.task, "job_missing")
    # A failed job (its file's generation vanished mid-ingest) runs no side effect either: its items
    # end like a cancelled job's.
    if job.status in (JobStatus.CANCELLED.value, JobStatus.FAILED.value):
        answer = _for_cancelled_job(run)
        if answer is not None:
            return answer
    if job.status == JobStatus.PAUSED.value:
        # No claim, so neither an attempt nor the item's retry window is spent: Cloud Tasks backs off
        # (up to the queue's max_backoff) until an operator resumes or cancels the job.
        log_event("delivery_job_paused", status="paused", **run.fields)
        return answers.paused(run.task)
    # Small jobs' deliveries go first in this process; a bulk one waits for them before its claim
    # (shared/worker/lanes.py).
    with LANE_PRIORITY.turn(job.item_lane) as yielded_s:
        return _claim_and_run(run, job, handler, yielded_s=yielded_s)


def _claim_and_run(run: _Run, job: Job, handler: ItemHandler | None, *, yielded_s: float) -> WorkerOutcome:
    claim = _claim(run)
    if claim.kind is not ClaimKind.CLAIMED:
        return _not_claimed(run, claim)
    fields = {**run.fields, "attempt": claim.attempt}
    log_event("item_claimed", status=ItemStatus.PROCESSING.value, created=claim.created,
              reclaimed_from=claim.previous_owner if claim.reclaimed else None,
              retry_count=run.delivery.retry_count, execution_count=run.delivery.execution_count,
              yielded_ms=int(yielded_s * 1000) if yielded_s else None, **fields)
    return _run_and_complete(run, job, claim, handler, fields)


def _for_cancelled_job(run: _Run) -> WorkerOutcome | None:
    """A cancelled job's item is cancelled unless final or held; None when its handler already ran in
    this round (then the normal claim finishes it truthfully: its effect may exist)."""
    now = run.clock()
    result = while_held(
        lambda: run.store.cancel_item_of_cancelled_job(run.task, run.delivery.task_name, run.delivery.owner,
                                                       run.clock.at()),
        lambda r: r is CancelKind.BUSY, run.wait_s, run.fields)
    if result is CancelKind.STARTED:
        log_event("cancelled_job_item_finishing", status="started", **run.fields)
        return None
    log_event("item_cancelled" if result is CancelKind.CANCELLED else "cancel_noop",
              severity="WARNING" if result is CancelKind.BUSY else "INFO", status=result.value, **run.fields)
    if result is CancelKind.BUSY:
        return answers.held(run.task, reason="leased")
    if result is CancelKind.CANCELLED:
        request_progress_check(run.task.job_id, now)
    return answers.done(run.task, result.value)


def _claim(run: _Run) -> Claim:
    def attempt() -> Claim:
        at, until = run.lease_until(run.clock())
        try:
            return run.store.claim_item(run.task, run.delivery.task_name, run.delivery.owner, at, until)
        except Exception as exc:
            if not is_contention(exc):
                raise
            # Other deliveries of this item hold its lock right now; one of them will own it.
            log_event("claim_contended", severity="WARNING", error=f"{type(exc).__name__}: {exc}", **run.fields)
            return Claim(ClaimKind.CONTENDED)

    return while_held(attempt, lambda c: c.kind in (ClaimKind.BUSY, ClaimKind.CONTENDED), run.wait_s, run.fields)


def _not_claimed(run: _Run, claim: Claim) -> WorkerOutcome:
    fields = {**run.fields, "attempt": claim.attempt}
    if claim.kind is ClaimKind.CONTENDED:
        return answers.held(run.task, reason="contended")
    if claim.kind is ClaimKind.BUSY:
        log_event("claim_busy", severity="WARNING" if run.delivery.last_attempt else "INFO", status=claim.status,
                  holder=claim.previous_owner, lease_expires_at=claim.lease_expires_at,
                  last_attempt=run.delivery.last_attempt, **fields)
        return answers.held(run.task, reason="leased", claim=claim)
    log_event(f"claim_{claim.kind.value}", status=claim.status, item_round=claim.round, **fields)
    return answers.done(run.task, "noop", reason=claim.kind.value, item_status=claim.status)


class JobGuard:
    """Whether the item's job still lets this delivery make side effects: a fresh read of the job (at
    most once per `interval_s`, the first check always reads) that turns False for good once the job is
    cancelled or paused. The handler asks right before each side effect (through `item.heartbeat()`)."""

    def __init__(self, store: Store, job_id: str, interval_s: float = 1.0):
        self._store, self._job_id, self._interval_s = store, job_id, interval_s
        self._next_read = 0.0
        self.job: Job | None = None
        self.stopped_by: str | None = None  # the job status that stopped the delivery
        self.passed = 0  # checks that allowed a side effect

    def ok(self) -> bool:
        if self.stopped_by:
            return False
        now = time.monotonic()
        if now >= self._next_read:
            self._next_read = now + self._interval_s
            job = self._store.get_job(self._job_id)
            if job is not None:
                self.job = job
                if job.status in (JobStatus.CANCELLED.value, JobStatus.PAUSED.value):
                    self.stopped_by = job.status
                    return False
        self.passed += 1
        return True


def _run_and_complete(run: _Run, job: Job, claim: Claim, handler: ItemHandler | None, fields: dict) -> WorkerOutcome:
    heartbeat = Heartbeat(run.store, run.task.job_id, run.task.gtin, run.delivery.owner, run.clock, run.lease_s,
                          run.heartbeat_s, fields).start()
    guard = JobGuard(run.store, run.task.job_id)

    def may_continue() -> bool:
        return heartbeat.alive() and guard.ok()

    ctx = ItemContext(job_id=run.task.job_id, gtin=run.task.gtin, upc=run.task.upc, line=run.task.line,
                      round=claim.round, attempt=claim.attempt, options=dict(job.options), heartbeat=may_continue,
                      deadline=time.monotonic() + HANDLER_BUDGET_S)
    started = time.monotonic()
    try:
        outcome = _run_handler(handler, ctx, fields)
    finally:
        heartbeat.stop()
    elapsed_ms = int((time.monotonic() - started) * 1000)
    if outcome is None and guard.stopped_by and not heartbeat.known_lost:
        return _stop_for_job(run, guard.stopped_by, guard.passed > 0, fields, elapsed_ms)
    # A heartbeat that gave up for want of renewals only stopped further side effects: the handler's
    # outcome is still written when the lease turns out to have held (the complete transaction checks
    # the owner), so a slow Firestore does not cost a second run of a finished handler.
    if outcome is None or heartbeat.known_lost:
        # The item is another delivery's now (or re-queued): 409 keeps the task, whose next
        # delivery finds the item final (200 no-op) or free to claim.
        log_event("result_discarded", severity="WARNING", status="lease_lost", elapsed_ms=elapsed_ms, **fields)
        return answers.lease_lost(run.task)
    if outcome.error is not None and outcome.error.code in breaker.SYSTEMIC_ERROR_CODES:
        answer = _trip_for_systemic_error(run, outcome, fields, elapsed_ms)
        if answer is not None:
            return answer

    current = guard.job or job
    outcome = HandlerOutcome(result=outcome.result, error=outcome.error, window_floor=current.resumed_at)
    now = run.clock()
    kind = run.store.complete_item(run.task.job_id, run.task.gtin, run.delivery.owner, utc(now), outcome)
    error = outcome.error.to_dict() if outcome.error else None
    if error:
        error.pop("details", None)
    log_event(f"item_{kind.value}", severity=_COMPLETE_SEVERITY.get(kind, "WARNING"),
              status=answers.STATUS_AFTER_COMPLETE[kind], error_code=error["code"] if error else None,
              error=error["message"] if error else None, elapsed_ms=elapsed_ms,
              details=outcome.error.details if outcome.error and outcome.error.details else None,
              **fields)
    if kind in (CompleteKind.SUCCEEDED, CompleteKind.FAILED):
        # The window is named after the commit: `now` (before it) could name a window whose check already ran.
        request_progress_check(run.task.job_id, run.clock())
        _count_for_breaker(run, current, kind, outcome, fields)
    return answers.after_complete(run.task, kind, claim.attempt, error, outcome.result)


def _stop_for_job(run: _Run, job_status: str, side_effects_started: bool, fields: dict,
                  elapsed_ms: int) -> WorkerOutcome:
    """The handler stopped before a side effect because the job is now paused or cancelled: a paused
    job's item goes back to `queued` (no failure counted, 503: the task retries later), a cancelled
    job's item ends `cancelled`."""
    cancelled = job_status == JobStatus.CANCELLED.value
    JOB_CACHE.forget(run.task.job_id)
    now = run.clock()
    kind = run.store.stop_item_for_job(run.task.job_id, run.task.gtin, run.delivery.owner, utc(now),
                                       cancelled=cancelled, side_effects_started=side_effects_started)
    log_event(f"item_stopped_{kind.value}", severity="WARNING", status=kind.value, job_status=job_status,
              side_effects_started=side_effects_started, elapsed_ms=elapsed_ms, **fields)
    if kind is StopKind.RELEASED:
        return answers.paused(run.task, released=True)
    if kind is StopKind.CANCELLED:
        request_progress_check(run.task.job_id, now)
        return answers.done(run.task, "cancelled", reason="job_cancelled")
    if kind is StopKind.FINISHED_ELSEWHERE:
        return answers.done(run.task, "noop", reason=kind.value)
    return answers.lease_lost(run.task)


def _trip_for_systemic_error(run: _Run, outcome: HandlerOutcome, fields: dict, elapsed_ms: int) -> WorkerOutcome | None:
    """A systemic error (the marketplace refused our credentials): pause the job at once, and put the
    item back without charging it (the fault is not the item's). None: the job could not be paused
    (e.g. it finished meanwhile), so the outcome is completed as usual."""
    error = outcome.error
    now = run.clock.at()
    try:
        # The refusal is evidence from when the handler started: an operator who resumed the job since
        # (having fixed the key) must not see it paused again by a call made with the old one.
        result = breaker.pause_job(run.store, run.task.job_id, error.code, error.message,
                                   f"breaker:{run.delivery.owner}", now,
                                   evidence_at=now - dt.timedelta(milliseconds=elapsed_ms))
    except Exception as exc:  # noqa: BLE001 - the fault is still not the item's: put it back, uncharged
        log_event("breaker_pause_failed", severity="ERROR", error=f"{type(exc).__name__}: {exc}"[:300], **fields)
        return _stop_for_job(run, JobStatus.PAUSED.value, True, fields, elapsed_ms)
    if result.status in (JobStatus.PAUSED.value, JobStatus.CANCELLED.value):
        return _stop_for_job(run, result.status, True, fields, elapsed_ms)
    if result.stale_evidence:  # resumed since: back to queued, uncharged, and retried with the fixed key
        return _stop_for_job(run, JobStatus.PAUSED.value, True, fields, elapsed_ms)
    return None


def _count_for_breaker(run: _Run, job: Job, kind: CompleteKind, outcome: HandlerOutcome, fields: dict) -> None:
    """Feed a definite outcome to the job's failure window; pause the job when it trips. Retryable
    errors that spent their window are not counted: only permanent errors say the items are wrong."""
    if kind is CompleteKind.FAILED and (outcome.error is None or outcome.error.retryable):
        return
    try:
        verdict = breaker.record_outcome(run.task.job_id, job.doc.get("resumed_at"),
                                         permanent_failure=kind is CompleteKind.FAILED)
        if not verdict.tripped:
            return
        s = settings()
        message = (f"{verdict.failures} of the job's last {verdict.attempts} finished attempts failed permanently "
                   f"(more than {s.breaker_failure_percent:g}%), latest: {outcome.error.code}: "
                   f"{outcome.error.message}"[:500])
        breaker.pause_job(run.store, run.task.job_id, breaker.FAILURE_RATE, message,
                          f"breaker:{run.delivery.owner}", run.clock.at())
    except Exception as exc:  # noqa: BLE001 - the item is complete; the breaker must not turn that into a 503
        log_event("breaker_failed", severity="ERROR", error=f"{type(exc).__name__}: {exc}"[:300], **fields)


def _run_handler(handler: ItemHandler | None, ctx: ItemContext, fields: dict) -> HandlerOutcome | None:
    """The outcome of the job's handler (or `handler`, given by tests); None when it found its lease
    lost before its side effect."""
    try:
        handler = handler or handler_for(ctx.options)
    except BadRequestError as exc:
        # The job names a handler this deployment does not have: no attempt can succeed.
        log_event("handler_unknown", severity="ERROR", error=exc.message, **fields)
        return HandlerOutcome(error=PermanentItemError(exc.message, code=exc.code))
    try:
        return HandlerOutcome(result=_checked_result(handler.handle(ctx)))
    except LeaseLostError:
        return None
    except ItemError as exc:
        return HandlerOutcome(error=exc)
    except Exception as exc:  # a bug or an unclassified fault: retried with backoff like any transient
        # fault (it may be one), failed with what actually happened once its retry window is spent.
        crashed = RetryableItemError(
            f"handler {getattr(handler, 'name', type(handler).__name__)} crashed: {type(exc).__name__}: {str(exc)[:300]}",
            code="handler_crashed",
        )
        log_event("handler_crashed", severity="ERROR", exception=type(exc).__name__, error=str(exc)[:300], **fields)
        return HandlerOutcome(error=crashed)


def _checked_result(result: Any) -> dict[str, Any]:
    if result is None:
        return {}
    if not isinstance(result, dict):
        raise TypeError(f"handler returned {type(result).__name__}, expected a dict")
    return result
