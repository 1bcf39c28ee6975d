"""Pure alert decisions with a fake-clock-friendly `now`: flag or escalate, alert or stay quiet, recovered or not.

Cooldown without a read: the flag on the job carries `last_alert_at` / `last_severity`, written in
the same atomic batch as `alert_state/{job}` whenever an alert is decided (a reminder therefore
rewrites `stall` too, under the same precondition). A finding whose job carries no flag has no
cooldown in force: `alert_state` can only hold a WARNING/CRITICAL alert while the flag is set (they
are written together, and a recovery clears the flag and writes INFO together), and after an INFO
prior `decide_alert` alerts anyway. Such findings are therefore decided with no prior (`first`).
Flags written before this field existed fall back to one batched read of their `alert_state`.
"""

from __future__ import annotations

import datetime as dt
import enum

from shared.model import JobStatus
from shared.sweeper import rules
from shared.sweeper.findings import Finding, Severity, as_utc


class FlagAction(str, enum.Enum):
    """What a sweep does about one job's flag (recorded on its stall event and in the report)."""

    FLAGGED = "flagged"  # a new stall episode
    ESCALATED = "escalated"  # same episode, more severe or another kind
    UNCHANGED = "unchanged"  # same episode as flagged: at most a reminder
    RECOVERED = "recovered"  # the flagged job moved again
    SYSTEMIC = "systemic"  # many jobs stalled within the window (no flag of its own)
    SKIPPED_MOVED = "skipped_moved"  # the job changed between our read and our write: left alone


def decide_flag(f: Finding, now: dt.datetime) -> tuple[FlagAction, dict | None]:
    """The flag action for a finding and the new `stall` flag (None when the flag stays as it is)."""
    existing = f.job.get("stall") or None
    if not existing or moved_since_flag(f.job, existing) is not None:
        return FlagAction.FLAGGED, _stall(f, now)
    more_severe = Severity.rank_of(f.severity) > Severity.rank_of(existing.get("severity"))
    if more_severe or f.kind != existing.get("kind"):
        return FlagAction.ESCALATED, _stall(f, existing.get("flagged_at") or now)
    return FlagAction.UNCHANGED, None


def _stall(f: Finding, flagged_at) -> dict:
    return {"kind": f.kind, "severity": f.severity.value, "reason": f.reason, "flagged_at": flagged_at}


def decide_alert(severity: str, prior: dict | None, now: dt.datetime, cooldown_minutes: float) -> str | None:
    """Why to alert ('first', 'escalated', 'cooldown_elapsed'), or None to stay quiet."""
    if not prior or as_utc(prior.get("last_alert_at")) is None:
        return "first"
    if Severity.rank_of(severity) > Severity.rank_of(prior.get("last_severity") or Severity.INFO):
        return "escalated"
    if now - as_utc(prior["last_alert_at"]) >= dt.timedelta(minutes=cooldown_minutes):
        return "cooldown_elapsed"
    return None


def decide_systemic(stalled_in_window: int, threshold: int, prior: dict | None, now: dt.datetime,
                    cooldown_minutes: float) -> bool:
    """One systemic alert when ≥ threshold jobs stalled within the window, itself cooled down."""
    if threshold <= 0 or stalled_in_window < threshold:
        return False
    last = as_utc((prior or {}).get("last_alert_at"))
    return last is None or now - last >= dt.timedelta(minutes=cooldown_minutes)


def moved_since_flag(job: dict, stall: dict) -> str | None:
    """How a flagged job moved again (final status, progress after the flag, or what its rule
    says, e.g. it left ingesting), else None."""
    status = job.get("status")
    if status in {s.value for s in JobStatus if s.is_final}:
        return f"job is now {status}"
    flagged_at = as_utc(stall.get("flagged_at"))
    last = as_utc(job.get("last_progress_at"))
    if flagged_at and last and last > flagged_at:
        return f"progress at {last.isoformat(timespec='seconds')}"
    rule = rules.rule_for_kind(stall.get("kind"))
    return rule.moved_on(job) if rule is not None else None


def prior_alert(job_id: str, job: dict, legacy: dict[str, dict]) -> dict | None:
    """The last alert for a job's current flag: from the flag itself (`stall.last_alert_at`,
    `stall.last_severity`), from `legacy` alert_state docs for flags written without them, or None
    for a job without a flag (no cooldown can be in force then; see the module docstring)."""
    stall = job.get("stall") or None
    if not stall:
        return None
    if "last_alert_at" in stall:
        return {"last_alert_at": stall.get("last_alert_at"), "last_severity": stall.get("last_severity")}
    return legacy.get(job_id)
