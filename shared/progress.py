"""Job progress from count aggregations over items; moves a finished job to its final status once."""

from __future__ import annotations

import datetime as dt
import random
import time
from typing import Any

from google.api_core import exceptions as gexc

from shared.events import record_event
from shared.log import log_event
from shared.model import ITEMS, JOBS, TERMINAL_ITEM_STATUSES, ItemStatus, JobStatus

# A job may be completed from these states once fan-out is done (ingest flips to running at fan-out).
_COMPLETABLE = {JobStatus.RUNNING.value, JobStatus.INGESTING.value}


def _db(db):
    if db is not None:
        return db
    from shared.clients import firestore_client

    return firestore_client()


def count_items_by_status(db, job_id: str) -> dict[str, int]:
    """Per-status item counts with `count()` aggregations (one index scan each, no documents read)."""
    from google.cloud.firestore_v1.base_query import FieldFilter

    items = db.collection(JOBS).document(job_id).collection(ITEMS)
    counts: dict[str, int] = {}
    for status in ItemStatus:
        query = items.where(filter=FieldFilter("status", "==", status.value)).count(alias="n")
        result = query.get()
        counts[status.value] = int(result[0][0].value) if result and result[0] else 0
    return counts


def _terminal(counts: dict[str, int]) -> int:
    return sum(counts.get(s.value, 0) for s in TERMINAL_ITEM_STATUSES)


def job_counts(job_id: str, *, db=None) -> dict[str, Any]:
    """Counts for the API: per status, items born, items never claimed (`totals.items - born`)."""
    db = _db(db)
    snap = db.collection(JOBS).document(job_id).get()
    job = snap.to_dict() if snap.exists else {}
    counts = count_items_by_status(db, job_id)
    born = sum(counts.values())
    total_items = (job.get("totals") or {}).get("items")
    return {
        **counts,
        "born": born,
        "terminal": _terminal(counts),
        "total_items": total_items,
        "never_claimed": (max(0, int(total_items) - born) if total_items is not None else None),
    }


def complete_job(tx, job_ref, now: dt.datetime, counts: dict[str, int], seen: dict | None = None) -> str | None:
    """Move a running job to completed / completed_with_failures once; None if another check did it.

    `seen`, when given, receives the job document this transaction read (for the caller's notice)."""
    snap = job_ref.get(transaction=tx)
    job = snap.to_dict() if snap.exists else None
    if seen is not None:
        seen.clear()
        seen.update(job or {})
    if not job or job.get("status") not in _COMPLETABLE or not job.get("fanout_done_at"):
        return None
    # An operator retry round is re-queueing failed items: they still look terminal until it is done.
    if (job.get("retry") or {}).get("state") == "enqueuing":
        return None
    final = JobStatus.COMPLETED_WITH_FAILURES if counts.get(ItemStatus.FAILED.value, 0) else JobStatus.COMPLETED
    tx.update(
        job_ref,
        {
            "status": final.value,
            "counts": counts,
            "completed_at": now,
            "last_progress_at": now,
            "updated_at": now,
        },
    )
    record_event(job_ref, "completed", "progress_check", now,
                 {"status": final.value, "counts": counts, "total_items": (job.get("totals") or {}).get("items")},
                 tx=tx)
    return final.value


def _complete_with_backoff(db, job_ref, at: dt.datetime, counts: dict[str, int], tries: int = 4,
                           seen: dict | None = None) -> str | None:
    """Run `complete_job`; checks racing on one job abort each other, so back off with jitter and
    stop as soon as another check has made the job final."""
    from shared.worker import run_transaction

    for i in range(tries):
        try:
            return run_transaction(db, "complete_job", complete_job, job_ref, at, counts, seen)
        except (ValueError, gexc.Aborted):  # ValueError: the client's "failed to commit in N attempts"
            current = (job_ref.get().to_dict() or {}).get("status")
            if current not in _COMPLETABLE:
                return None
            if i == tries - 1:
                raise
            time.sleep(random.uniform(0.05, 0.2) * (2**i))
    return None


def _notify_finished(job_id: str, job: dict[str, Any], final: str, counts: dict[str, int]) -> None:
    """One Slack note when a job first finishes. Only the check whose transaction made the job final
    gets here, and only for round 1: a job leaves round 1 only through a retry round, which needs a
    final job, so round 1 finishes exactly once (retry rounds are not announced again). Never raises."""
    try:
        if int(job.get("round") or 1) != 1:
            return
        from shared.alerts import notify_job_finished

        notify_job_finished({**job, "job_id": job.get("job_id") or job_id, "status": final, "counts": counts})
    except Exception as exc:  # noqa: BLE001 - a notice must never fail or repeat the progress check
        log_event("job_finished_notify_failed", severity="WARNING", job_id=job_id,
                  error=f"{type(exc).__name__}: {exc}"[:300])


def check_job_progress(job_id: str, now: float | dt.datetime | None = None, *, db=None) -> dict[str, Any]:
    """The `/progress` task: refresh the job's counts and complete it when every item is terminal."""
    db = _db(db)
    if now is None:
        now = time.time()
    at = now if isinstance(now, dt.datetime) else dt.datetime.fromtimestamp(now, tz=dt.timezone.utc)
    job_ref = db.collection(JOBS).document(job_id)
    snap = job_ref.get()
    if not snap.exists:
        log_event("progress_job_missing", severity="WARNING", job_id=job_id)
        return {"job_id": job_id, "status": "job_missing", "completed": False}
    job = snap.to_dict() or {}
    counts = count_items_by_status(db, job_id)
    terminal = _terminal(counts)
    total_items = (job.get("totals") or {}).get("items")
    changed = counts != {k: int(v) for k, v in (job.get("counts") or {}).items()}
    status = job.get("status")
    out: dict[str, Any] = {
        "job_id": job_id,
        "counts": counts,
        "terminal": terminal,
        "total_items": total_items,
        "fanout_done": bool(job.get("fanout_done_at")),
        "completed": False,
    }

    done = bool(job.get("fanout_done_at")) and total_items is not None and terminal >= int(total_items)
    if done and status in _COMPLETABLE:
        seen: dict = {}
        final = _complete_with_backoff(db, job_ref, at, counts, seen=seen)
        if final:
            log_event("job_completed", job_id=job_id, status=final, counts=counts, total_items=total_items)
            _notify_finished(job_id, seen or job, final, counts)
            return {**out, "status": final, "completed": True}
        # Another check completed it between our read and our transaction.
        return {**out, "status": "already_final"}

    if changed:
        job_ref.update({"counts": counts, "last_progress_at": at, "updated_at": at})
        log_event("job_progress", job_id=job_id, status=status, counts=counts, terminal=terminal, total_items=total_items)
    if done and terminal > int(total_items):  # more items than planned: the accounting is broken
        log_event("progress_overcount", severity="ERROR", job_id=job_id, terminal=terminal, total_items=total_items)
    return {**out, "status": status, "changed": changed}
