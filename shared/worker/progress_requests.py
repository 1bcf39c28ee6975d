"""Asking for a job's progress check when an item finishes: at most one check task per job and window."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from shared.config import settings
from shared.log import log_event
from shared.model import PROGRESS_CHECK_MISSED_AT as MISSED_AT
from shared.model import PROGRESS_CHECK_MISSED_ERROR as MISSED_ERROR
from shared.naming import progress_task_name_for
from shared.payloads import ProgressTask
from shared.store import Store, default_store
from shared.worker.delivery import utc

# Kept (job, window) pairs beyond which the oldest windows are forgotten.
_MAX_SEEN = 10_000


@dataclass
class ProgressRequests:
    """(job, window) pairs already requested by this process: skip the redundant create RPC."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    seen: set[tuple[str, int]] = field(default_factory=set)

    def first(self, job_id: str, window: int) -> bool:
        with self.lock:
            if (job_id, window) in self.seen:
                return False
            if len(self.seen) > _MAX_SEEN:
                self.seen = {k for k in self.seen if k[1] >= window - 1}
            self.seen.add((job_id, window))
            return True

    def forget(self, job_id: str, window: int) -> None:
        with self.lock:
            self.seen.discard((job_id, window))


PROGRESS_REQUESTS = ProgressRequests()


def progress_window_s() -> float:
    """The progress check window, UPCFAN_PROGRESS_CHECK_S (5 s when unset or 0)."""
    configured = settings().progress_check_s
    return configured if configured > 0 else 5.0


def request_progress_check(job_id: str, now: float, *, store: Store | None = None) -> str | None:
    """Ask for one progress check of the job at the end of the current window (name-deduplicated).

    `now` must be taken after the write that asked for the check has committed: a window that
    ended before the commit may have had its check already, which then did not see this write.
    CreateTask is retried in place on transient faults (`create_task`, `shared.retry.TASK_API`); a
    request that still fails is flagged on the job (`_flag_missed_check`), never swallowed: it may
    have been the job's last chance to complete. Returns the task id asked for, or None; never raises.
    """
    from shared.tasks import PROGRESS_TASK, TaskSpec, create_task

    s = settings()
    window_s = progress_window_s()
    window = int(now // window_s)
    if not PROGRESS_REQUESTS.first(job_id, window):
        return None
    task_id = progress_task_name_for(job_id, window)
    if not s.worker_url:
        log_event("progress_check_skipped", severity="DEBUG", job_id=job_id, reason="UPCFAN_WORKER_URL not set")
        return None
    spec = TaskSpec(
        task_id=task_id,
        kind=PROGRESS_TASK,
        payload=ProgressTask(job_id=job_id).to_body(),
        schedule_time=utc((window + 1) * window_s + 1.0),
    )
    try:
        created = create_task(s.control_queue_path, spec)
    except Exception as exc:  # noqa: BLE001 - the item is done; what is missed is flagged, not raised
        PROGRESS_REQUESTS.forget(job_id, window)
        error = f"{type(exc).__name__}: {exc}"[:300]
        log_event("progress_check_enqueue_failed", severity="ERROR", job_id=job_id, task_id=task_id, error=error)
        _flag_missed_check(store, job_id, task_id, error, now)
        return None
    log_event("progress_check_requested", severity="DEBUG", job_id=job_id, task_id=task_id, created=created)
    return task_id


def _flag_missed_check(store: Store | None, job_id: str, task_id: str, error: str, now: float) -> None:
    """Record on the job that a progress check could not be asked for (`MISSED_AT`, `MISSED_ERROR`).

    A later check clears it (`shared.progress.check_job_progress`); until then the sweeper reports the
    job (`progress_check_missed`, shared/sweeper/rules/progress_missed.py): if this was the job's last
    completion, nothing else would ever check it and it would stay `running` unseen. Chosen over
    "ask again from the next delivery" because after the last item there is no next delivery."""
    try:
        (store or default_store()).update_job(job_id, {MISSED_AT: utc(now), MISSED_ERROR: f"{task_id}: {error}"})
    except Exception as exc:  # noqa: BLE001 - Firestore down too: the log line is all that is left
        log_event("progress_check_missed_unrecorded", severity="ERROR", job_id=job_id, task_id=task_id,
                  error=f"{type(exc).__name__}: {exc}"[:300])
        return
    log_event("progress_check_missed", severity="WARNING", job_id=job_id, task_id=task_id)
