"""Operator actions over jobs and items: status, listings, cancel, and deliberate retry of failed items.

Nothing here recovers or re-runs anything by itself (context 001/003): `retry_failed` runs only
failed items, only on an operator's request, only after the job has finished, and only a bounded
number of rounds. There is deliberately no "recover" operation.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

from google.cloud import firestore

from shared.clients import firestore_client, tasks_client
from shared.config import settings
from shared.events import record_event
from shared.exceptions import BadRequestError, ConflictError, NotFoundError
from shared.log import log_event
from shared.model import (
    ITEM_HISTORY_LIMIT,
    ITEMS,
    JOBS,
    LINES,
    ItemStatus,
    JobStatus,
    LineOutcome,
    started_in_current_round,
)
from shared.naming import task_name_for
from shared.process_request import ProcessFileRequest

ITEM_STATUS_VALUES = tuple(s.value for s in ItemStatus)
LINE_OUTCOME_VALUES = tuple(o.value for o in LineOutcome)
JOB_STATUS_VALUES = tuple(s.value for s in JobStatus)
MAX_JOBS_LIMIT = 100
MAX_ITEMS_LIMIT = 1000
_PAGE = 300  # documents per page when an operation walks a job's items
_TASK_THREADS = 8

RETRY_ENQUEUING = "enqueuing"
RETRY_DONE = "done"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _valid_doc_id(value: Any) -> bool:
    """Firestore rejects '/', '.', '..', '__x__' and very long ids; such input names nothing here."""
    return (isinstance(value, str) and 0 < len(value) <= 200 and "/" not in value and value not in (".", "..")
            and not (value.startswith("__") and value.endswith("__")) and "\x00" not in value)


def _job_ref(job_id: str):
    if not _valid_doc_id(job_id):
        raise NotFoundError(f"job {str(job_id)[:200]!r} not found", code="job_not_found")
    return firestore_client().collection(JOBS).document(job_id)


def _not_found(job_id: str) -> NotFoundError:
    return NotFoundError(f"job {job_id!r} not found", code="job_not_found")


def _load_job(job_id: str) -> dict[str, Any]:
    snap = _job_ref(job_id).get()
    if not snap.exists:
        raise _not_found(job_id)
    return snap.to_dict() or {}


def _jsonable(value: Any) -> Any:
    """Firestore values to JSON: datetimes as ISO-8601 UTC strings, nested dicts/lists walked."""
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.timezone.utc)
        return value.astimezone(dt.timezone.utc).isoformat().replace("+00:00", "Z")
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "path") and hasattr(value, "id"):  # a DocumentReference
        return value.path
    return value


def _as_dict(obj: Any) -> dict[str, Any]:
    if isinstance(obj, dict):
        return dict(obj)
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    if hasattr(obj, "model_dump"):
        return obj.model_dump()
    if hasattr(obj, "_asdict"):
        return obj._asdict()
    return dict(vars(obj))


def _counts(job_id: str) -> dict[str, int]:
    """Per-status item counts plus `never_claimed`, from the progress module's count aggregations."""
    from shared import progress

    raw = _as_dict(progress.job_counts(job_id))
    out = {s: int(raw.get(s) or 0) for s in ITEM_STATUS_VALUES}
    out["never_claimed"] = int(raw.get("never_claimed") or 0)
    return out


# ---------------------------------------------------------------- status


def get_job_status(job_id: str, now: dt.datetime | None = None) -> dict[str, Any]:
    """One job's status, totals, live per-status counts, percent, rate, ETA, stall flag and times."""
    now = now or _now()
    job = _load_job(job_id)
    status = job.get("status")
    totals = {k: int(v or 0) for k, v in (job.get("totals") or {}).items()}
    fanout_done_at = job.get("fanout_done_at")
    counts = _counts(job_id)
    items_total = totals.get("items") if fanout_done_at else None

    finished = counts["succeeded"] + counts["failed"] + counts["cancelled"]
    open_ = counts["queued"] + counts["processing"]
    percent = None
    rate = None
    eta_s = None
    if items_total is not None:
        percent = 100.0 if items_total == 0 else round(min(100.0, 100.0 * finished / items_total), 2)
        elapsed = (now - fanout_done_at).total_seconds() if isinstance(fanout_done_at, dt.datetime) else 0
        end = job.get("completed_at") or job.get("cancelled_at")
        if isinstance(end, dt.datetime) and isinstance(fanout_done_at, dt.datetime):
            elapsed = min(elapsed, (end - fanout_done_at).total_seconds())
        if elapsed > 0:
            rate = round(finished / elapsed, 3)
        remaining = max(0, items_total - finished)
        if rate and remaining and status in (JobStatus.RUNNING.value, JobStatus.INGESTING.value):
            eta_s = round(remaining / rate, 1)

    # What became of every data line; for a cancelled job, items that never finished are cancelled
    # (their tasks drain as no-ops).
    cancelled = counts["cancelled"]
    pending = open_ + counts["never_claimed"]
    if status == JobStatus.CANCELLED.value:
        cancelled += pending
        pending = 0
    outcome = {
        "lines": totals.get("lines", 0),
        "succeeded": counts["succeeded"],
        "failed": counts["failed"],
        "invalid": totals.get("invalid", 0),
        "duplicate": totals.get("duplicate", 0),
        "cancelled": cancelled,
        "pending": pending,
    }
    stall = job.get("stall")
    return _jsonable(
        {
            "job_id": job.get("job_id", job_id),
            "status": status,
            "final": status in {s.value for s in JobStatus if s.is_final},
            "gcs_path": job.get("gcs_path"),
            "source": job.get("source"),
            "options": job.get("options") or {},
            "round": int(job.get("round") or 1),
            "totals": totals,
            "counts": counts,
            "outcome": outcome,
            "percent": percent,
            "rate_items_per_s": rate,
            "eta_s": eta_s,
            "stalled": bool(stall),
            "stall": stall,
            "retry": job.get("retry"),
            "error": job.get("error"),
            "created_at": job.get("created_at"),
            "updated_at": job.get("updated_at"),
            "fanout_done_at": fanout_done_at,
            "last_progress_at": job.get("last_progress_at"),
            "completed_at": job.get("completed_at"),
            "cancelled_at": job.get("cancelled_at"),
        }
    )


# ---------------------------------------------------------------- listings


def _check_limit(limit: Any, maximum: int) -> int:
    try:
        limit = int(limit)
    except (TypeError, ValueError):
        raise BadRequestError(f"limit must be an integer between 1 and {maximum}", code="bad_limit") from None
    if not 1 <= limit <= maximum:
        raise BadRequestError(f"limit must be between 1 and {maximum}, got {limit}", code="bad_limit")
    return limit


def _job_summary(doc: dict[str, Any], job_id: str) -> dict[str, Any]:
    keys = ("status", "gcs_path", "source", "round", "totals", "counts", "stall", "created_at",
            "updated_at", "completed_at", "cancelled_at")
    return _jsonable({"job_id": doc.get("job_id", job_id), **{k: doc.get(k) for k in keys}})


def list_jobs(limit: int = 20, status: str | None = None, gcs_path: str | None = None,
              cursor: str | None = None) -> dict[str, Any]:
    """Jobs, newest first; `cursor` is the `next_cursor` of the previous page."""
    limit = _check_limit(limit, MAX_JOBS_LIMIT)
    if status is not None and status not in JOB_STATUS_VALUES:
        raise BadRequestError(f"status must be one of {', '.join(JOB_STATUS_VALUES)}; got {status!r}",
                              code="bad_status")
    col = firestore_client().collection(JOBS)
    query = col
    if status:
        query = query.where(filter=firestore.FieldFilter("status", "==", status))
    if gcs_path:
        query = query.where(filter=firestore.FieldFilter("gcs_path", "==", gcs_path))
    query = query.order_by("created_at", direction=firestore.Query.DESCENDING)
    if cursor:
        snap = _job_ref_or_bad_cursor(cursor).get()
        if not snap.exists:
            raise BadRequestError(f"cursor {cursor[:200]!r} does not name a job", code="bad_cursor")
        query = query.start_after(snap)  # the client adds __name__ as the tie-breaker
    docs = list(query.limit(limit + 1).stream())
    more = len(docs) > limit
    docs = docs[:limit]
    return {
        "jobs": [_job_summary(d.to_dict() or {}, d.id) for d in docs],
        "next_cursor": docs[-1].id if more and docs else None,
    }


def _job_ref_or_bad_cursor(cursor: str):
    if not _valid_doc_id(cursor):
        raise BadRequestError("cursor is not valid", code="bad_cursor")
    return firestore_client().collection(JOBS).document(cursor)


def _item_view(doc: dict[str, Any], gtin: str) -> dict[str, Any]:
    keys = ("upc", "line", "status", "round", "attempt", "error", "result", "task_name", "history",
            "created_at", "updated_at", "finished_at")
    return _jsonable({"gtin": doc.get("gtin", gtin), **{k: doc.get(k) for k in keys}})


def _line_view(doc: dict[str, Any]) -> dict[str, Any]:
    keys = ("line", "raw", "outcome", "code", "reason", "gtin", "duplicate_of_line")
    return _jsonable({k: doc.get(k) for k in keys})


def list_items(job_id: str, status: str | None = None, limit: int = 100,
               cursor: str | None = None) -> dict[str, Any]:
    """A job's items (optionally of one status, failed ones with their errors), or its
    invalid/duplicate line records when `status` is `invalid` or `duplicate`."""
    limit = _check_limit(limit, MAX_ITEMS_LIMIT)
    allowed = ITEM_STATUS_VALUES + LINE_OUTCOME_VALUES
    if status is not None and status not in allowed:
        raise BadRequestError(f"status must be one of {', '.join(allowed)}; got {status!r}", code="bad_status")
    if cursor is not None and not _valid_doc_id(cursor):
        raise BadRequestError("cursor is not valid", code="bad_cursor")
    job_ref = _job_ref(job_id)
    if not job_ref.get().exists:
        raise _not_found(job_id)
    is_lines = status in LINE_OUTCOME_VALUES
    col = job_ref.collection(LINES if is_lines else ITEMS)
    field = "outcome" if is_lines else "status"
    query = col
    if status:
        query = query.where(filter=firestore.FieldFilter(field, "==", status))
    query = query.order_by("__name__")
    if cursor:
        query = query.start_after({"__name__": col.document(cursor)})
    docs = list(query.limit(limit + 1).stream())
    more = len(docs) > limit
    docs = docs[:limit]
    if is_lines:
        rows = [_line_view(d.to_dict() or {}) for d in docs]
    else:
        rows = [_item_view(d.to_dict() or {}, d.id) for d in docs]
    return {
        "job_id": job_id,
        "status": status,
        "kind": "lines" if is_lines else "items",
        "items": rows,
        "next_cursor": docs[-1].id if more and docs else None,
    }


def _paged(query, page: int = _PAGE) -> Iterator[Any]:
    """Walk a query in pages ordered by document id, so writes to earlier pages do not shift it."""
    query = query.order_by("__name__")
    last = None
    while True:
        q = query.start_after(last) if last is not None else query
        docs = list(q.limit(page).stream())
        yield from docs
        if len(docs) < page:
            return
        last = docs[-1]


# ---------------------------------------------------------------- cancel


def _history(doc: dict[str, Any], entry: dict[str, Any]) -> list[dict[str, Any]]:
    return (list(doc.get("history") or []) + [entry])[-ITEM_HISTORY_LIMIT:]


@firestore.transactional
def _cancel_job_tx(tx, job_ref, job_id: str, actor: str, now: dt.datetime) -> bool:
    """ingesting/running → cancelled (True); already cancelled → False; finished → ConflictError."""
    snap = job_ref.get(transaction=tx)
    if not snap.exists:
        raise _not_found(job_id)
    status = (snap.to_dict() or {}).get("status")
    if status == JobStatus.CANCELLED.value:
        return False
    if status not in (JobStatus.INGESTING.value, JobStatus.RUNNING.value):
        raise ConflictError(f"job {job_id!r} is already {status}; a finished job cannot be cancelled",
                            code="job_finished")
    tx.update(job_ref, {"status": JobStatus.CANCELLED.value, "cancelled_at": now, "updated_at": now})
    record_event(job_ref, "cancelled", actor, now, {"previous_status": status}, tx=tx)
    return True


@firestore.transactional
def _cancel_item_tx(tx, item_ref, now: dt.datetime) -> bool:
    snap = item_ref.get(transaction=tx)
    doc = snap.to_dict() or {}
    if not snap.exists or doc.get("status") != ItemStatus.QUEUED.value or started_in_current_round(doc):
        return False
    tx.update(item_ref, _cancel_item_update(doc, now))
    return True


def _cancel_item_update(doc: dict[str, Any], now: dt.datetime) -> dict[str, Any]:
    entry = {"status": ItemStatus.CANCELLED.value, "attempt": doc.get("attempt", 0), "owner": None,
             "at": now, "error_code": None}
    return {"status": ItemStatus.CANCELLED.value, "updated_at": now, "finished_at": now,
            "history": _history(doc, entry)}


def cancel_job(job_id: str, actor: str, now: dt.datetime | None = None) -> dict[str, Any]:
    """Cancel a job that is ingesting or running; idempotent for a cancelled job.

    Queued items become `cancelled` here; items in flight finish or drain: the worker claims any
    remaining task of a cancelled job as `cancelled`, a harmless no-op.
    """
    now = now or _now()
    db = firestore_client()
    job_ref = _job_ref(job_id)
    changed = _cancel_job_tx(db.transaction(), job_ref, job_id, actor, now)
    moved = _cancel_queued_items(job_ref, now) if changed else 0
    log_event("job_cancelled" if changed else "job_cancel_repeated", job_id=job_id, actor=actor,
              items_cancelled=moved)
    return {"job_id": job_id, "status": JobStatus.CANCELLED.value, "already_cancelled": not changed,
            "items_cancelled": moved}


def _cancel_queued_items(job_ref, now: dt.datetime) -> int:
    """Queued → cancelled in batches guarded by each document's update time; a batch that lost a race
    with a worker's claim falls back to one transaction per item."""
    from google.api_core import exceptions as gexc

    db = firestore_client()
    query = job_ref.collection(ITEMS).where(filter=firestore.FieldFilter("status", "==", ItemStatus.QUEUED.value))
    moved = 0
    page: list[Any] = []

    def flush(snaps: list[Any]) -> int:
        if not snaps:
            return 0
        batch = db.batch()
        for s in snaps:
            batch.update(s.reference, _cancel_item_update(s.to_dict() or {}, now),
                         option=db.write_option(last_update_time=s.update_time))
        try:
            batch.commit()
            return len(snaps)
        except (gexc.FailedPrecondition, gexc.NotFound, gexc.Aborted):
            return sum(1 for s in snaps if _cancel_item_tx(db.transaction(), s.reference, now))

    for snap in _paged(query):
        if started_in_current_round(snap.to_dict() or {}):
            continue  # an earlier delivery ran its handler: the worker finishes it truthfully
        page.append(snap)
        if len(page) >= 200:
            moved += flush(page)
            page = []
    return moved + flush(page)


# ---------------------------------------------------------------- retry


@dataclasses.dataclass(frozen=True)
class _Round:
    round: int
    resumed: bool


@firestore.transactional
def _begin_retry_tx(tx, job_ref, job_id: str, actor: str, now: dt.datetime, failed: int) -> _Round:
    snap = job_ref.get(transaction=tx)
    if not snap.exists:
        raise _not_found(job_id)
    job = snap.to_dict() or {}
    current = int(job.get("round") or 1)
    retry = job.get("retry") or {}
    if retry.get("state") == RETRY_ENQUEUING and int(retry.get("round") or 0) == current:
        return _Round(current, resumed=True)
    _refuse_unless_retryable(job_id, job)
    tx.update(job_ref, {
        "round": current + 1,
        "status": JobStatus.RUNNING.value,
        "completed_at": None,
        "updated_at": now,
        "retry": {"round": current + 1, "state": RETRY_ENQUEUING, "items": failed, "actor": actor,
                  "started_at": now, "done_at": None, "previous_status": job.get("status")},
    })
    record_event(job_ref, "retry_round", actor, now, {"round": current + 1, "items": failed,
                                                      "previous_status": job.get("status")}, tx=tx)
    return _Round(current + 1, resumed=False)


def _refuse_unless_retryable(job_id: str, job: dict[str, Any]) -> None:
    status = job.get("status")
    if status in (JobStatus.INGESTING.value, JobStatus.RUNNING.value):
        raise ConflictError(f"job {job_id!r} is still {status}; retry-failed runs only after the job has "
                            "finished", code="job_not_final")
    if status == JobStatus.CANCELLED.value:
        raise ConflictError(f"job {job_id!r} was cancelled; its failed items are not retried",
                            code="job_cancelled")
    if status == JobStatus.FAILED.value:
        raise ConflictError(f"job {job_id!r} failed as a whole ({(job.get('error') or {}).get('message', 'no items')}); "
                            "there are no failed items to retry", code="job_failed")
    rounds_used = int(job.get("round") or 1) - 1
    limit = settings().max_retry_rounds
    if rounds_used >= limit:
        raise ConflictError(f"job {job_id!r} has used all {limit} retry rounds (now in round "
                            f"{rounds_used + 1}); retry-failed is refused", code="retry_rounds_exhausted")


@firestore.transactional
def _finish_retry_tx(tx, job_ref, round_: int, now: dt.datetime, requeued: int, created: int) -> None:
    snap = job_ref.get(transaction=tx)
    job = snap.to_dict() or {}
    retry = dict(job.get("retry") or {})
    if int(retry.get("round") or 0) != round_ or retry.get("state") != RETRY_ENQUEUING:
        return
    retry.update({"state": RETRY_DONE, "done_at": now, "requeued": requeued, "tasks_created": created})
    tx.update(job_ref, {"retry": retry, "updated_at": now})


@firestore.transactional
def _requeue_item_tx(tx, item_ref, job_id: str, round_: int, now: dt.datetime, actor: str) -> dict[str, Any] | None:
    """failed (from an earlier round) → queued in `round_`; returns the item or None if it moved on."""
    snap = item_ref.get(transaction=tx)
    doc = snap.to_dict() or {}
    if not snap.exists or doc.get("status") != ItemStatus.FAILED.value or int(doc.get("round") or 1) >= round_:
        return None
    tx.update(item_ref, _requeue_update(job_id, doc, item_ref.id, round_, now, actor))
    return {**doc, "round": round_}


def _requeue_update(job_id: str, doc: dict[str, Any], gtin: str, round_: int, now: dt.datetime,
                    actor: str) -> dict[str, Any]:
    error = doc.get("error") or {}
    entry = {"status": ItemStatus.QUEUED.value, "attempt": doc.get("attempt", 0), "owner": f"retry:{actor}",
             "at": now, "error_code": error.get("code")}
    # The error stays on the item (and in history) until the new round overwrites it.
    return {"status": ItemStatus.QUEUED.value, "round": round_, "updated_at": now, "finished_at": None,
            "task_name": task_name_for(job_id, doc.get("gtin", gtin), round_),
            "lease_owner": None, "lease_expires_at": None, "history": _history(doc, entry)}


def _item_task_spec(job_id: str, doc: dict[str, Any], gtin: str, round_: int):
    from shared.tasks import TaskSpec

    return TaskSpec(
        task_id=task_name_for(job_id, doc.get("gtin", gtin), round_),
        url=settings().worker_url,
        payload={"job_id": job_id, "gtin": doc.get("gtin", gtin), "upc": doc.get("upc"),
                 "line": doc.get("line"), "round": round_},
    )


def _create_item_tasks(job_id: str, items: list[tuple[str, dict[str, Any]]], round_: int) -> int:
    """Create one task per item for `round_`; AlreadyExists (a resumed round) counts as enqueued."""
    from shared.tasks import create_task, item_queue_for

    specs = [_item_task_spec(job_id, doc, gtin, round_) for gtin, doc in items]
    if not specs:
        return 0
    with ThreadPoolExecutor(max_workers=min(_TASK_THREADS, len(specs))) as pool:
        results = list(pool.map(lambda s: create_task(item_queue_for(s.task_id), s), specs))
    return sum(1 for r in results if r)


def retry_failed(job_id: str, actor: str, now: dt.datetime | None = None) -> dict[str, Any]:
    """Start retry round r+1 for a finished job's failed items (never succeeded ones), or resume a
    round whose enqueuing was interrupted. Refused (ConflictError) while the job runs, while items
    are open or never claimed, after `max_retry_rounds`, or when nothing failed."""
    now = now or _now()
    db = firestore_client()
    job_ref = _job_ref(job_id)
    job = _load_job(job_id)
    retry = job.get("retry") or {}
    resuming = retry.get("state") == RETRY_ENQUEUING and int(retry.get("round") or 0) == int(job.get("round") or 1)
    failed = 0
    if not resuming:
        _refuse_unless_retryable(job_id, job)
        counts = _counts(job_id)
        open_ = counts["queued"] + counts["processing"]
        if open_ or counts["never_claimed"]:
            raise ConflictError(
                f"job {job_id!r} still has {open_} open and {counts['never_claimed']} never-claimed items; "
                "retry-failed runs only when every item has finished", code="items_open")
        failed = counts["failed"]
        if failed == 0:
            raise ConflictError(f"job {job_id!r} has no failed items to retry", code="nothing_to_retry")
    rnd = _begin_retry_tx(db.transaction(), job_ref, job_id, actor, now, failed)
    log_event("retry_round_resumed" if rnd.resumed else "retry_round_started", job_id=job_id, actor=actor,
              round=rnd.round, items=failed if not rnd.resumed else None)

    items_col = job_ref.collection(ITEMS)
    created = 0
    requeued = 0
    if rnd.resumed:
        # Items moved to this round before the interruption: their tasks may be missing.
        q = (items_col.where(filter=firestore.FieldFilter("status", "==", ItemStatus.QUEUED.value))
             .where(filter=firestore.FieldFilter("round", "==", rnd.round)))
        page: list[tuple[str, dict]] = []
        for snap in _paged(q):
            page.append((snap.id, snap.to_dict() or {}))
            requeued += 1
            if len(page) >= _PAGE:
                created += _create_item_tasks(job_id, page, rnd.round)
                page = []
        created += _create_item_tasks(job_id, page, rnd.round)

    # Failed items of earlier rounds → queued in this round, then their tasks. An item that already
    # failed again in this round (round == rnd.round) is left alone.
    failed_q = items_col.where(filter=firestore.FieldFilter("status", "==", ItemStatus.FAILED.value))
    page = []
    for snap in _paged(failed_q):
        doc = snap.to_dict() or {}
        if int(doc.get("round") or 1) >= rnd.round:
            continue
        page.append(snap)
        if len(page) >= _PAGE:
            n, c = _requeue_page(db, job_id, page, rnd.round, now, actor)
            requeued, created, page = requeued + n, created + c, []
    n, c = _requeue_page(db, job_id, page, rnd.round, now, actor)
    requeued, created = requeued + n, created + c

    _finish_retry_tx(db.transaction(), job_ref, rnd.round, _now(), requeued, created)
    log_event("retry_round_enqueued", job_id=job_id, actor=actor, round=rnd.round, requeued=requeued,
              tasks_created=created)
    # Completion checks skip a job while its round is enqueuing; if every retried item finished in
    # that window no later completion would ask again, so check once now.
    from shared.progress import check_job_progress

    check_job_progress(job_id)
    return {"job_id": job_id, "round": rnd.round, "resumed": rnd.resumed, "status": JobStatus.RUNNING.value,
            "items_requeued": requeued, "tasks_created": created}


def _requeue_page(db, job_id: str, snaps: list[Any], round_: int, now: dt.datetime, actor: str) -> tuple[int, int]:
    from google.api_core import exceptions as gexc

    if not snaps:
        return 0, 0
    moved: list[tuple[str, dict]] = []
    for start in range(0, len(snaps), 200):
        chunk = snaps[start:start + 200]
        batch = db.batch()
        for s in chunk:
            batch.update(s.reference, _requeue_update(job_id, s.to_dict() or {}, s.id, round_, now, actor),
                         option=db.write_option(last_update_time=s.update_time))
        try:
            batch.commit()
            moved.extend((s.id, s.to_dict() or {}) for s in chunk)
        except (gexc.FailedPrecondition, gexc.NotFound, gexc.Aborted):
            for s in chunk:
                doc = _requeue_item_tx(db.transaction(), s.reference, job_id, round_, now, actor)
                if doc is not None:
                    moved.append((s.id, doc))
    return len(moved), _create_item_tasks(job_id, moved, round_)


# ---------------------------------------------------------------- submit and health


def submit(request: ProcessFileRequest, source: str = "http"):
    """Start (or find) the job for a gs:// object; the ingest core owns identity and validation."""
    from shared import ingest

    # The request's handler choice comes first; ingest falls back to object metadata, then the configured default.
    return ingest.submit_job(request.gcs_path, choice=request.handler_choice, generation=request.generation,
                             source=source)


def health(timeout_s: float = 5.0) -> tuple[bool, dict[str, str]]:
    """Firestore reachable (one cheap get) and the item queue reachable; (ok, {part: "ok" | reason})."""
    parts: dict[str, str] = {}
    try:
        firestore_client().collection(JOBS).document("_health").get(timeout=timeout_s)
        parts["firestore"] = "ok"
    except Exception as exc:  # noqa: BLE001 - health reports any failure by name
        parts["firestore"] = f"unreachable: {type(exc).__name__}: {str(exc)[:200]}"
    try:
        tasks_client().get_queue(name=settings().item_queue_path(0), timeout=timeout_s)
        parts["item_queue"] = "ok"
    except Exception as exc:  # noqa: BLE001
        parts["item_queue"] = f"unreachable: {type(exc).__name__}: {str(exc)[:200]}"
    return all(v == "ok" for v in parts.values()), parts
