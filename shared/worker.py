"""The item worker: claim (lease) → handler with heartbeats → complete, two transactions per item."""

from __future__ import annotations

import collections
import datetime as dt
import enum
import random
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from google.api_core import exceptions as gexc
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.config import settings
from shared.exceptions import ItemError, LeaseLostError, PermanentItemError, RetryableItemError
from shared.handlers import ItemContext, ItemHandler, handler_for
from shared.log import log_event
from shared.model import ITEM_HISTORY_LIMIT, ITEMS, JOBS, ItemStatus, JobStatus, started_in_current_round
from shared.naming import progress_task_name_for

JOB_CACHE_TTL_S = 2.0
# Transactions retry on contention (ABORTED): a few fast attempts, then jittered fresh starts.
TXN_FAST_ATTEMPTS = 1
TXN_TRIES = 5
_TRANSIENT_STORE_ERRORS = (
    gexc.ServiceUnavailable,
    gexc.DeadlineExceeded,
    gexc.InternalServerError,
    gexc.Aborted,
    gexc.TooManyRequests,
    gexc.ResourceExhausted,
)


# ---------------------------------------------------------------------------------------------
# Inputs and outputs


# The last attempt waits for a holder at most lease + margin, capped well inside the item queue's
# dispatch deadline (120 s), polling this often.
LAST_ATTEMPT_MARGIN_S = 5.0
LAST_ATTEMPT_WAIT_MAX_S = 90.0
LAST_ATTEMPT_POLL_S = 1.0


class ItemTask(BaseModel):
    """The item task body written by fan-out (`shared/tasks.py`)."""

    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True)

    job_id: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.-]+$")
    gtin: str = Field(pattern=r"^[0-9]{14}$")
    upc: str = Field(min_length=1, max_length=100)
    line: int = Field(ge=1)
    round: int = Field(ge=1)


@dataclass(frozen=True)
class WorkerOutcome:
    """What the HTTP entry point answers: 200 done/no-op, 409 lease busy, 503 retry later."""

    http_status: int
    body: dict[str, Any]


@dataclass(frozen=True)
class Delivery:
    """One delivery of a task, from Cloud Tasks headers; `owner` is unique per delivery."""

    task_name: str
    retry_count: int
    execution_count: int
    owner: str
    last_attempt: bool

    @classmethod
    def from_headers(cls, headers: Mapping[str, str] | None, max_attempts: int) -> "Delivery":
        lowered = {str(k).lower(): str(v) for k, v in (headers or {}).items()}
        task_name = lowered.get("x-cloudtasks-taskname", "") or "direct"
        retry_count = _int_header(lowered.get("x-cloudtasks-taskretrycount"))
        execution_count = _int_header(lowered.get("x-cloudtasks-taskexecutioncount"))
        owner = f"{task_name}:{retry_count}:{uuid.uuid4().hex[:8]}"
        return cls(task_name, retry_count, execution_count, owner, retry_count + 1 >= max_attempts)


def _int_header(raw: str | None) -> int:
    try:
        return max(0, int(raw or 0))
    except ValueError:
        return 0


# ---------------------------------------------------------------------------------------------
# Transaction accounting (the happy path must cost exactly two transactions per item)


class TransactionCounter:
    """Counts transaction bodies run (retries included), by name; tests and the bench assert on it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: collections.Counter[str] = collections.Counter()

    def add(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def total(self) -> int:
        with self._lock:
            return sum(self._counts.values())

    def reset(self) -> None:
        with self._lock:
            self._counts.clear()


TXN_COUNTER = TransactionCounter()


def run_transaction(db, name: str, fn: Callable, *args: Any, tries: int = TXN_TRIES) -> Any:
    """Run `fn(tx, *args)` in a Firestore transaction, counted under `name`.

    The client retries an aborted commit at once, keeping its place in line; transactions that
    deadlock on a lock (the emulator breaks that only by a lock timeout) all retry in step, so
    after a few fast attempts we start over with a fresh transaction after a jittered pause.
    """
    from google.cloud import firestore

    @firestore.transactional
    def body(tx):
        TXN_COUNTER.add(name)
        return fn(tx, *args)

    for i in range(tries):
        try:
            return body(db.transaction(max_attempts=TXN_FAST_ATTEMPTS))
        except (ValueError, gexc.Aborted) as exc:
            if isinstance(exc, ValueError) and not isinstance(exc.__cause__, gexc.Aborted):
                raise
            if i == tries - 1:
                raise
            time.sleep(random.uniform(0.02, 0.2) * (2**i))


# ---------------------------------------------------------------------------------------------
# Time


def _to_dt(now: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(now, tz=dt.timezone.utc)


def _as_dt(value: Any) -> dt.datetime | None:
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)
    return None


class Clock:
    """Wall time, or a fake start time (`now=`) advanced by real elapsed time."""

    def __init__(self, now: float | dt.datetime | None):
        if isinstance(now, dt.datetime):
            now = (now if now.tzinfo else now.replace(tzinfo=dt.timezone.utc)).timestamp()
        self._offset = (now - time.time()) if now is not None else 0.0

    def __call__(self) -> float:
        return time.time() + self._offset


# ---------------------------------------------------------------------------------------------
# Transactions (small named units; each takes the transaction first)


_FINAL_STATUSES = frozenset(s.value for s in (ItemStatus.SUCCEEDED, ItemStatus.FAILED, ItemStatus.CANCELLED))


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


def _history(item: dict | None, entry: dict) -> list[dict]:
    past = list((item or {}).get("history") or [])
    past.append(entry)
    return past[-ITEM_HISTORY_LIMIT:]


def _entry(status: ItemStatus, attempt: int, owner: str, at: dt.datetime, error_code: str | None = None) -> dict:
    return {"status": status.value, "attempt": attempt, "owner": owner, "at": at, "error_code": error_code}


def _new_item(payload: ItemTask, task_name: str, at: dt.datetime, status: ItemStatus, *, attempt: int, owner: str,
              lease_until: dt.datetime | None = None, error_code: str | None = None) -> dict:
    """An item document as born at its first delivery: leased (`processing`) or, for a cancelled
    job, already final (`cancelled`)."""
    leased = status is ItemStatus.PROCESSING
    return {
        "job_id": payload.job_id,
        "gtin": payload.gtin,
        "upc": payload.upc,
        "line": payload.line,
        "status": status.value,
        "attempt": attempt,
        "round": payload.round,
        "lease_owner": owner if leased else None,
        "lease_expires_at": lease_until if leased else None,
        "heartbeat_at": at if leased else None,
        "task_name": task_name,
        "error": None,
        "result": None,
        "history": [_entry(status, attempt, owner, at, error_code)],
        "created_at": at,
        "updated_at": at,
        "finished_at": None if leased else at,
    }


def claim_item(tx, item_ref, owner: str, now: float, lease_s: float, payload: ItemTask, task_name: str) -> Claim:
    """Take the item's lease for this delivery, creating the item on its first claim."""
    at = _to_dt(now)
    lease_until = _to_dt(now + lease_s)
    snap = item_ref.get(transaction=tx)
    if not snap.exists:
        tx.create(item_ref, _new_item(payload, task_name, at, ItemStatus.PROCESSING, attempt=1, owner=owner,
                                      lease_until=lease_until))
        return Claim(ClaimKind.CLAIMED, ItemStatus.PROCESSING.value, 1, payload.round, created=True, lease_expires_at=lease_until)

    item = snap.to_dict() or {}
    status = item.get("status")
    item_round = int(item.get("round") or 1)
    attempt = int(item.get("attempt") or 0)
    if payload.round < item_round:
        return Claim(ClaimKind.STALE_ROUND, status, attempt, item_round)
    if status in _FINAL_STATUSES:
        return Claim(ClaimKind.TERMINAL, status, attempt, item_round)
    reclaimed = False
    if status == ItemStatus.PROCESSING.value:
        expires = _as_dt(item.get("lease_expires_at"))
        if expires is not None and expires > at and item.get("lease_owner") != owner:
            return Claim(ClaimKind.BUSY, status, attempt, item_round, item.get("lease_owner"), expires)
        reclaimed = True
    elif status != ItemStatus.QUEUED.value:
        return Claim(ClaimKind.UNKNOWN_STATE, status, attempt, item_round)

    attempt += 1
    new_round = max(item_round, payload.round)
    tx.update(
        item_ref,
        {
            "status": ItemStatus.PROCESSING.value,
            "attempt": attempt,
            "round": new_round,
            "lease_owner": owner,
            "lease_expires_at": lease_until,
            "heartbeat_at": at,
            "task_name": task_name,
            "updated_at": at,
            "history": _history(item, _entry(ItemStatus.PROCESSING, attempt, owner, at)),
        },
    )
    return Claim(
        ClaimKind.CLAIMED,
        ItemStatus.PROCESSING.value,
        attempt,
        new_round,
        previous_owner=item.get("lease_owner"),
        lease_expires_at=lease_until,
        reclaimed=reclaimed,
    )


def cancel_item(tx, item_ref, owner: str, now: float, payload: ItemTask, task_name: str) -> str:
    """For a cancelled job: record the item as cancelled unless it is done or leased by a live delivery.

    Returns "cancelled", "terminal" (already final), "busy" (a live lease will complete it) or
    "started" (an earlier delivery ran the handler: finish it through the normal claim instead).
    """
    at = _to_dt(now)
    snap = item_ref.get(transaction=tx)
    if not snap.exists:
        tx.create(item_ref, _new_item(payload, task_name, at, ItemStatus.CANCELLED, attempt=0, owner=owner,
                                      error_code="job_cancelled"))
        return "cancelled"
    item = snap.to_dict() or {}
    status = item.get("status")
    attempt = int(item.get("attempt") or 0)
    if status == ItemStatus.PROCESSING.value:
        expires = _as_dt(item.get("lease_expires_at"))
        if expires is not None and expires > at:
            return "busy"
    elif status != ItemStatus.QUEUED.value:
        return "terminal"
    if started_in_current_round(item):
        return "started"
    tx.update(
        item_ref,
        {
            "status": ItemStatus.CANCELLED.value,
            "lease_owner": None,
            "lease_expires_at": None,
            "updated_at": at,
            "finished_at": at,
            "history": _history(item, _entry(ItemStatus.CANCELLED, attempt, owner, at, "job_cancelled")),
        },
    )
    return "cancelled"


def extend_lease(tx, item_ref, owner: str, now: float, lease_s: float) -> bool:
    """Heartbeat: push the lease forward if this delivery still owns the processing item."""
    snap = item_ref.get(transaction=tx)
    item = snap.to_dict() if snap.exists else None
    if not item or item.get("status") != ItemStatus.PROCESSING.value or item.get("lease_owner") != owner:
        return False
    at = _to_dt(now)
    tx.update(item_ref, {"lease_expires_at": _to_dt(now + lease_s), "heartbeat_at": at})
    return True


@dataclass(frozen=True)
class HandlerOutcome:
    """What the handler produced: a result, or an `ItemError`; `last_attempt` turns retryable into failed."""

    result: dict[str, Any] | None = None
    error: ItemError | None = None
    last_attempt: bool = False


class CompleteKind(str, enum.Enum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    REQUEUED = "requeued"
    LEASE_LOST = "lease_lost"  # another delivery holds or re-queued the item: it is still open
    FINISHED_ELSEWHERE = "finished_elsewhere"  # another delivery already brought it to a final status


def complete_item(tx, item_ref, owner: str, now: float, outcome: HandlerOutcome) -> CompleteKind:
    """Write the handler's outcome, only if this delivery still owns the processing item."""
    snap = item_ref.get(transaction=tx)
    item = snap.to_dict() if snap.exists else None
    if item and item.get("status") in _FINAL_STATUSES:
        return CompleteKind.FINISHED_ELSEWHERE
    if not item or item.get("status") != ItemStatus.PROCESSING.value or item.get("lease_owner") != owner:
        return CompleteKind.LEASE_LOST
    at = _to_dt(now)
    attempt = int(item.get("attempt") or 0)
    update: dict[str, Any] = {"updated_at": at, "lease_expires_at": None}
    if outcome.error is None:
        kind, status, error_code = CompleteKind.SUCCEEDED, ItemStatus.SUCCEEDED, None
        update.update({"result": outcome.result or {}, "error": None, "finished_at": at})
    else:
        error = outcome.error
        error_code = error.code
        if error.retryable and not outcome.last_attempt:
            kind, status = CompleteKind.REQUEUED, ItemStatus.QUEUED
            update["lease_owner"] = None
        else:
            kind, status = CompleteKind.FAILED, ItemStatus.FAILED
            update["finished_at"] = at
        update["error"] = {"code": error.code, "message": error.message, "retryable": error.retryable}
    update["status"] = status.value
    update["history"] = _history(item, _entry(status, attempt, owner, at, error_code))
    tx.update(item_ref, update)
    return kind


# ---------------------------------------------------------------------------------------------
# Job snapshot cache (claims must not all read-lock the job document)


class _JobCache:
    def __init__(self, ttl_s: float):
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[float, dict | None]] = {}

    def get(self, db, job_id: str) -> dict | None:
        now = time.monotonic()
        with self._lock:
            hit = self._entries.get(job_id)
        if hit and hit[0] > now:
            return hit[1]
        snap = db.collection(JOBS).document(job_id).get()
        data = snap.to_dict() if snap.exists else None
        with self._lock:
            if len(self._entries) > 10_000:
                self._entries.clear()
            self._entries[job_id] = (now + self.ttl_s, data)
        return data

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


JOB_CACHE = _JobCache(JOB_CACHE_TTL_S)


# ---------------------------------------------------------------------------------------------
# Heartbeat


class Heartbeat:
    """Extends the lease every `interval_s` in a background thread; `alive()` turns False when lost."""

    def __init__(self, db, item_ref, owner: str, clock: Clock, lease_s: float, interval_s: float, log_fields: dict):
        self._db, self._ref, self._owner, self._clock = db, item_ref, owner, clock
        self._lease_s, self._interval_s, self._fields = lease_s, interval_s, log_fields
        self._stop = threading.Event()
        self._lost = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{owner}", daemon=True)
        self.beats = 0

    def start(self) -> "Heartbeat":
        if self._interval_s > 0:
            self._thread.start()
        return self

    def alive(self) -> bool:
        return not self._lost.is_set()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                kept = run_transaction(self._db, "heartbeat", extend_lease, self._ref, self._owner, self._clock(), self._lease_s)
            except Exception as exc:  # a failed beat is not a lost lease; try again next interval
                log_event("heartbeat_failed", severity="WARNING", error=f"{type(exc).__name__}: {exc}", **self._fields)
                continue
            self.beats += 1
            if not kept:
                self._lost.set()
                log_event("lease_lost", severity="WARNING", detected_by="heartbeat", **self._fields)
                return


# ---------------------------------------------------------------------------------------------
# Progress check requests


@dataclass
class _ProgressRequests:
    """(job, window) pairs already requested by this process: skip the redundant create RPC."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    seen: set[tuple[str, int]] = field(default_factory=set)

    def first(self, job_id: str, window: int) -> bool:
        with self.lock:
            if (job_id, window) in self.seen:
                return False
            if len(self.seen) > 10_000:
                self.seen = {k for k in self.seen if k[1] >= window - 1}
            self.seen.add((job_id, window))
            return True

    def forget(self, job_id: str, window: int) -> None:
        with self.lock:
            self.seen.discard((job_id, window))


PROGRESS_REQUESTS = _ProgressRequests()


def request_progress_check(job_id: str, now: float) -> str | None:
    """Ask for one progress check of the job at the end of the current window (name-deduplicated).

    Returns the task id asked for, or None when skipped; never raises.
    """
    from shared.tasks import TaskSpec, create_task

    s = settings()
    window_s = s.progress_check_s if s.progress_check_s > 0 else 5.0
    window = int(now // window_s)
    if not PROGRESS_REQUESTS.first(job_id, window):
        return None
    task_id = progress_task_name_for(job_id, window)
    if not s.worker_url:
        log_event("progress_check_skipped", severity="DEBUG", job_id=job_id, reason="UPCFAN_WORKER_URL not set")
        return None
    spec = TaskSpec(
        task_id=task_id,
        url=s.worker_url + "/progress",
        payload={"job_id": job_id},
        schedule_time=_to_dt((window + 1) * window_s + 1.0),
    )
    try:
        created = create_task(s.control_queue_path, spec)
    except Exception as exc:  # the item is done; a missed check is caught by the next one or the sweeper
        PROGRESS_REQUESTS.forget(job_id, window)
        log_event(
            "progress_check_enqueue_failed",
            severity="WARNING",
            job_id=job_id,
            task_id=task_id,
            error=f"{type(exc).__name__}: {exc}",
        )
        return None
    log_event("progress_check_requested", severity="DEBUG", job_id=job_id, task_id=task_id, created=created)
    return task_id


# ---------------------------------------------------------------------------------------------
# The delivery


def process_item_delivery(
    payload: Any,
    headers: Mapping[str, str] | None,
    now: float | dt.datetime | None = None,
    *,
    handler: ItemHandler | None = None,
    db=None,
    lease_s: float | None = None,
    heartbeat_s: float | None = None,
) -> WorkerOutcome:
    """Process one Cloud Tasks delivery of an item task. Never raises; the outcome is the HTTP answer."""
    try:
        task = ItemTask.model_validate(payload)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors())
        message = f"item task payload is malformed and can never succeed: {problems}"
        log_event("bad_payload", severity="ERROR", error_code="bad_payload", message_detail=message)
        return WorkerOutcome(200, {"status": "bad_payload", "error": {"code": "bad_payload", "message": message}})

    s = settings()
    delivery = Delivery.from_headers(headers, s.item_max_attempts)
    fields = {"job_id": task.job_id, "gtin": task.gtin, "owner": delivery.owner, "round": task.round}
    try:
        return _deliver(task, delivery, Clock(now), handler, db, lease_s or s.lease_s, heartbeat_s or s.heartbeat_s, fields)
    except Exception as exc:  # store faults and bugs: answer 503 so Cloud Tasks tries again later
        code = "store_unavailable" if isinstance(exc, gexc.GoogleAPICallError) else "worker_error"
        message = f"worker could not process the delivery: {type(exc).__name__}: {exc}"
        log_event("delivery_error", severity="ERROR", error_code=code, error=message, **fields)
        return WorkerOutcome(503, {"status": "error", "error": {"code": code, "message": message}, **_ids(task)})


def _ids(task: ItemTask) -> dict[str, Any]:
    return {"job_id": task.job_id, "gtin": task.gtin}


def _deliver(task, delivery, clock, handler, db, lease_s, heartbeat_s, fields) -> WorkerOutcome:
    if db is None:
        from shared.clients import firestore_client

        db = firestore_client()
    job = JOB_CACHE.get(db, task.job_id)
    if job is None:
        log_event("job_missing", severity="WARNING", status="noop", **fields)
        return WorkerOutcome(200, {"status": "job_missing", **_ids(task)})

    item_ref = db.collection(JOBS).document(task.job_id).collection(ITEMS).document(task.gtin)

    # The answer rule that keeps every item driven to a final status: a delivery answers 2xx only
    # when the item is final (or belongs to a newer round). Any delivery's 2xx may end the task,
    # and the task is the only thing that ever re-drives its item; so "someone else holds it" is
    # a 409, never a 200: that someone may die, or requeue the item, after the task is gone.
    wait_s = min(lease_s + LAST_ATTEMPT_MARGIN_S, LAST_ATTEMPT_WAIT_MAX_S) if delivery.last_attempt else 0.0
    if job.get("status") == JobStatus.CANCELLED.value:
        now = clock()
        result = _while_busy(lambda: run_transaction(db, "cancel", cancel_item, item_ref, delivery.owner, clock(), task,
                                                     delivery.task_name),
                             lambda r: r == "busy", wait_s, fields)
        if result != "started":
            log_event("item_cancelled" if result == "cancelled" else "cancel_noop",
                      severity="WARNING" if result == "busy" else "INFO", status=result, **fields)
            if result == "cancelled":
                request_progress_check(task.job_id, now)
            if result == "busy":
                return _busy_answer(task, holder=None, reason="leased")
            return WorkerOutcome(200, {"status": "cancelled" if result == "cancelled" else result, **_ids(task)})
        log_event("cancelled_job_item_finishing", status="started", **fields)

    claim = _while_busy(lambda: _claim(db, item_ref, delivery, clock, lease_s, task, fields),
                        lambda c: c.kind in (ClaimKind.BUSY, ClaimKind.CONTENDED), wait_s, fields)
    fields = {**fields, "attempt": claim.attempt}
    if claim.kind is ClaimKind.CONTENDED:
        return _busy_answer(task, holder=None, reason="contended")
    if claim.kind is ClaimKind.BUSY:
        log_event(
            "claim_busy",
            severity="WARNING" if delivery.last_attempt else "INFO",
            status=claim.status,
            holder=claim.previous_owner,
            lease_expires_at=claim.lease_expires_at,
            last_attempt=delivery.last_attempt,
            **fields,
        )
        return _busy_answer(task, holder=claim.previous_owner, reason="leased",
                            lease_expires_at=str(claim.lease_expires_at))
    if claim.kind is not ClaimKind.CLAIMED:
        log_event(f"claim_{claim.kind.value}", status=claim.status, item_round=claim.round, **fields)
        return WorkerOutcome(200, {"status": "noop", "reason": claim.kind.value, "item_status": claim.status, **_ids(task)})
    log_event(
        "item_claimed",
        status=ItemStatus.PROCESSING.value,
        created=claim.created,
        reclaimed_from=claim.previous_owner if claim.reclaimed else None,
        retry_count=delivery.retry_count,
        execution_count=delivery.execution_count,
        **fields,
    )

    handler = handler or handler_for(job.get("options"))
    heartbeat = Heartbeat(db, item_ref, delivery.owner, clock, lease_s, heartbeat_s, fields).start()
    ctx = ItemContext(
        job_id=task.job_id,
        gtin=task.gtin,
        upc=task.upc,
        line=task.line,
        round=claim.round,
        attempt=claim.attempt,
        options=dict(job.get("options") or {}),
        heartbeat=heartbeat.alive,
    )
    started = time.monotonic()
    lease_lost = False
    try:
        outcome = HandlerOutcome(result=_checked_result(handler.handle(ctx)), last_attempt=delivery.last_attempt)
    except LeaseLostError:
        lease_lost = True
        outcome = None
    except ItemError as exc:
        outcome = HandlerOutcome(error=exc, last_attempt=delivery.last_attempt)
    except Exception as exc:  # a bug or an unclassified fault: retried with backoff like any transient
        # fault (it may be one), failed with what actually happened once its attempts are spent.
        crashed = RetryableItemError(
            f"handler {getattr(handler, 'name', type(handler).__name__)} crashed: {type(exc).__name__}: {str(exc)[:300]}",
            code="handler_crashed",
        )
        log_event("handler_crashed", severity="ERROR", exception=type(exc).__name__, error=str(exc)[:300], **fields)
        outcome = HandlerOutcome(error=crashed, last_attempt=delivery.last_attempt)
    finally:
        heartbeat.stop()
    elapsed_ms = int((time.monotonic() - started) * 1000)

    if lease_lost or not heartbeat.alive():
        # The item is another delivery's now (or re-queued): 409 keeps the task, whose next
        # delivery finds the item final (200 no-op) or free to claim.
        log_event("result_discarded", severity="WARNING", status="lease_lost", elapsed_ms=elapsed_ms, **fields)
        return WorkerOutcome(409, {"status": "lease_lost", **_ids(task)})

    now = clock()
    kind = _with_store_retries(lambda: run_transaction(db, "complete", complete_item, item_ref, delivery.owner, now, outcome))
    error = outcome.error.to_dict() if outcome.error else None
    if error:
        error.pop("details", None)
    status_of = {
        CompleteKind.SUCCEEDED: ItemStatus.SUCCEEDED.value,
        CompleteKind.FAILED: ItemStatus.FAILED.value,
        CompleteKind.REQUEUED: ItemStatus.QUEUED.value,
        CompleteKind.LEASE_LOST: "lease_lost",
        CompleteKind.FINISHED_ELSEWHERE: "finished_elsewhere",
    }
    log_event(
        f"item_{kind.value}",
        severity={"succeeded": "INFO", "requeued": "WARNING", "lease_lost": "WARNING",
                  "finished_elsewhere": "WARNING"}.get(kind.value, "ERROR"),
        status=status_of[kind],
        error_code=error["code"] if error else None,
        error=error["message"] if error else None,
        last_attempt=delivery.last_attempt,
        elapsed_ms=elapsed_ms,
        details=outcome.error.details if outcome.error and outcome.error.details else None,
        **fields,
    )
    body: dict[str, Any] = {"status": status_of[kind], "attempt": claim.attempt, **_ids(task)}
    if error and kind not in (CompleteKind.LEASE_LOST, CompleteKind.FINISHED_ELSEWHERE):
        body["error"] = error
    if kind is CompleteKind.SUCCEEDED:
        body["result"] = outcome.result
    if kind in (CompleteKind.SUCCEEDED, CompleteKind.FAILED):
        request_progress_check(task.job_id, now)
    return WorkerOutcome({CompleteKind.REQUEUED: 503, CompleteKind.LEASE_LOST: 409}.get(kind, 200), body)


def _claim(db, item_ref, delivery: Delivery, clock: Clock, lease_s: float, task: ItemTask, fields: dict) -> Claim:
    try:
        return run_transaction(db, "claim", claim_item, item_ref, delivery.owner, clock(), lease_s, task, delivery.task_name)
    except (ValueError, gexc.Aborted) as exc:  # ValueError: the client's "failed to commit in N attempts"
        # Other deliveries of this item hold its lock right now; one of them will own it.
        log_event("claim_contended", severity="WARNING", error=f"{type(exc).__name__}: {exc}", **fields)
        return Claim(ClaimKind.CONTENDED)


def _while_busy(attempt: Callable[[], Any], busy: Callable[[Any], bool], wait_s: float, fields: dict) -> Any:
    """Run `attempt`; on the task's last attempt keep retrying while another delivery holds the item.

    After the last attempt's non-2xx answer the task is gone, and with it whatever would re-drive
    the item if the holder died or re-queued it. So the last attempt waits (bounded, well inside
    the dispatch deadline) for the holder to finish or its lease to lapse, then tries again.
    """
    result = attempt()
    deadline = time.monotonic() + wait_s
    while busy(result) and time.monotonic() < deadline:
        time.sleep(min(LAST_ATTEMPT_POLL_S, max(0.0, deadline - time.monotonic())))
        result = attempt()
    if wait_s and busy(result):
        log_event("last_attempt_still_busy", severity="ERROR", waited_s=wait_s,
                  message_detail="the task ends now while another delivery holds the item; the sweeper flags it "
                                 "if that delivery never finishes", **fields)
    return result


def _busy_answer(task: ItemTask, *, holder: str | None, reason: str,
                 lease_expires_at: str | None = None) -> WorkerOutcome:
    body: dict[str, Any] = {"status": "busy", "reason": reason, **_ids(task)}
    if holder:
        body["holder"] = holder
    if lease_expires_at:
        body["lease_expires_at"] = lease_expires_at
    return WorkerOutcome(409, body)


def _with_store_retries(fn: Callable[[], Any], attempts: int = 3) -> Any:
    """Retry a transaction on transient store faults: losing a finished handler's result costs a rerun."""
    for i in range(attempts):
        try:
            return fn()
        except _TRANSIENT_STORE_ERRORS:
            if i == attempts - 1:
                raise
            time.sleep(0.2 * (2**i))


def _checked_result(result: Any) -> dict[str, Any]:
    if result is None:
        return {}
    if not isinstance(result, dict):
        raise TypeError(f"handler returned {type(result).__name__}, expected a dict")
    return result
