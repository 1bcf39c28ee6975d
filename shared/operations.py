"""Operator actions over jobs and items: status, listings, cancel, deliberate retry of failed items, and
re-drive of stranded open items.

Nothing here recovers or re-runs anything by itself: `retry_failed` runs only failed items, only on
an operator's request, only after the job has finished, and only a bounded number of rounds. There
is deliberately no "recover" operation (an automatic recovery once re-ran finished batches and
created duplicate live listings; see docs/architecture.md). `redrive_job` too runs only when an
operator asks, only for open items that no task will deliver again, never for a final item.
"""

from __future__ import annotations

import datetime as dt
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from shared import item_state
from shared.config import SMALL_LANE, settings
from shared.exceptions import BadRequestError, ConflictError, NotFoundError
from shared.job_state import job_not_found
from shared.log import log_event
from shared.model import Item, ItemStatus, Job, JobStatus, LineOutcome
from shared.naming import redrive_task_name_for, task_name_for
from shared.payloads import ItemTask
from shared.process_request import ProcessFileRequest
from shared.store import Store, default_store, valid_doc_id

ITEM_STATUS_VALUES = tuple(s.value for s in ItemStatus)
LINE_OUTCOME_VALUES = tuple(o.value for o in LineOutcome)
JOB_STATUS_VALUES = tuple(s.value for s in JobStatus)
MAX_JOBS_LIMIT = 100
MAX_ITEMS_LIMIT = 1000
_PAGE = 300  # items per page when an operation walks a job's items
_TASK_THREADS = 8


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _store() -> Store:
    return default_store()


def _checked_job_id(job_id: str) -> str:
    if not valid_doc_id(job_id):
        raise NotFoundError(f"job {str(job_id)[:200]!r} not found", code="job_not_found")
    return job_id


def _load_job(job_id: str) -> Job:
    job = _store().get_job(_checked_job_id(job_id))
    if job is None:
        raise job_not_found(job_id)
    return job


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


def _counts(job_id: str) -> dict[str, int]:
    """Per-status item counts plus `never_claimed`, from the progress module's count aggregations.
    Items born at fan-out and not yet claimed are `queued` and also in `never_claimed`; `_unborn`
    (popped before it is shown) counts older jobs' items that were never born, in no status."""
    from shared import progress

    raw = progress.job_counts(job_id, store=_store())
    out = {s: int(raw.get(s) or 0) for s in ITEM_STATUS_VALUES}
    out["never_claimed"] = int(raw.get("never_claimed") or 0)
    out["_unborn"] = int(raw.get("unborn") or 0)
    return out


# ---------------------------------------------------------------- status


def _progress_figures(job: dict[str, Any], finished: int, items_total: int | None,
                      now: dt.datetime) -> tuple[float | None, float | None, float | None]:
    """Percent done, items finished per second since fan-out, and the ETA of the rest (None when unknown)."""
    if items_total is None:
        return None, None, None
    percent = 100.0 if items_total == 0 else round(min(100.0, 100.0 * finished / items_total), 2)
    fanout_done_at = job.get("fanout_done_at")
    elapsed = (now - fanout_done_at).total_seconds() if isinstance(fanout_done_at, dt.datetime) else 0
    end = job.get("completed_at") or job.get("cancelled_at")
    if isinstance(end, dt.datetime) and isinstance(fanout_done_at, dt.datetime):
        elapsed = min(elapsed, (end - fanout_done_at).total_seconds())
    rate = round(finished / elapsed, 3) if elapsed > 0 else None
    remaining = max(0, items_total - finished)
    running = job.get("status") in (JobStatus.RUNNING.value, JobStatus.INGESTING.value)
    eta_s = round(remaining / rate, 1) if rate and remaining and running else None
    return percent, rate, eta_s


def _line_outcome(status: str | None, totals: dict[str, int], counts: dict[str, int]) -> dict[str, int]:
    """What became of every data line; for a cancelled job, items that never finished are cancelled
    (their tasks drain as no-ops)."""
    cancelled = counts["cancelled"]
    pending = counts["queued"] + counts["processing"] + counts["_unborn"]
    if status == JobStatus.CANCELLED.value:
        cancelled += pending
        pending = 0
    return {
        "lines": totals.get("lines", 0),
        "succeeded": counts["succeeded"],
        "failed": counts["failed"],
        "invalid": totals.get("invalid", 0),
        "duplicate": totals.get("duplicate", 0),
        "cancelled": cancelled,
        "pending": pending,
    }


def get_job_status(job_id: str, now: dt.datetime | None = None) -> dict[str, Any]:
    """One job's status, totals, live per-status counts, percent, rate, ETA, stall flag and times."""
    now = now or _now()
    job = _load_job(job_id).doc
    status = job.get("status")
    totals = {k: int(v or 0) for k, v in (job.get("totals") or {}).items()}
    fanout_done_at = job.get("fanout_done_at")
    counts = _counts(job_id)
    finished = counts["succeeded"] + counts["failed"] + counts["cancelled"]
    percent, rate, eta_s = _progress_figures(job, finished, totals.get("items") if fanout_done_at else None, now)
    outcome = _line_outcome(status, totals, counts)
    counts.pop("_unborn")
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
            # Set while paused (and kept after): why, by whom, and the status a resume returns to.
            "pause": job.get("pause"),
            "paused_at": job.get("paused_at"),
            "resumed_at": job.get("resumed_at"),
            # The results manifest once its task wrote it: {path, round, rows, lines_missing, written_at}.
            "results": job.get("results"),
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


def _job_summary(job: Job) -> dict[str, Any]:
    keys = ("status", "gcs_path", "source", "round", "totals", "counts", "stall", "created_at",
            "updated_at", "completed_at", "cancelled_at", "pause", "resumed_at")
    return _jsonable({"job_id": job.job_id, **{k: job.doc.get(k) for k in keys}})


def list_jobs(limit: int = 20, status: str | None = None, gcs_path: str | None = None,
              cursor: str | None = None) -> dict[str, Any]:
    """Jobs, newest first; `cursor` is the `next_cursor` of the previous page."""
    limit = _check_limit(limit, MAX_JOBS_LIMIT)
    if status is not None and status not in JOB_STATUS_VALUES:
        raise BadRequestError(f"status must be one of {', '.join(JOB_STATUS_VALUES)}; got {status!r}",
                              code="bad_status")
    if cursor and not valid_doc_id(cursor):
        raise BadRequestError("cursor is not valid", code="bad_cursor")
    jobs = _store().list_jobs(limit=limit + 1, status=status, gcs_path=gcs_path, after_job_id=cursor or None)
    if jobs is None:
        raise BadRequestError(f"cursor {cursor[:200]!r} does not name a job", code="bad_cursor")
    more = len(jobs) > limit
    jobs = jobs[:limit]
    return {"jobs": [_job_summary(j) for j in jobs], "next_cursor": jobs[-1].job_id if more and jobs else None}


def _item_view(item: Item) -> dict[str, Any]:
    keys = ("upc", "line", "status", "round", "attempt", "error", "result", "task_name", "history",
            "created_at", "updated_at", "finished_at")
    return _jsonable({"gtin": item.gtin, **{k: item.doc.get(k) for k in keys}})


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
    if cursor is not None and not valid_doc_id(cursor):
        raise BadRequestError("cursor is not valid", code="bad_cursor")
    _load_job(job_id)
    store = _store()
    is_lines = status in LINE_OUTCOME_VALUES
    if is_lines:
        lines = store.page_lines(job_id, limit=limit + 1, outcome=status, after_id=cursor)
        ids, rows = [i for i, _ in lines], [_line_view(d) for _, d in lines]
    else:
        items = store.page_items(job_id, limit=limit + 1, status=status, after_gtin=cursor)
        ids, rows = [i.gtin for i in items], [_item_view(i) for i in items]
    more = len(rows) > limit
    return {
        "job_id": job_id,
        "status": status,
        "kind": "lines" if is_lines else "items",
        "items": rows[:limit],
        "next_cursor": ids[limit - 1] if more else None,
    }


# ---------------------------------------------------------------- event history and results

MAX_EVENTS_LIMIT = 500


def _event_view(event_id: str, doc: dict[str, Any]) -> dict[str, Any]:
    return _jsonable({"id": event_id, "type": doc.get("type"), "actor": doc.get("actor"), "at": doc.get("at"),
                      "details": doc.get("details") or {}})


def list_events(job_id: str, limit: int = 100, cursor: str | None = None) -> dict[str, Any]:
    """A job's event history, oldest first: who did what when (created, planned, fanout_done, paused,
    resumed, cancelled, retry_round, redrive, stall_flagged, alert_sent, completed, results_written, …); `cursor` is the
    previous page's `next_cursor`."""
    limit = _check_limit(limit, MAX_EVENTS_LIMIT)
    if cursor is not None and not valid_doc_id(cursor):
        raise BadRequestError("cursor is not valid", code="bad_cursor")
    _load_job(job_id)
    rows = _store().page_events(job_id, limit=limit + 1, after_id=cursor)
    if rows is None:
        raise BadRequestError(f"cursor {cursor[:200]!r} names no event of job {job_id}", code="bad_cursor")
    more = len(rows) > limit
    rows = rows[:limit]
    return {"job_id": job_id, "events": [_event_view(i, d) for i, d in rows],
            "next_cursor": rows[-1][0] if more and rows else None}


def export_results(job_id: str):
    """The job's results manifest as CSV text pieces, read live from the store (shared/results.py): the
    same rows the results task writes to the bucket, for any job, finished or not."""
    from shared import results

    _load_job(job_id)
    return results.iter_csv(job_id, store=_store())


# ---------------------------------------------------------------- cancel


# How long an operator's cancel spends moving queued items to `cancelled` before it answers (the api
# function's timeout is 60 s). Every item has a document from fan-out on, so a big job has far more
# queued items than one request can write; the rest are cancelled by their own tasks' deliveries
# (the worker cancels a cancelled job's item before any side effect), which Cloud Tasks keeps
# retrying until they are.
CANCEL_INLINE_BUDGET_S = 20.0


def cancel_job(job_id: str, actor: str, now: dt.datetime | None = None) -> dict[str, Any]:
    """Cancel a job that is ingesting or running; idempotent for a cancelled job.

    Queued items become `cancelled` here, for up to CANCEL_INLINE_BUDGET_S; the others, and items in
    flight, are finished by the worker: it records any remaining task of a cancelled job as a
    `cancelled` item, and stops a running handler before its next side effect.
    """
    now = now or _now()
    store = _store()
    changed = store.cancel_job(_checked_job_id(job_id), actor, now)
    moved, finished = _cancel_queued_items(store, job_id, now) if changed else (0, True)
    log_event("job_cancelled" if changed else "job_cancel_repeated", job_id=job_id, actor=actor,
              items_cancelled=moved, items_left_to_deliveries=not finished)
    return {"job_id": job_id, "status": JobStatus.CANCELLED.value, "already_cancelled": not changed,
            "items_cancelled": moved, "items_left_to_deliveries": not finished}


def _cancel_queued_items(store: Store, job_id: str, now: dt.datetime,
                         budget_s: float = CANCEL_INLINE_BUDGET_S) -> tuple[int, bool]:
    """Queued → cancelled, page by page, until the budget is spent: (items moved, whether every queued
    item was seen). An item that started in this round is left to the worker, which finishes it
    truthfully (its effect may exist)."""
    deadline = time.monotonic() + budget_s
    moved = 0
    page: list[Item] = []
    for item in store.iter_items(job_id, status=ItemStatus.QUEUED.value, page=_PAGE):
        page.append(item)
        if len(page) >= _PAGE:
            moved += _cancel_page(store, job_id, page, now)
            page = []
            if time.monotonic() >= deadline:
                return moved, False
    return moved + _cancel_page(store, job_id, page, now), True


def _cancel_page(store: Store, job_id: str, items: list[Item], now: dt.datetime) -> int:
    applied = store.apply_to_items("cancel", job_id, items, lambda item: item_state.cancel_queued(item, now))
    return sum(1 for _, kind in applied if kind is item_state.CancelKind.CANCELLED)


# ---------------------------------------------------------------- retry


def retry_failed(job_id: str, actor: str, now: dt.datetime | None = None) -> dict[str, Any]:
    """Start retry round r+1 for a finished job's failed items (never succeeded ones), or resume a
    round whose enqueuing was interrupted. Refused (ConflictError) while the job runs, while items
    are open or never claimed, after `max_retry_rounds`, or when nothing failed."""
    from shared import job_state

    now = now or _now()
    store = _store()
    job = _load_job(job_id)
    failed = 0
    if not job.retry_enqueuing:
        job_state.refuse_unless_retryable(job_id, job)
        failed = _failed_items_when_all_finished(job_id)
    rnd = store.begin_retry_round(job_id, actor, now, failed)
    log_event("retry_round_resumed" if rnd.resumed else "retry_round_started", job_id=job_id, actor=actor,
              round=rnd.round, items=failed if not rnd.resumed else None)

    requeued = created = 0
    if rnd.resumed:
        # Items moved to this round before the interruption: their tasks may be missing.
        for page in _pages(store.iter_items(job_id, status=ItemStatus.QUEUED.value, round_=rnd.round, page=_PAGE)):
            requeued += len(page)
            created += _create_item_tasks(job_id, page, rnd.round, job.item_lane)
    # Failed items of earlier rounds → queued in this round, then their tasks. An item that already
    # failed again in this round (round == rnd.round) is left alone.
    earlier = (i for i in store.iter_items(job_id, status=ItemStatus.FAILED.value, page=_PAGE) if i.round < rnd.round)
    for page in _pages(earlier):
        moved = [item for item, ok in store.apply_to_items(
            "requeue", job_id, page, lambda item: item_state.requeue_for_round(item, job_id, rnd.round, now, actor)) if ok]
        requeued += len(moved)
        created += _create_item_tasks(job_id, moved, rnd.round, job.item_lane)

    store.finish_retry_round(job_id, rnd.round, _now(), requeued, created)
    log_event("retry_round_enqueued", job_id=job_id, actor=actor, round=rnd.round, requeued=requeued,
              tasks_created=created)
    # Completion checks skip a job while its round is enqueuing; if every retried item finished in
    # that window no later completion would ask again, so check once now.
    from shared.progress import check_job_progress

    check_job_progress(job_id, store=store)
    return {"job_id": job_id, "round": rnd.round, "resumed": rnd.resumed, "status": JobStatus.RUNNING.value,
            "items_requeued": requeued, "tasks_created": created}


def _failed_items_when_all_finished(job_id: str) -> int:
    counts = _counts(job_id)
    open_ = counts["queued"] + counts["processing"] + counts["_unborn"]
    if open_:
        raise ConflictError(
            f"job {job_id!r} still has {open_} open items ({counts['never_claimed']} never claimed); "
            "retry-failed runs only when every item has finished", code="items_open")
    if counts["failed"] == 0:
        raise ConflictError(f"job {job_id!r} has no failed items to retry", code="nothing_to_retry")
    return counts["failed"]


def _pages(items, size: int | None = None):
    """Lists of up to `size` (default `_PAGE`) from an iterable of items."""
    size = size or _PAGE
    page: list[Item] = []
    for item in items:
        page.append(item)
        if len(page) >= size:
            yield page
            page = []
    if page:
        yield page


def _create_item_tasks(job_id: str, items: list[Item], round_: int, lane: str) -> int:
    """Create one task per item for `round_` in the job's lane; AlreadyExists (a resumed round) counts as enqueued."""
    from shared.tasks import ITEM_TASK, TaskSpec, create_task, item_queue_for

    specs = [TaskSpec(task_id=task_name_for(job_id, i.gtin, round_), kind=ITEM_TASK,
                      payload=ItemTask(job_id=job_id, gtin=i.gtin, upc=i.doc.get("upc"), line=i.doc.get("line"),
                                       round=round_).to_body())
             for i in items]
    if not specs:
        return 0
    with ThreadPoolExecutor(max_workers=min(_TASK_THREADS, len(specs))) as pool:
        results = list(pool.map(lambda s: create_task(item_queue_for(s.task_id, lane), s), specs))
    return sum(1 for r in results if r)


# ---------------------------------------------------------------- re-drive

REDRIVE_DEFAULT_LIMIT = 1000
REDRIVE_MAX_LIMIT = 5000
STRANDED_QUEUED = "queued_without_task"
STRANDED_LEASE_LAPSED = "lease_lapsed_without_task"


def redrive_job(job_id: str, actor: str, *, dry_run: bool, limit: int = REDRIVE_DEFAULT_LIMIT,
                cursor: str | None = None, now: dt.datetime | None = None) -> dict[str, Any]:
    """An operator's re-drive: one new task for each open item of a running (or paused) job that no
    task will ever deliver again.

    Open means `queued`, or `processing` with a lapsed lease; "no task" means GetTask on the item's
    recorded `task_name` (in its shard of the item queues) answers NotFound. Each such item gets the
    task `redrive_task_name_for(job, gtin, round, n)`, n being the job's re-drive number (taken in a
    transaction with a `redrive` event), and its `task_name` is pointed at it first, in a write
    guarded on the item being unchanged since it was read, so the next re-drive checks the new task.
    Final items are never read for a write; a finished or ingesting job is refused (ConflictError).
    `dry_run` lists what would be re-driven and writes nothing.

    Bounded: at most `limit` open items are checked per call, in gtin order after `cursor`;
    `next_cursor` continues. Works from item documents, which every item has from fan-out on (only
    jobs fanned out before items were born at fan-out can have items without one: not seen here).
    """
    from shared import job_state

    limit = _check_limit(limit, REDRIVE_MAX_LIMIT)
    if cursor is not None and not valid_doc_id(cursor):
        raise BadRequestError("cursor is not valid", code="bad_cursor")
    now = now or _now()
    store = _store()
    job = store.get_job(_checked_job_id(job_id))
    job_state.refuse_unless_redrivable(job_id, job)
    lane = job.item_lane  # refuse_unless_redrivable raised for a missing job
    candidates, next_cursor = _open_items(store, job_id, now, limit, cursor)
    stranded = _without_live_task(job_id, candidates, now, lane)
    out: dict[str, Any] = {"job_id": job_id, "dry_run": dry_run, "redrive": None, "examined": len(candidates),
                           "stranded": len(stranded), "items": [row for _, row in stranded],
                           "tasks_created": 0, "already_enqueued": 0, "moved_meanwhile": 0, "tasks_failed": 0,
                           "next_cursor": next_cursor}
    log_event("redrive_examined", job_id=job_id, actor=actor, dry_run=dry_run, examined=len(candidates),
              stranded=len(stranded), next_cursor=next_cursor)
    if dry_run or not stranded:
        return _jsonable(out)

    n = store.begin_redrive(job_id, actor, now, len(stranded)).n
    out["redrive"] = n
    new_names = {item.gtin: redrive_task_name_for(job_id, item.gtin, item.round, n) for item, _ in stranded}
    writes = [(item, item_state.Update({
        "task_name": new_names[item.gtin], "updated_at": now,
        "redrive": {"n": n, "actor": actor, "at": now, "previous_task_name": row["task_name"]}}))
        for item, row in stranded]
    written = {item.gtin for item in store.write_items_if_unchanged(job_id, writes)}
    out["moved_meanwhile"] = len(stranded) - len(written)
    for _, row in stranded:
        row["new_task_name"] = new_names[row["gtin"]] if row["gtin"] in written else None
    results = _create_redrive_tasks(job_id, [item for item, _ in stranded if item.gtin in written], new_names, lane)
    for _, row in stranded:
        row["outcome"] = results.get(row["gtin"], "moved_meanwhile")
    out["tasks_created"] = sum(1 for r in results.values() if r == "created")
    out["already_enqueued"] = sum(1 for r in results.values() if r == "already_enqueued")
    out["tasks_failed"] = sum(1 for r in results.values() if r == "failed")
    log_event("job_redriven", severity="WARNING" if out["tasks_failed"] else "INFO", job_id=job_id, actor=actor,
              redrive=n, stranded=len(stranded), tasks_created=out["tasks_created"],
              already_enqueued=out["already_enqueued"], moved_meanwhile=out["moved_meanwhile"],
              tasks_failed=out["tasks_failed"])
    return _jsonable(out)


def _open_items(store: Store, job_id: str, now: dt.datetime, limit: int,
                cursor: str | None) -> tuple[list[Item], str | None]:
    """Up to `limit` open items after `cursor` in gtin order: queued ones, and processing ones whose
    lease lapsed (a live lease is a delivery at work). Two queries by status, merged by gtin, so a
    cursor continues both; the next cursor is None when the scan reached the end."""
    import heapq
    import itertools

    def pages(status: str):
        after = cursor
        while True:
            page = store.page_items(job_id, limit=_PAGE, status=status, after_gtin=after)
            yield from page
            if len(page) < _PAGE:
                return
            after = page[-1].gtin

    merged = heapq.merge(pages(ItemStatus.QUEUED.value), pages(ItemStatus.PROCESSING.value), key=lambda i: i.gtin)
    # An item that changed status between the two queries' pages comes twice (adjacent): keep the first.
    unique = (next(group) for _, group in itertools.groupby(merged, key=lambda i: i.gtin))
    open_ = (i for i in unique if i.status == ItemStatus.QUEUED.value or not i.leased_at(now))
    taken = list(itertools.islice(open_, limit + 1))
    more = len(taken) > limit
    taken = taken[:limit]
    return taken, (taken[-1].gtin if more and taken else None)


def _recorded_task_name(job_id: str, item: Item) -> str:
    """The task that last carried the item (a claim records the delivering task), else its round's task."""
    from shared.naming import is_valid_task_id

    name = item.doc.get("task_name")
    return name if isinstance(name, str) and is_valid_task_id(name) else task_name_for(job_id, item.gtin, item.round)


def _without_live_task(job_id: str, items: list[Item], now: dt.datetime,
                       lane: str) -> list[tuple[Item, dict[str, Any]]]:
    """The items whose recorded task is gone (GetTask NotFound in the job's lane, the item's shard), each with its row."""
    from shared.tasks import item_queue_for, task_exists

    if not items:
        return []
    names = [_recorded_task_name(job_id, i) for i in items]
    with ThreadPoolExecutor(max_workers=min(_TASK_THREADS, len(items))) as pool:
        live = list(pool.map(lambda name: task_exists(item_queue_for(name, lane), name), names))
    out = []
    for item, name, alive in zip(items, names, live):
        if alive:
            continue
        if item.status == ItemStatus.QUEUED.value:
            reason, why = STRANDED_QUEUED, f"queued, and its task {name} no longer exists"
        else:
            lapsed = (now - item.lease_expires_at).total_seconds() if item.lease_expires_at else None
            since = f"{int(lapsed)} s ago" if lapsed is not None else "(no lease recorded)"
            reason, why = STRANDED_LEASE_LAPSED, (f"processing with a lease that lapsed {since}, and its task "
                                                  f"{name} no longer exists")
        out.append((item, {"gtin": item.gtin, "line": item.doc.get("line"), "upc": item.doc.get("upc"),
                           "status": item.status, "round": item.round, "attempt": item.attempt,
                           "task_name": name, "reason": reason, "why": why}))
    return out


def _create_redrive_tasks(job_id: str, items: list[Item], names: dict[str, str], lane: str) -> dict[str, str]:
    """One task per item under its re-drive name; gtin → created | already_enqueued | failed.
    AlreadyExists (the same re-drive's create repeated) counts as enqueued; any other failure is
    reported, and the item, pointed at a task that does not exist, is found again by the next re-drive."""
    from shared.tasks import ITEM_TASK, TaskSpec, create_task, item_queue_for

    def create(item: Item) -> tuple[str, str]:
        name = names[item.gtin]
        try:
            spec = TaskSpec(task_id=name, kind=ITEM_TASK, payload=ItemTask(
                job_id=job_id, gtin=item.gtin, upc=item.doc.get("upc"), line=item.doc.get("line"),
                round=item.round).to_body())
            created = create_task(item_queue_for(name, lane), spec)
        except Exception as exc:  # noqa: BLE001 - reported per item; the rest still go out
            log_event("item_redrive_failed", severity="ERROR", job_id=job_id, gtin=item.gtin, task_name=name,
                      error=f"{type(exc).__name__}: {exc}"[:300])
            return item.gtin, "failed"
        log_event("item_redriven", job_id=job_id, gtin=item.gtin, task_name=name, created=created,
                  previous_task_name=item.doc.get("task_name"), status=item.status)
        return item.gtin, "created" if created else "already_enqueued"

    if not items:
        return {}
    with ThreadPoolExecutor(max_workers=min(_TASK_THREADS, len(items))) as pool:
        return dict(pool.map(create, items))


# ---------------------------------------------------------------- pause and resume


def pause_job(job_id: str, actor: str, reason: str | None = None, now: dt.datetime | None = None) -> dict[str, Any]:
    """Pause a running or ingesting job: no new side effects, its deliveries back off without spending
    their items' retry budget; idempotent for a paused job, refused (409) for a finished one. One Slack
    alert per pause (`shared/breaker.py`)."""
    from shared import breaker

    now = now or _now()
    store = _store()
    message = (reason or "").strip()[:500] or f"paused by {actor}"
    result = breaker.pause_job(store, _checked_job_id(job_id), breaker.OPERATOR, message, actor, now)
    if not result.changed and result.status != JobStatus.PAUSED.value:
        raise ConflictError(f"job {job_id!r} is already {result.status}; only a running or ingesting job can be "
                            "paused", code="job_finished")
    return {"job_id": job_id, "status": JobStatus.PAUSED.value, "already_paused": not result.changed}


def resume_job(job_id: str, actor: str, now: dt.datetime | None = None) -> dict[str, Any]:
    """Resume a paused job to the status it was paused from; its open items get a fresh retry window.
    Idempotent for a running or ingesting job, refused (409) for a finished one. Asks for a progress
    check: a job whose items all finished while it was paused completes now."""
    from shared.worker.progress_requests import request_progress_check

    now = now or _now()
    store = _store()
    result = store.resume_job(_checked_job_id(job_id), actor, now)
    if not result.changed and result.status not in (JobStatus.RUNNING.value, JobStatus.INGESTING.value):
        raise ConflictError(f"job {job_id!r} is {result.status}; only a paused job can be resumed",
                            code="job_finished" if result.status in {s.value for s in JobStatus if s.is_final}
                            else "job_not_paused")
    if result.changed:
        log_event("job_resumed", job_id=job_id, actor=actor, status=result.status)
        request_progress_check(job_id, now.timestamp())
    else:
        log_event("job_resume_noop", job_id=job_id, actor=actor, status=result.status)
    return {"job_id": job_id, "status": result.status, "already_running": not result.changed}


# ---------------------------------------------------------------- submit and health


def submit(request: ProcessFileRequest, source: str = "http"):
    """Start (or find) the job for a gs:// object; the ingest core owns identity and validation."""
    from shared import ingest

    # The request's handler choice comes first; ingest falls back to object metadata, then the configured default.
    return ingest.submit_job(request.gcs_path, choice=request.handler_choice, generation=request.generation,
                             options=request.job_options,
                             source=source)


def dropped_file_mode() -> dict[str, str | None]:
    """What a dropped file runs when neither its request nor its metadata names a handler: `mode` is
    live or dry_run (unset only outside a started function), `default_handler` the handler's name."""
    s = settings()
    return {"mode": s.mode, "default_handler": s.default_handler}


def health(timeout_s: float = 5.0) -> tuple[bool, dict[str, str]]:
    """Firestore reachable (one cheap get) and the item queue reachable; (ok, {part: "ok" | reason})."""
    from shared.clients import tasks_client

    parts: dict[str, str] = {}
    try:
        _store().ping(timeout_s)
        parts["firestore"] = "ok"
    except Exception as exc:  # noqa: BLE001 - health reports any failure by name
        parts["firestore"] = f"unreachable: {type(exc).__name__}: {str(exc)[:200]}"
    # The first bulk queue and the small-jobs lane's queue: a job of either lane needs its queue.
    queues = {"item_queue": settings().item_queue_path(0)}
    if settings().small_job_max_lines > 0:
        queues["small_item_queue"] = settings().lane_queue_path(SMALL_LANE)
    for part, path in queues.items():
        try:
            tasks_client().get_queue(name=path, timeout=timeout_s)
            parts[part] = "ok"
        except Exception as exc:  # noqa: BLE001
            parts[part] = f"unreachable: {type(exc).__name__}: {str(exc)[:200]}"
    return all(v == "ok" for v in parts.values()), parts
