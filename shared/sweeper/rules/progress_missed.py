"""Running jobs whose progress check could not be enqueued (`progress_check_missed`).

| finding | query | index |
|---|---|---|
| progress check missed (`progress_check_missed`) | jobs `status == running AND progress_check_missed_at < now - grace` | jobs (status, progress_check_missed_at) |

A worker that finished an item asks for the job's progress check; when that CreateTask still fails
after its retries, the worker writes `progress_check_missed_at` on the job
(`shared/worker/progress_requests.py`) and the next check clears it. If the failed request came
from the job's last item, no later completion asks again and the job would stay `running` with
every item final: this rule reports it on the next sweep rather than after `UPCFAN_STALL_MINUTES`.
The grace (`MISSED_GRACE`) leaves time for a later item's check to clear the flag first. Jobs
without the field never match (Firestore leaves documents without it out of an inequality).
"""

from __future__ import annotations

import datetime as dt

from shared.config import Settings
from shared.model import JOBS, PROGRESS_CHECK_MISSED_AT, PROGRESS_CHECK_MISSED_ERROR, JobStatus
from shared.sweeper.findings import Finding, as_utc, minutes, severity_for
from shared.sweeper.rules.base import IndexSpec, Query, Rule, Where

PROGRESS_CHECK_MISSED = "progress_check_missed"
# A few check windows: another completion's check usually clears the flag well within this.
MISSED_GRACE = dt.timedelta(minutes=2)


def classify(job: dict, now: dt.datetime, cfg: Settings) -> Finding | None:
    missed_at = as_utc(job.get(PROGRESS_CHECK_MISSED_AT))
    if missed_at is None:
        return None
    reason = (f"a progress check could not be enqueued {minutes(now - missed_at)} min ago "
              f"({str(job.get(PROGRESS_CHECK_MISSED_ERROR) or 'no error recorded')[:200]}); if every item is final "
              "the job stays running until a check runs (an item completion asks for one)")
    return Finding(job["job_id"], PROGRESS_CHECK_MISSED, severity_for(now - missed_at, cfg), reason, missed_at, job)


def check_ran(job: dict) -> str | None:
    return "a progress check ran" if job.get(PROGRESS_CHECK_MISSED_AT) is None else None


RULE = Rule(
    name="progress_missed",
    kinds=(PROGRESS_CHECK_MISSED,),
    query=Query(JOBS, (
        Where("status", "==", lambda now, cfg: JobStatus.RUNNING.value),
        Where(PROGRESS_CHECK_MISSED_AT, "<", lambda now, cfg: now - MISSED_GRACE),
    )),
    classify=classify,
    index=IndexSpec(JOBS, "COLLECTION", ("status", PROGRESS_CHECK_MISSED_AT)),
    moved_on=check_ran,
)
