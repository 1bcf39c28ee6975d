"""Running jobs that stopped moving: `no_progress` and `queued_stall`, classified from one query.

| finding | query | index |
|---|---|---|
| running, no progress (`no_progress`) and queued items not moving (`queued_stall`) | jobs `status == running AND last_progress_at < now - min(stall, queued_stall)`; classified in memory | jobs (status, last_progress_at) |

One rule with two kinds rather than two rules: Firestore cannot compare two fields, so both kinds
come from the same query (the smaller of the two cutoffs), and two rules would read every stalled
running job twice. A running job is `queued_stall` when its `fanout_done_at` and
`last_progress_at` are both older than `queued_stall_minutes` and its counts snapshot still shows
queued items (born at fan-out, claimed or not) or, for jobs from before items were born at
fan-out, items never born (`totals.items > sum(counts)`); otherwise it is `no_progress`
once `last_progress_at` is older than `stall_minutes`. `last_progress_at` is set at job creation
and at fan-out, so a running job always has it.
"""

from __future__ import annotations

import datetime as dt

from shared.config import Settings
from shared.model import JOBS, JobStatus
from shared.sweeper.findings import Finding, as_utc, minutes, open_in_snapshot, severity_for
from shared.sweeper.rules.base import IndexSpec, Query, Rule, Where

NO_PROGRESS = "no_progress"
QUEUED_STALL = "queued_stall"


def _cutoff(now: dt.datetime, cfg: Settings) -> dt.datetime:
    return now - dt.timedelta(minutes=min(cfg.stall_minutes, cfg.queued_stall_minutes))


def classify(job: dict, now: dt.datetime, cfg: Settings) -> Finding | None:
    """A `queued_stall` or `no_progress` finding for a running job that stopped moving, else None."""
    last = as_utc(job.get("last_progress_at"))
    if last is None:
        return None
    fanout = as_utc(job.get("fanout_done_at"))
    queued_cutoff = now - dt.timedelta(minutes=cfg.queued_stall_minutes)
    queued = int((job.get("counts") or {}).get("queued") or 0)
    _, unborn = open_in_snapshot(job)
    if fanout is not None and fanout <= queued_cutoff and last <= queued_cutoff and (queued or unborn):
        # Items are born queued at fan-out, so "never claimed" is within `queued` (the alert counts it);
        # only jobs from before that have items never born, in no status.
        never_born = f" and {unborn} never-claimed" if unborn else ""
        kind, reason = QUEUED_STALL, (
            f"{queued} queued{never_born} items have not moved for {minutes(now - last)} min "
            f"(fan-out done {minutes(now - fanout)} min ago)"
        )
    elif last <= now - dt.timedelta(minutes=cfg.stall_minutes):
        kind, reason = NO_PROGRESS, f"running with no progress for {minutes(now - last)} min"
    else:
        return None
    return Finding(job["job_id"], kind, severity_for(now - last, cfg), reason, last, job)


RULE = Rule(
    name="running",
    kinds=(NO_PROGRESS, QUEUED_STALL),
    query=Query(JOBS, (
        Where("status", "==", lambda now, cfg: JobStatus.RUNNING.value),
        Where("last_progress_at", "<", _cutoff),
    )),
    classify=classify,
    index=IndexSpec(JOBS, "COLLECTION", ("status", "last_progress_at")),
)
