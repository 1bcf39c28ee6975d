"""The per-job circuit breaker: pause a job whose items cannot succeed, so an operator decides.

A job pauses (`shared/job_state.pause`) when
- the marketplace refuses our credentials (`marketplace_unauthorized`, 401/403): every further call
  would be refused too, so the first such answer pauses the job at once;
- more than UPCFAN_BREAKER_FAILURE_PERCENT of its recent attempts in this worker process ended in a
  PERMANENT error (`failure_rate`): a window of the last UPCFAN_BREAKER_WINDOW attempts that had a
  definite outcome (succeeded, or failed permanently), judged once UPCFAN_BREAKER_MIN_ATTEMPTS are in it;
- its failed items exceed the job option `max_failed_percent` of its items (`shared/progress.py`).

Retryable errors (5xx, 429, timeouts) neither count nor trip it: they are what an item's retry
window (hours, `shared/item_state.complete`) rides out on its own, and a paused job needs an
operator; pausing for an outage would turn a self-healing wait into a page.

Pausing only ever stops work; nothing here resumes or starts it. The transaction that pauses the job
is the only one that alerts (one Slack message per pause, recorded as the job event `pause_note`).
"""

from __future__ import annotations

import collections
import datetime as dt
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable

from shared.config import settings
from shared.events import Event
from shared.job_state import PauseResult
from shared.log import log_event
from shared.model import JobStatus
from shared.store import Store

# Item error codes that say the job as a whole cannot make progress (not this one item).
SYSTEMIC_ERROR_CODES = frozenset({"marketplace_unauthorized"})

MARKETPLACE_UNAUTHORIZED = "marketplace_unauthorized"
FAILURE_RATE = "failure_rate"
MAX_FAILED_PERCENT = "max_failed_percent"
OPERATOR = "operator"

_MAX_JOBS = 10_000


@dataclass(frozen=True)
class Verdict:
    tripped: bool
    failures: int
    attempts: int


class FailureWindow:
    """Per process: each job's last `size` definite outcomes (True = permanent failure). A job's window
    starts over when the job was resumed since (`epoch`: its `resumed_at`) and after it trips."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[str, tuple[Any, collections.deque[bool]]] = {}

    def record(self, job_id: str, epoch: Any, failed: bool, *, size: int, min_attempts: int,
               percent: float) -> Verdict:
        with self._lock:
            held = self._jobs.get(job_id)
            if held is None or held[0] != epoch or held[1].maxlen != size:
                if len(self._jobs) > _MAX_JOBS:
                    self._jobs.clear()
                held = (epoch, collections.deque(maxlen=size))
                self._jobs[job_id] = held
            window = held[1]
            window.append(failed)
            failures, attempts = sum(window), len(window)
            tripped = attempts >= min_attempts and failures * 100.0 > percent * attempts
            if tripped:
                window.clear()
            return Verdict(tripped, failures, attempts)

    def clear(self) -> None:
        with self._lock:
            self._jobs.clear()


FAILURE_WINDOW = FailureWindow()


def record_outcome(job_id: str, epoch: Any, *, permanent_failure: bool) -> Verdict:
    """Count one attempt's definite outcome for the job; whether the breaker trips now."""
    s = settings()
    return FAILURE_WINDOW.record(job_id, epoch, permanent_failure, size=s.breaker_window,
                                 min_attempts=s.breaker_min_attempts, percent=s.breaker_failure_percent)


class _PauseLocks:
    """One pause attempt per job at a time in this process. A systemic fault reaches every delivery in
    flight at once; as many transactions on the one job document would mostly abort each other (the
    Firestore emulator breaks such lock deadlocks only by timing one side out), so the others wait for
    the first and then find the job paused without a transaction of their own."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[str, threading.Lock] = {}

    def of(self, job_id: str) -> threading.Lock:
        with self._lock:
            if len(self._jobs) > _MAX_JOBS:
                self._jobs = {k: v for k, v in self._jobs.items() if v.locked()}
            return self._jobs.setdefault(job_id, threading.Lock())


_PAUSE_LOCKS = _PauseLocks()


def pause_job(store: Store, job_id: str, code: str, message: str, actor: str, at: dt.datetime, *,
              post: Callable[..., Any] | None = None, evidence_at: dt.datetime | None = None) -> PauseResult:
    """Pause the job (running/ingesting → paused) and, when this call paused it, send the one alert.
    `evidence_at`: see `job_state.pause` (a resume after it wins)."""
    with _PAUSE_LOCKS.of(job_id):
        current = store.get_job(job_id)  # no transaction when another delivery paused it meanwhile
        if current is not None and current.status == JobStatus.PAUSED.value:
            log_event("job_pause_noop", job_id=job_id, status=current.status, code=code, actor=actor)
            return PauseResult(False, current.status, current)
        result = store.pause_job(job_id, {"code": code, "message": message}, actor, at, evidence_at)
    if not result.changed:
        log_event("job_pause_noop", job_id=job_id, status=result.status, code=code, actor=actor,
                  **({"reason": "resumed after the evidence"} if result.stale_evidence else {}))
        return result
    log_event("job_paused", severity="WARNING", job_id=job_id, status=result.status, code=code,
              error=message, actor=actor, previous_status=result.job.status if result.job else None)
    _alert(store, job_id, result, code, message, actor, at, post)
    return result


def _alert(store: Store, job_id: str, result: PauseResult, code: str, message: str, actor: str,
           at: dt.datetime, post: Callable[..., Any] | None) -> None:
    """The pause's Slack alert and its record (`pause_note`); never raises: the pause stands regardless."""
    try:
        from shared.alerts import notify_job_paused

        job_doc = dict(result.job.doc) if result.job else {"job_id": job_id}
        sent = notify_job_paused({**job_doc, "job_id": job_id}, code, message, actor, post=post)
        store.record_event(job_id, Event("pause_note", os.environ.get("K_SERVICE") or actor, at,
                                         {"code": code, "sent": sent.ok, "status": sent.status,
                                          "error": sent.error}))
    except Exception as exc:  # noqa: BLE001 - an alert must never undo or repeat a pause
        log_event("job_pause_notify_failed", severity="WARNING", job_id=job_id,
                  error=f"{type(exc).__name__}: {exc}"[:300])
