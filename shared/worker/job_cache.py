"""A short-lived per-process cache of job documents, so claims do not all read-lock the job."""

from __future__ import annotations

import threading
import time

from shared.model import Job
from shared.store import Store

# How long a worker may not yet see a job's cancel (tests/integration/test_worker_stack.py relies on it).
JOB_CACHE_TTL_S = 2.0
_MAX_ENTRIES = 10_000


class JobCache:
    def __init__(self, ttl_s: float):
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[float, Job | None]] = {}

    def get(self, store: Store, job_id: str) -> Job | None:
        now = time.monotonic()
        with self._lock:
            hit = self._entries.get(job_id)
        if hit and hit[0] > now:
            return hit[1]
        job = store.get_job(job_id)
        with self._lock:
            if len(self._entries) > _MAX_ENTRIES:
                self._entries.clear()
            self._entries[job_id] = (now + self.ttl_s, job)
        return job

    def forget(self, job_id: str) -> None:
        """Drop one job's entry: this process just learnt it changed (paused, cancelled), so the next
        delivery reads it again instead of working from the stale copy for the rest of the TTL."""
        with self._lock:
            self._entries.pop(job_id, None)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


JOB_CACHE = JobCache(JOB_CACHE_TTL_S)
