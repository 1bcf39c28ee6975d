"""Asking for a job's progress check when an item finishes: at most one check task per job and window."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from shared.config import settings
from shared.log import log_event
from shared.naming import progress_task_name_for
from shared.payloads import ProgressTask
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


def request_progress_check(job_id: str, now: float) -> str | None:
    """Ask for one progress check of the job at the end of the current window (name-deduplicated).

    Returns the task id asked for, or None when skipped; never raises.
    """
    from shared.tasks import PROGRESS_TASK, TaskSpec, create_task

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
        kind=PROGRESS_TASK,
        payload=ProgressTask(job_id=job_id).to_body(),
        schedule_time=utc((window + 1) * window_s + 1.0),
    )
    try:
        created = create_task(s.control_queue_path, spec)
    except Exception as exc:  # the item is done; a missed check is caught by the next one or the sweeper
        PROGRESS_REQUESTS.forget(job_id, window)
        log_event("progress_check_enqueue_failed", severity="WARNING", job_id=job_id, task_id=task_id,
                  error=f"{type(exc).__name__}: {exc}")
        return None
    log_event("progress_check_requested", severity="DEBUG", job_id=job_id, task_id=task_id, created=created)
    return task_id
