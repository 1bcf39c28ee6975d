"""Items processing far past their lease (`lease_overrun`): the delivery holding them is gone and no retry came.

| finding | query | index |
|---|---|---|
| item lease overrun (`lease_overrun`) | group `items` `status == processing AND lease_expires_at < now - overrun` | items CG (status, lease_expires_at) |

The query is bounded (`LEASE_OVERRUN_LIMIT`); its items are grouped by job, and a job whose status
is final is never flagged.
"""

from __future__ import annotations

import datetime as dt

from shared.config import Settings
from shared.model import ITEMS, ItemStatus, JobStatus
from shared.sweeper.findings import Finding, as_utc, minutes, severity_for
from shared.sweeper.rules.base import MATCHED, IndexSpec, Query, Rule, Where

LEASE_OVERRUN = "lease_overrun"
# Bounds the lease-overrun scan: a pathological backlog costs at most this many reads a sweep.
LEASE_OVERRUN_LIMIT = 1000


def classify(job: dict, now: dt.datetime, cfg: Settings) -> Finding | None:
    """One finding per job for its overrun items (oldest lease first in `since`); none for a final job."""
    if JobStatus(job.get("status", "failed")).is_final:
        return None  # completed jobs are never touched
    stuck = job[MATCHED]
    oldest = min(as_utc(i.get("lease_expires_at")) or now for i in stuck)
    sample = ", ".join(str(i.get("gtin", "?")) for i in stuck[:3])
    reason = (f"{len(stuck)} item(s) processing with a lease expired {minutes(now - oldest)} min ago "
              f"(e.g. {sample})")
    return Finding(job["job_id"], LEASE_OVERRUN, severity_for(now - oldest, cfg), reason, oldest, job,
                   stuck_items=len(stuck))


RULE = Rule(
    name="items",
    kinds=(LEASE_OVERRUN,),
    query=Query(ITEMS, (
        Where("status", "==", lambda now, cfg: ItemStatus.PROCESSING.value),
        Where("lease_expires_at", "<", lambda now, cfg: now - dt.timedelta(minutes=cfg.lease_overrun_minutes)),
    ), collection_group=True, limit=LEASE_OVERRUN_LIMIT, per_job=True),
    classify=classify,
    index=IndexSpec(ITEMS, "COLLECTION_GROUP", ("status", "lease_expires_at")),
)
