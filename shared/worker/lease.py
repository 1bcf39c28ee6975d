"""Keeping an item's lease while its handler runs, and the last attempt's bounded wait for a holder."""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

from shared.log import log_event
from shared.store import Store
from shared.worker.delivery import Clock, utc

# The last attempt waits for a holder at most lease + margin, polling this often. The cap (= the
# default 60 s lease + margin) is what the item task's time budget counts (`shared/deadlines.py`):
# wait + handler + store calls stays under the item dispatch deadline whatever UPCFAN_LEASE_S says.
LAST_ATTEMPT_MARGIN_S = 5.0
LAST_ATTEMPT_WAIT_MAX_S = 65.0
LAST_ATTEMPT_POLL_S = 1.0


def last_attempt_wait_s(lease_s: float) -> float:
    return min(lease_s + LAST_ATTEMPT_MARGIN_S, LAST_ATTEMPT_WAIT_MAX_S)


class Heartbeat:
    """Extends the lease every `interval_s` in a background thread; `alive()` turns False when lost."""

    def __init__(self, store: Store, job_id: str, gtin: str, owner: str, clock: Clock, lease_s: float,
                 interval_s: float, log_fields: dict):
        self._store, self._job_id, self._gtin, self._owner, self._clock = store, job_id, gtin, owner, clock
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
            now = self._clock()
            try:
                kept = self._store.extend_lease(self._job_id, self._gtin, self._owner, utc(now),
                                                utc(now + self._lease_s))
            except Exception as exc:  # a failed beat is not a lost lease; try again next interval
                log_event("heartbeat_failed", severity="WARNING", error=f"{type(exc).__name__}: {exc}", **self._fields)
                continue
            self.beats += 1
            if not kept:
                self._lost.set()
                log_event("lease_lost", severity="WARNING", detected_by="heartbeat", **self._fields)
                return


def while_held(attempt: Callable[[], Any], held: Callable[[Any], bool], wait_s: float, fields: dict) -> Any:
    """Run `attempt`; on the task's last attempt (`wait_s` > 0) keep retrying while another delivery
    holds the item.

    After the last attempt's non-2xx answer the task is gone, and with it whatever would re-drive
    the item if the holder died or re-queued it. So the last attempt waits (bounded, well inside
    the dispatch deadline) for the holder to finish or its lease to lapse, then tries again.
    """
    result = attempt()
    deadline = time.monotonic() + wait_s
    while held(result) and time.monotonic() < deadline:
        time.sleep(min(LAST_ATTEMPT_POLL_S, max(0.0, deadline - time.monotonic())))
        result = attempt()
    if wait_s and held(result):
        log_event("last_attempt_still_busy", severity="ERROR", waited_s=wait_s,
                  message_detail="the task ends now while another delivery holds the item; the sweeper flags it "
                                 "if that delivery never finishes", **fields)
    return result
