"""Items processing far past their lease (`lease_overrun`): the delivery holding them is gone and no retry came.

| finding | query | index |
|---|---|---|
| item lease overrun (`lease_overrun`) | group `items` `status == processing AND lease_shard in [0..15] AND lease_expires_at < now - overrun` | items CG (status, lease_shard, lease_expires_at) |

The query is bounded (`LEASE_OVERRUN_LIMIT`); its items are grouped by job, and a job whose status
is final is never flagged.

Why the shard: every claim and heartbeat writes `lease_expires_at ≈ now + lease` with status
`processing`, so an index on (status, lease_expires_at) takes every write of every job in flight at
one point, and Firestore keeps such an index to about 500 writes/s. `lease_shard`
(`shared.naming.lease_shard_for`, a hash of the GTIN, written at birth and at every claim) splits
that point into `LEASE_SHARDS`; the `in` over all shards reads the same items as before. An item
processing since before the shard existed has none and is not matched; its next claim writes it.
"""

from __future__ import annotations

import datetime as dt

from shared.config import Settings
from shared.model import ITEMS, ItemStatus, JobStatus
from shared.naming import LEASE_SHARDS
from shared.sweeper.findings import Finding, as_utc, minutes, severity_for
from shared.sweeper.rules.base import MATCHED, IndexSpec, Query, Rule, Where

LEASE_OVERRUN = "lease_overrun"
# Bounds the lease-overrun scan: a pathological backlog costs at most this many reads a sweep.
LEASE_OVERRUN_LIMIT = 1000
_ALL_SHARDS = list(range(LEASE_SHARDS))


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
        Where("lease_shard", "in", lambda now, cfg: _ALL_SHARDS),
        Where("lease_expires_at", "<", lambda now, cfg: now - dt.timedelta(minutes=cfg.lease_overrun_minutes)),
    ), collection_group=True, limit=LEASE_OVERRUN_LIMIT, per_job=True),
    classify=classify,
    index=IndexSpec(ITEMS, "COLLECTION_GROUP", ("status", "lease_shard", "lease_expires_at")),
)
