"""A sweep's report, and the meter that counts its billed reads."""

from __future__ import annotations

import math
import threading
import time
from dataclasses import asdict, dataclass, field


@dataclass
class SweepReport:
    checked: int = 0  # documents examined (candidates from all queries)
    flagged: int = 0  # new stall flags and escalations written
    alerted: int = 0  # Slack posts delivered (stall, reminder, recovered, systemic, retries)
    recovered: int = 0  # flags cleared because the job moved again or finished
    suppressed: int = 0  # alerts held back by cooldown
    notify_failed: int = 0  # posts that failed or were deferred (retried next sweep)
    retried: int = 0  # earlier un-notified alerts delivered now
    alerts_held: int = 0  # alerts left pending because this sweep had no webhook (a later sweep posts them)
    systemic: bool = False
    skipped_moved: int = 0  # findings whose job changed between read and write (left alone)
    ms: float = 0.0
    phases_ms: dict = field(default_factory=dict)  # scan / flag / systemic / deliver
    queries_ms: dict = field(default_factory=dict)  # each scan query's own time (they run concurrently)
    documents_read: int = 0
    findings: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def phase_done(self, name: str, since: float) -> float:
        """Records phase `name` as having run from `since` (a monotonic time) until now; returns now."""
        t = time.monotonic()
        self.phases_ms[name] = round((t - since) * 1000, 1)
        return t


class ReadMeter:
    """Counts billed reads honestly: docs returned (≥ 1 per query) and 1 per 1000 index entries counted."""

    def __init__(self) -> None:
        self.reads = 0
        self._lock = threading.Lock()

    def _add(self, n: int) -> None:
        with self._lock:  # queries and count aggregations run on several threads
            self.reads += n

    def query(self, returned: int) -> None:
        self._add(max(1, returned))

    def gets(self, n: int) -> None:
        self._add(n)

    def aggregation(self, counted: int) -> None:
        self._add(max(1, math.ceil(counted / 1000)))
