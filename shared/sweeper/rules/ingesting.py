"""Jobs stuck ingesting (`ingesting_stall`): planning or chunk fan-out never finished.

| finding | query | index |
|---|---|---|
| ingesting too long (`ingesting_stall`) | jobs `status == ingesting AND created_at < now - ingesting_stall` | jobs (status, created_at) |

A job flagged so has moved again once it is no longer ingesting (besides progress or a final status).
"""

from __future__ import annotations

import datetime as dt

from shared.config import Settings
from shared.model import JOBS, JobStatus
from shared.sweeper.findings import Finding, as_utc, minutes, severity_for
from shared.sweeper.rules.base import IndexSpec, Query, Rule, Where

INGESTING_STALL = "ingesting_stall"


def classify(job: dict, now: dt.datetime, cfg: Settings) -> Finding:
    """Every job the query returns is stalled: ingesting longer than `ingesting_stall_minutes`."""
    created = as_utc(job.get("created_at")) or now
    reason = (f"still ingesting {minutes(now - created)} min after creation "
              f"(chunks_total {job.get('chunks_total', '?')})")
    return Finding(job["job_id"], INGESTING_STALL, severity_for(now - created, cfg), reason, created, job)


def left_ingesting(job: dict) -> str | None:
    status = job.get("status")
    return f"job is now {status}" if status != JobStatus.INGESTING.value else None


RULE = Rule(
    name="ingesting",
    kinds=(INGESTING_STALL,),
    query=Query(JOBS, (
        Where("status", "==", lambda now, cfg: JobStatus.INGESTING.value),
        Where("created_at", "<", lambda now, cfg: now - dt.timedelta(minutes=cfg.ingesting_stall_minutes)),
    )),
    classify=classify,
    index=IndexSpec(JOBS, "COLLECTION", ("status", "created_at")),
    reports_never_claimed=False,
    moved_on=left_ingesting,
)
