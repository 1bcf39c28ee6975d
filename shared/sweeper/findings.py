"""What a sweep finds: severities, the `Finding` per stalled job, and the pure helpers rules share."""

from __future__ import annotations

import datetime as dt
import enum
from dataclasses import dataclass
from typing import Any, Iterable

from shared.config import Settings
from shared.model import as_utc  # noqa: F401 - the rules take it from here with the other helpers

UTC = dt.timezone.utc
EPOCH = dt.datetime(1970, 1, 1, tzinfo=UTC)


class Severity(str, enum.Enum):
    INFO = "INFO"  # a recovery note
    WARNING = "WARNING"  # stalled
    CRITICAL = "CRITICAL"  # stalled longer than `stall_critical_minutes`, or systemic

    @classmethod
    def rank_of(cls, value: Any) -> int:
        """Order of a stored severity; anything unknown (or missing) ranks with INFO."""
        try:
            return _SEVERITY_ORDER.index(cls(value))
        except ValueError:
            return 0


_SEVERITY_ORDER = (Severity.INFO, Severity.WARNING, Severity.CRITICAL)


@dataclass
class Finding:
    job_id: str
    kind: str
    severity: Severity
    reason: str
    since: dt.datetime  # when the job (or its oldest stuck item) last moved
    job: dict
    update_time: Any = None  # the job document's, for the write precondition (set by the engine)
    stuck_items: int = 0

    def __post_init__(self) -> None:
        self.severity = Severity(self.severity)  # a rule may give the plain string


def severity_for(stalled_for: dt.timedelta, cfg: Settings) -> Severity:
    """WARNING once stalled; CRITICAL when stalled longer than `stall_critical_minutes`."""
    critical = stalled_for >= dt.timedelta(minutes=cfg.stall_critical_minutes)
    return Severity.CRITICAL if critical else Severity.WARNING


def minutes(delta: dt.timedelta) -> int:
    return int(delta.total_seconds() // 60)


def open_in_snapshot(job: dict) -> tuple[int, int]:
    """(queued + processing, items never born) from the job's counts snapshot."""
    counts = job.get("counts") or {}
    born = sum(int(counts.get(k) or 0) for k in ("queued", "processing", "succeeded", "failed", "cancelled"))
    total = int((job.get("totals") or {}).get("items") or 0)
    return int(counts.get("queued") or 0) + int(counts.get("processing") or 0), max(0, total - born)


def never_claimed_from_snapshot(job: dict) -> tuple[int | None, bool]:
    """(never-claimed items, exact?) from the job document alone.

    Items are born `queued` with attempt 0 at fan-out (older jobs' items at their first claim), leave
    that state at their first claim and are never deleted. So an item never claimed now was `queued`
    in the job's `counts` snapshot (written by the last progress check) or not yet born then, and
    `counts.queued + totals.items - sum(counts)` is an upper bound of "never reached a worker"; when
    it is 0 the answer is exactly 0 and no count aggregation is needed. Before fan-out is done (or
    without totals) the answer is unknown (None) — also without a count.
    """
    total = (job.get("totals") or {}).get("items")
    if total is None or not job.get("fanout_done_at"):
        return None, True
    _, unborn = open_in_snapshot(job)
    bound = int((job.get("counts") or {}).get("queued") or 0) + unborn
    return (0, True) if bound == 0 else (bound, False)


def merge_findings(findings: Iterable[Finding]) -> dict[str, Finding]:
    """One finding per job: the most severe (then first) kind, with every reason kept."""
    merged: dict[str, Finding] = {}
    for f in findings:
        cur = merged.get(f.job_id)
        if cur is None:
            merged[f.job_id] = f
            continue
        more_severe = Severity.rank_of(f.severity) > Severity.rank_of(cur.severity)
        best, other = (f, cur) if more_severe else (cur, f)
        best.reason = f"{best.reason}; {other.reason}"
        best.stuck_items = max(best.stuck_items, other.stuck_items)
        best.since = min(best.since, other.since)
        best.update_time = best.update_time or other.update_time
        merged[f.job_id] = best
    return merged
