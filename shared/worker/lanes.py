"""Within one worker process, deliveries of small jobs go first: their items and their progress checks.

The small-jobs lane (its own queue, see docs/architecture.md, "Fairness between jobs") keeps a small
job's tasks from waiting behind a bulk backlog in Cloud Tasks. It cannot keep them from sharing a
worker's CPU with bulk deliveries: an instance serves both lanes, and with every instance busy (Cloud
Run at its max instances, or one local process) a small job's items ran at a fifth of their solo rate
while 32 bulk deliveries ran beside them. So a bulk delivery that arrives while small-job deliveries
are in flight in this process waits for them, at most `BULK_YIELD_MAX_S`, before its claim: it holds
no lease while it waits, and the cap bounds what a stream of small jobs can cost the large one. A
small job's progress check counts as one of its deliveries (`shared.progress.check_job_progress`):
its completing count, under a bulk job's load, was what was left of its delay.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Iterator

from shared.config import SMALL_LANE

# The longest a bulk delivery waits for small-job deliveries (counted in the item's worst case,
# shared/deadlines.py). Long enough to let a burst of small-job items through, short against the
# item's 180 s dispatch deadline.
BULK_YIELD_MAX_S = 5.0


class LanePriority:
    """Small-job deliveries in flight in this process, and bulk deliveries waiting for them."""

    def __init__(self, max_wait_s: float = BULK_YIELD_MAX_S):
        self.max_wait_s = max_wait_s
        self._changed = threading.Condition()
        self._small_in_flight = 0

    @contextmanager
    def small_delivery(self) -> Iterator[None]:
        with self._changed:
            self._small_in_flight += 1
        try:
            yield
        finally:
            with self._changed:
                self._small_in_flight -= 1
                if self._small_in_flight == 0:
                    self._changed.notify_all()

    @contextmanager
    def turn(self, lane: str) -> Iterator[float]:
        """One delivery of a job in `lane`: a small job's is counted in flight while it runs; any other
        first waits for the small ones (`yield_to_small`). Gives the seconds it waited."""
        if lane == SMALL_LANE:
            with self.small_delivery():
                yield 0.0
        else:
            yield self.yield_to_small()

    def yield_to_small(self) -> float:
        """Wait while small-job deliveries are in flight, at most `max_wait_s`; the seconds waited."""
        started = time.monotonic()
        with self._changed:
            if self._small_in_flight == 0:
                return 0.0
            self._changed.wait_for(lambda: self._small_in_flight == 0, timeout=self.max_wait_s)
        return time.monotonic() - started


LANE_PRIORITY = LanePriority()
