"""Job progress from count aggregations over items; moves a finished job to its final status once."""

from __future__ import annotations

import datetime as dt
import os
import time
from typing import Any

from shared.events import Event
from shared.job_state import CANCELLABLE, COMPLETABLE, Completion
from shared.log import log_event
from shared.config import PROGRESS_DISPATCH_DEADLINE_S
from shared.model import (PROGRESS_CHECK_MISSED_AT, PROGRESS_CHECK_MISSED_ERROR, PROGRESS_CHECK_UNTIL,
                          TERMINAL_ITEM_STATUSES, ItemStatus, Job)
from shared.retry import is_contention
from shared.store import Store, default_store
from shared.worker.lanes import LANE_PRIORITY


def _terminal(counts: dict[str, int]) -> int:
    return sum(counts.get(s.value, 0) for s in TERMINAL_ITEM_STATUSES)


def job_counts(job_id: str, *, store: Store | None = None) -> dict[str, Any]:
    """Counts for the API: per status, items born, `unborn` (`totals.items - born`) and `never_claimed`.

    Items are born `queued` at fan-out (attempt 0), so a never-claimed item is one of those
    (`count_never_claimed`, counted within `queued`). Jobs fanned out before that were born at their
    first claim: their never-claimed items are `unborn` (0 for every newer job). `never_claimed` is
    both together; `unborn` is the part not counted in any status."""
    store = store or default_store()
    job = store.get_job(job_id)
    counts = store.count_items_by_status(job_id)
    born = sum(counts.values())
    total_items = job.total_items if job else None
    unborn = max(0, total_items - born) if total_items is not None else None
    queued_unclaimed = store.count_never_claimed(job_id) if counts.get(ItemStatus.QUEUED.value) else 0
    return {
        **counts,
        "born": born,
        "terminal": _terminal(counts),
        "total_items": total_items,
        "unborn": unborn,
        "never_claimed": (unborn + queued_unclaimed) if unborn is not None else queued_unclaimed,
    }


def _complete(store: Store, job_id: str, at: dt.datetime, counts: dict[str, int]) -> Completion:
    """Complete the job once. Checks racing on one job abort each other; the store's transaction
    policy retries that, and when it gives up the job is usually final already (another check won)."""
    try:
        return store.complete_job(job_id, counts, at)
    except Exception as exc:
        if not is_contention(exc):
            raise
        current = store.get_job(job_id)
        if current is None or current.status not in COMPLETABLE:
            return Completion(None, current)
        raise


def _notify_finished(store: Store, job_id: str, job: Job, final: str, counts: dict[str, int], at: dt.datetime) -> None:
    """One Slack note when a job first finishes, and its outcome in the job's events (`job_finished_note`:
    what an operator or `scripts/smoke` reads to know the note left). Only the check whose transaction
    made the job final gets here, and only for round 1: a job leaves round 1 only through a retry round,
    which needs a final job, so round 1 finishes exactly once (retry rounds are not announced again).
    Never raises."""
    try:
        if job.round != 1:
            return
        from shared.alerts import notify_job_finished

        from shared.results import results_gcs_path

        result = notify_job_finished({**job.doc, "job_id": job.job_id or job_id, "status": final, "counts": counts,
                                      "results_path": results_gcs_path(job.job_id or job_id, job.round)})
        # The actor is the function that completed the job (Cloud Run sets K_SERVICE to the service name).
        store.record_event(job_id, Event("job_finished_note", os.environ.get("K_SERVICE") or "progress", at,
                                         {"sent": result.ok, "status": result.status, "error": result.error},
                                         event_id="job_finished_note"))
    except Exception as exc:  # noqa: BLE001 - a notice must never fail or repeat the progress check
        log_event("job_finished_notify_failed", severity="WARNING", job_id=job_id,
                  error=f"{type(exc).__name__}: {exc}"[:300])


def notify_started(store: Store, job_id: str, job_doc: dict[str, Any], at: dt.datetime) -> None:
    """One Slack note when a job's fan-out is done and it starts running, and its outcome in the job's
    events (`job_started_note`). Only the caller whose `finish_fanout` transaction moved the job gets
    here (the transaction returns None to every other), so the note is sent once. Never raises."""
    try:
        from shared.alerts import notify_job_started

        result = notify_job_started({**job_doc, "job_id": job_doc.get("job_id") or job_id})
        store.record_event(job_id, Event("job_started_note", os.environ.get("K_SERVICE") or "ingest", at,
                                         {"sent": result.ok, "status": result.status, "error": result.error},
                                         event_id="job_started_note"))
    except Exception as exc:  # noqa: BLE001 - a notice must never fail or repeat the fan-out
        log_event("job_started_notify_failed", severity="WARNING", job_id=job_id,
                  error=f"{type(exc).__name__}: {exc}"[:300])


def _pause_if_too_many_failed(store: Store, job: Job, counts: dict[str, int], at: dt.datetime) -> bool:
    """The job option `max_failed_percent`: pause a job with items still open once its failed items are
    more than that share of `totals.items` (a job whose items are all final just completes)."""
    limit = job.options.get("max_failed_percent")
    total = job.total_items
    if limit is None or not total or job.status not in COMPLETABLE:  # limit 0 is valid: any failure
        return False
    failed = int(counts.get("failed", 0))
    if failed * 100.0 <= float(limit) * total:
        return False
    from shared import breaker

    message = f"{failed} of {total} items failed, more than the job's max_failed_percent of {float(limit):g}%"
    return breaker.pause_job(store, job.job_id, breaker.MAX_FAILED_PERCENT, message, "progress_check", at).changed


def check_job_progress(job_id: str, now: float | dt.datetime | None = None, *,
                       store: Store | None = None) -> dict[str, Any]:
    """The `/progress` task: refresh the job's counts and complete it when every item is terminal."""
    store = store or default_store()
    if now is None:
        now = time.time()
    at = now if isinstance(now, dt.datetime) else dt.datetime.fromtimestamp(now, tz=dt.timezone.utc)
    job, ours = store.begin_progress_check(job_id, at, at + dt.timedelta(seconds=PROGRESS_DISPATCH_DEADLINE_S))
    if job is None:
        log_event("progress_job_missing", severity="WARNING", job_id=job_id)
        return {"job_id": job_id, "status": "job_missing", "completed": False}
    if not ours:
        # Another check is counting. It may have counted before the write that asked for this check,
        # so this one is not dropped: it is asked for again in the next window.
        from shared.worker.progress_requests import progress_window_s, request_progress_check

        again = request_progress_check(job_id, at.timestamp() + progress_window_s(), store=store)
        log_event("progress_check_busy", severity="DEBUG", job_id=job_id, asked_again=again)
        return {"job_id": job_id, "status": "busy", "completed": False, "asked_again": again}
    result: dict[str, Any] = {}
    try:
        # A small job's check goes first in this process, as its items do; a bulk job's check (a count
        # of every item of a large job) waits for small jobs' deliveries like a bulk item does
        # (shared/worker/lanes.py). Held meanwhile, it is the only check of its job.
        with LANE_PRIORITY.turn(job.item_lane):
            result = _check_held_job(store, job_id, job, at)
        return result
    finally:
        # A completion clears the lease in its own transaction; a finished job was not held.
        if job.status in CANCELLABLE and not result.get("completed"):
            _end_progress_check(store, job_id)


def _end_progress_check(store: Store, job_id: str) -> None:
    """Let the next check count. Never raises: a lease left behind only delays the next check to its
    expiry (a check that finds the job held asks again for the next window, until one gets it)."""
    try:
        store.update_job(job_id, {PROGRESS_CHECK_UNTIL: None})
    except Exception as exc:  # noqa: BLE001
        log_event("progress_check_release_failed", severity="WARNING", job_id=job_id,
                  error=f"{type(exc).__name__}: {exc}"[:300])


def _check_held_job(store: Store, job_id: str, job: Job, at: dt.datetime) -> dict[str, Any]:
    """The check proper, with the job's progress lease held: count, record, complete when all are final."""
    counts = store.count_items_by_status(job_id)
    terminal = _terminal(counts)
    total_items = job.total_items
    changed = counts != {k: int(v) for k, v in (job.doc.get("counts") or {}).items()}
    fanout_done = job.fanout_done_at is not None
    out: dict[str, Any] = {"job_id": job_id, "counts": counts, "terminal": terminal, "total_items": total_items,
                           "fanout_done": fanout_done, "completed": False}

    done = fanout_done and total_items is not None and terminal >= total_items
    if not done and _pause_if_too_many_failed(store, job, counts, at):
        out["paused"] = True
    if done and job.status in COMPLETABLE:
        completion = _complete(store, job_id, at, counts)
        if completion.final:
            if job.doc.get(PROGRESS_CHECK_MISSED_AT) is not None:
                store.update_job(job_id, {PROGRESS_CHECK_MISSED_AT: None, PROGRESS_CHECK_MISSED_ERROR: None})
            log_event("job_completed", job_id=job_id, status=completion.final, counts=counts, total_items=total_items)
            from shared.results import request_results  # the manifest task: see shared/results.py

            request_results(job_id, (completion.job or job).round)
            _notify_finished(store, job_id, completion.job or job, completion.final, counts, at)
            return {**out, "status": completion.final, "completed": True}
        # Another check completed it between our read and our transaction.
        return {**out, "status": "already_final"}

    missed = job.doc.get(PROGRESS_CHECK_MISSED_AT) is not None
    if changed or missed:
        fields: dict[str, Any] = {"counts": counts, "last_progress_at": at, "updated_at": at} if changed else {}
        if missed:  # this check is the one that could not be asked for (or a later one): clear the flag
            fields |= {PROGRESS_CHECK_MISSED_AT: None, PROGRESS_CHECK_MISSED_ERROR: None}
        store.update_job(job_id, fields)
        log_event("job_progress", job_id=job_id, status=job.status, counts=counts, terminal=terminal,
                  total_items=total_items, missed_check_cleared=missed or None)
    if done and terminal > total_items:  # more items than planned: the accounting is broken
        log_event("progress_overcount", severity="ERROR", job_id=job_id, terminal=terminal, total_items=total_items)
    return {**out, "status": job.status, "changed": changed}
