"""Planning a sweep's writes: for each finding and each recovery, the flag, its records and its alert.

A plan is data (`Write`s); the engine commits all plans through the store in atomic batches, one
job's writes never straddling two batches. The only I/O here is the never-claimed count for
alerts whose job snapshot cannot answer it.
"""

from __future__ import annotations

import datetime as dt
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from shared import alerts
from shared.config import Settings
from shared.log import log_event
from shared.model import ITEM_BIRTH_FANOUT, ITEMS, JOBS, ItemStatus
from shared.sweeper import rules
from shared.sweeper.decisions import FlagAction, decide_alert, decide_flag, moved_since_flag, prior_alert
from shared.sweeper.findings import Finding, Severity, as_utc, never_claimed_from_snapshot, open_in_snapshot
from shared.sweeper.outbox import NotifyState, stall_event_record
from shared.sweeper.rules.base import Query, Where
from shared.sweeper.rules.lease_overrun import LEASE_OVERRUN
from shared.sweeper.rules.running import NO_PROGRESS, QUEUED_STALL
from shared.sweeper.store import AddJobEvent, AddStallEvent, MergeAlertState, SetStallFlag, SweepStore, Write


@dataclass
class JobPlan:
    """The writes for one job, committed atomically with others in a batch, and what to report once they are in."""

    job_id: str
    writes: list[Write] = field(default_factory=list)
    summary: dict | None = None  # the report's entry for a finding
    outbox: tuple[str, alerts.SlackMessage] | None = None  # (stall event id, message) to post
    flagged: int = 0
    suppressed: int = 0
    recovered: int = 0
    log_fields: dict | None = None

    def log(self) -> None:
        if self.log_fields:
            fields = dict(self.log_fields)
            event, severity = fields.pop("event"), fields.pop("severity", "INFO")
            log_event(event, severity=severity, logger="upcfan.sweeper", **fields)


@dataclass
class _Decided:
    finding: Finding
    action: FlagAction
    stall: dict | None  # the new flag, None when it stays
    why: str | None  # why to alert, None to stay quiet
    prior: dict | None


def plan_findings(store: SweepStore, findings: list[Finding], cooldowns: dict[str, dict], now: dt.datetime,
                  cfg: Settings, pool: Executor) -> list[JobPlan]:
    """Decides every finding (flag / escalate / remind / suppress) and builds its writes; never-claimed
    counts for the alerts that need one run in parallel on `pool`."""
    decided = []
    for f in findings:
        action, stall = decide_flag(f, now)
        prior = prior_alert(f.job_id, f.job, cooldowns)
        decided.append(_Decided(f, action, stall, decide_alert(f.severity, prior, now, cfg.alert_cooldown_minutes),
                                prior))
    counted = [d.finding for d in decided if d.why and _reports_never_claimed(d.finding.kind)]
    nevers = dict(zip([f.job_id for f in counted],
                      pool.map(lambda f: never_claimed(store, f.job_id, f.job, now, cfg), counted)))
    return [plan_finding(store, d, nevers.get(d.finding.job_id), now) for d in decided]


def _reports_never_claimed(kind: str) -> bool:
    rule = rules.rule_for_kind(kind)
    return rule is not None and rule.reports_never_claimed


def never_claimed(store: SweepStore, job_id: str, job: dict, now: dt.datetime, cfg: Settings) -> int | None:
    """Items whose task never reached a worker: born at fan-out and never claimed (`queued`, attempt 0),
    plus, for jobs fanned out before items were born there, `totals.items - count(items)`. Two count
    aggregations, only when the job's own snapshot cannot give the exact answer; one for a job whose
    items were all born at fan-out (`item_birth`), which has no unborn items once fan-out is done."""
    known, exact = never_claimed_from_snapshot(job)
    if exact:
        return known
    items = f"{JOBS}/{job_id}/{ITEMS}"
    unclaimed = store.count(Query(items, (Where("status", "==", lambda now, cfg: ItemStatus.QUEUED.value),
                                          Where("attempt", "==", lambda now, cfg: 0))), now, cfg)
    if job.get("item_birth") == ITEM_BIRTH_FANOUT:
        return unclaimed
    total = int((job.get("totals") or {}).get("items"))
    born = store.count(Query(items, ()), now, cfg)
    return max(0, total - born) + unclaimed


def plan_finding(store: SweepStore, d: _Decided, never: int | None, now: dt.datetime) -> JobPlan:
    f, action, why = d.finding, d.action, d.why
    summary = {"job_id": f.job_id, "kind": f.kind, "severity": f.severity.value, "action": action.value,
               "alert": why or "suppressed"}
    plan = JobPlan(f.job_id, summary=summary)
    if d.stall is None and why is None:
        plan.suppressed = 1
        return plan
    message = None
    if why:
        message = _stall_message(f, action, never, now)
        summary["never_claimed"] = never
    event_id = store.new_stall_event_id()
    record = stall_event_record(f.job_id, f.kind, f.severity.value, f.reason, now, action.value, message,
                                notify_state=NotifyState.PENDING if why else NotifyState.SUPPRESSED,
                                notify_error=None if why else "suppressed by cooldown")
    # The flag carries the alert cooldown (see shared/sweeper/decisions.py): a new flag or escalation
    # keeps the last alert's time and severity unless this one alerts; a reminder updates them.
    written = dict(d.stall if d.stall is not None else (f.job.get("stall") or {}))
    written["last_alert_at"] = now if why else (d.prior or {}).get("last_alert_at")
    written["last_severity"] = f.severity.value if why else (d.prior or {}).get("last_severity")
    plan.writes.append(SetStallFlag(f.job_id, written, f.update_time))
    if d.stall is not None:
        details = {"kind": f.kind, "severity": f.severity.value, "reason": f.reason, "action": action.value,
                   "never_claimed": never}
        plan.writes.append(AddJobEvent(f.job_id, "stall_flagged", now, details))
    plan.writes.append(AddStallEvent(event_id, record))
    state: dict[str, Any] = {"job_id": f.job_id, "updated_at": now, "last_kind": f.kind}
    if action is FlagAction.FLAGGED:
        state["episode_at"] = now
    if why:
        state |= {"last_alert_at": now, "last_severity": f.severity.value}
    plan.writes.append(MergeAlertState(f.job_id, state))
    if d.stall is not None:
        plan.flagged = 1
        plan.log_fields = {"event": "stall_flagged", "severity": "WARNING", "job_id": f.job_id, "kind": f.kind,
                           "stall_severity": f.severity.value, "action": action.value,
                           "alert": why or "suppressed"}
    if why:
        plan.outbox = (event_id, message)
    else:
        plan.suppressed = 1
    return plan


def _stall_message(f: Finding, action: FlagAction, never: int | None, now: dt.datetime) -> alerts.SlackMessage:
    counts = f.job.get("counts") or {}
    open_, _ = open_in_snapshot(f.job)
    return alerts.build_stall_message(alerts.StallAlert(
        severity=f.severity.value, job_id=f.job_id, kind=f.kind, reason=f.reason,
        gcs_path=f.job.get("gcs_path") or "", stalled_for_s=(now - f.since).total_seconds(),
        succeeded=int(counts.get("succeeded") or 0), failed=int(counts.get("failed") or 0),
        open=open_, never_claimed=never, detected_at=now,
        action="reminder" if action is FlagAction.UNCHANGED else action.value,
        stranded=may_be_stranded(f.kind, open_, never),
    ))


def may_be_stranded(kind: str, open_items: int, never_claimed: int | None) -> bool:
    """Whether a finding shows open items that may have no task left, so the alert names the operator's
    re-drive: queued items not moving (`queued_stall`), leases long lapsed (`lease_overrun`), or a job
    with open items and no progress. Pure; the sweeper only names the command, it never creates tasks."""
    if kind in (QUEUED_STALL, LEASE_OVERRUN):
        return True
    return kind == NO_PROGRESS and (open_items > 0 or bool(never_claimed))


def plan_recovery(store: SweepStore, job: dict, now: dt.datetime) -> JobPlan:
    """Clears the flag of a job that moved again (or no longer matches any rule) and notes it."""
    stall = job.get("stall") or {}
    how = moved_since_flag(job, stall) or "no longer matches a stall condition"
    flagged_at = as_utc(stall.get("flagged_at")) or now
    job_id = job["job_id"]
    message = alerts.build_recovered_message(job_id, job.get("gcs_path") or "", stall.get("kind", "?"), how,
                                             (now - flagged_at).total_seconds())
    record = stall_event_record(job_id, stall.get("kind", "?"), Severity.INFO.value, how, now,
                                FlagAction.RECOVERED.value, message, notify_state=NotifyState.PENDING,
                                notify_error=None)
    details = {"kind": stall.get("kind"), "how": how, "flagged_at": stall.get("flagged_at")}
    event_id = store.new_stall_event_id()
    state = {"job_id": job_id, "updated_at": now, "last_alert_at": now, "last_severity": Severity.INFO.value}
    return JobPlan(job_id, [
        SetStallFlag(job_id, None, job.get("_update_time")),
        AddJobEvent(job_id, "stall_recovered", now, details),
        AddStallEvent(event_id, record),
        MergeAlertState(job_id, state),
    ], outbox=(event_id, message), recovered=1,
        log_fields={"event": "stall_recovered", "job_id": job_id, "kind": stall.get("kind"), "how": how})
