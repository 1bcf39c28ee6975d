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


def give_up_after_s(lease_s: float, interval_s: float) -> float:
    """How long a heartbeat goes on without a successful renewal before it gives the item up: half
    the lease, so the call the handler may be in (13 s at most) still ends while the lease it last
    renewed holds; when beats are due less often than that, halfway from the first due beat to the
    lease's end (a heartbeat never gives up before a renewal was even due)."""
    if interval_s < lease_s / 2:
        return lease_s / 2
    return (interval_s + lease_s) / 2


class Heartbeat:
    """Extends the lease every `interval_s` in a background thread; `alive()` turns False when lost,
    or given up: no renewal has succeeded for `give_up_after_s` since the last one (or the claim).

    A heartbeat that cannot reach Firestore does not know whether the lease still holds; past the
    lease another delivery may claim the item, so this one must stop before its next side effect
    (the handler checks `alive()` right before each). With heartbeats off (`interval_s` = 0)
    nothing renews and nothing is given up."""

    def __init__(self, store: Store, job_id: str, gtin: str, owner: str, clock: Clock, lease_s: float,
                 interval_s: float, log_fields: dict, *, monotonic: Callable[[], float] = time.monotonic):
        self._store, self._job_id, self._gtin, self._owner, self._clock = store, job_id, gtin, owner, clock
        self._lease_s, self._interval_s, self._fields = lease_s, interval_s, log_fields
        self._monotonic = monotonic
        self._give_up_after_s = give_up_after_s(lease_s, interval_s)
        self._renewed_at = monotonic()  # built right after the claim: the claim is the first renewal
        self._last_error: str | None = None
        self._stop = threading.Event()
        self._lost = threading.Event()
        self._abandon_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{owner}", daemon=True)
        self.beats = 0
        # A renewal found the item another delivery's (or no longer processing): unlike a heartbeat that
        # gave up for want of renewals, this one knows its result can no longer be written.
        self.known_lost = False

    def start(self) -> "Heartbeat":
        if self._interval_s > 0:
            self._thread.start()
        return self

    def alive(self) -> bool:
        if self._lost.is_set():
            return False
        if self._interval_s > 0 and self._monotonic() - self._renewed_at >= self._give_up_after_s:
            self._abandon()
            return False
        return True

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def beat(self) -> bool:
        """One renewal; False when the heartbeat is over (lease lost or given up)."""
        if self._lost.is_set():
            return False
        now, started = self._clock(), self._monotonic()
        try:
            kept = self._store.extend_lease(self._job_id, self._gtin, self._owner, utc(now), utc(now + self._lease_s))
        except Exception as exc:  # a failed beat is not a lost lease: try again next interval, until giving up
            self._last_error = f"{type(exc).__name__}: {exc}"
            log_event("heartbeat_failed", severity="WARNING", error=self._last_error, **self._fields)
            return self.alive()
        self.beats += 1
        if not kept:
            self.known_lost = True
            self._lost.set()
            log_event("lease_lost", severity="WARNING", detected_by="heartbeat", **self._fields)
            return False
        if self._lost.is_set():  # given up meanwhile: the handler may have stopped already; stay given up
            return False
        # The lease now runs to `now` + lease_s: measured from when this renewal started, not ended.
        self._renewed_at = started
        return True

    def _abandon(self) -> None:
        with self._abandon_lock:
            if self._lost.is_set():
                return
            self._lost.set()
        log_event("lease_abandoned", severity="WARNING", since_renewal_s=round(self._monotonic() - self._renewed_at, 3),
                  give_up_after_s=self._give_up_after_s, lease_s=self._lease_s, beats=self.beats,
                  last_error=self._last_error,
                  message_detail="no lease renewal succeeded for about half the lease: this delivery stops before "
                                 "its next side effect; another delivery may claim the item once the lease lapses",
                  **self._fields)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            if not self.beat():
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
