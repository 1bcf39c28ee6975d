"""Sweeper decisions with a fake clock: severity, cooldown, escalation, systemic, classification, recovery."""

from __future__ import annotations

import datetime as dt

from shared.config import load_settings
from shared.sweeper import decisions, findings
from shared.sweeper.report import ReadMeter
from shared.sweeper.rules import running

T0 = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.timezone.utc)
MIN = dt.timedelta(minutes=1)
CFG = load_settings().replace(stall_minutes=15, stall_critical_minutes=60, queued_stall_minutes=30,
                          alert_cooldown_minutes=60, systemic_threshold=3)


def test_severity_for():
    assert findings.severity_for(16 * MIN, CFG) == "WARNING"
    assert findings.severity_for(59 * MIN, CFG) == "WARNING"
    assert findings.severity_for(60 * MIN, CFG) == "CRITICAL"


def test_decide_alert_first_cooldown_escalation():
    assert decisions.decide_alert("WARNING", None, T0, 60) == "first"
    prior = {"last_alert_at": T0, "last_severity": "WARNING"}
    assert decisions.decide_alert("WARNING", prior, T0 + 59 * MIN, 60) is None
    assert decisions.decide_alert("WARNING", prior, T0 + 60 * MIN, 60) == "cooldown_elapsed"
    assert decisions.decide_alert("CRITICAL", prior, T0 + 1 * MIN, 60) == "escalated"
    crit = {"last_alert_at": T0, "last_severity": "CRITICAL"}
    assert decisions.decide_alert("WARNING", crit, T0 + 1 * MIN, 60) is None
    assert decisions.decide_alert("CRITICAL", crit, T0 + 1 * MIN, 60) is None
    # after a recovered note (INFO) a new stall is news again
    rec = {"last_alert_at": T0, "last_severity": "INFO"}
    assert decisions.decide_alert("WARNING", rec, T0 + 1 * MIN, 60) == "escalated"
    # naive datetimes from callers are read as UTC
    naive = {"last_alert_at": T0.replace(tzinfo=None), "last_severity": "WARNING"}
    assert decisions.decide_alert("WARNING", naive, T0 + MIN, 60) is None


def test_decide_systemic():
    assert not decisions.decide_systemic(2, 3, None, T0, 60)
    assert decisions.decide_systemic(3, 3, None, T0, 60)
    assert not decisions.decide_systemic(5, 3, {"last_alert_at": T0}, T0 + 30 * MIN, 60)
    assert decisions.decide_systemic(5, 3, {"last_alert_at": T0}, T0 + 60 * MIN, 60)
    assert not decisions.decide_systemic(10, 0, None, T0, 60)


def _job(**kw):
    base = {"status": "running", "last_progress_at": T0 - 20 * MIN, "fanout_done_at": T0 - 100 * MIN,
            "totals": {"items": 10}, "counts": {"queued": 0, "processing": 0, "succeeded": 10}}
    base.update(kw)
    return base


def _classify(job):
    """The running rule's verdict as (kind, since, reason), or None."""
    f = running.RULE.classify({**job, "job_id": "j"}, T0, CFG)
    return None if f is None else (f.kind, f.since, f.reason)


def test_classify_running():
    assert _classify(_job(last_progress_at=T0 - 5 * MIN)) is None
    kind, since, reason = _classify(_job())
    assert kind == "no_progress" and since == T0 - 20 * MIN and "20 min" in reason
    # queued items not moving for ≥ 30 min after fan-out
    kind, _, reason = _classify(_job(last_progress_at=T0 - 40 * MIN, counts={"queued": 2, "succeeded": 8}))
    assert kind == "queued_stall" and "2 queued" in reason
    # never-born items count as not moving too
    kind, _, reason = _classify(_job(last_progress_at=T0 - 40 * MIN, counts={"succeeded": 6}))
    assert kind == "queued_stall" and "4 never-claimed" in reason
    # fan-out recent: not a queued stall, just no progress
    assert _classify(_job(last_progress_at=T0 - 40 * MIN, fanout_done_at=T0 - 20 * MIN,
                          counts={"queued": 2}))[0] == "no_progress"
    assert _classify(_job(last_progress_at=None)) is None


def test_running_finding_severity_and_job():
    f = running.RULE.classify({**_job(last_progress_at=T0 - 61 * MIN), "job_id": "j"}, T0, CFG)
    assert f.job_id == "j" and f.severity == "CRITICAL" and f.job["status"] == "running"


def test_moved_since_flag():
    stall = {"kind": "no_progress", "flagged_at": T0}
    assert decisions.moved_since_flag(_job(last_progress_at=T0 - MIN), stall) is None
    assert "progress at" in decisions.moved_since_flag(_job(last_progress_at=T0 + MIN), stall)
    assert decisions.moved_since_flag(_job(status="completed"), stall) == "job is now completed"
    ing = {"kind": "ingesting_stall", "flagged_at": T0}
    assert decisions.moved_since_flag(_job(status="ingesting", last_progress_at=T0 - MIN), ing) is None
    assert decisions.moved_since_flag(_job(status="running", last_progress_at=T0 - MIN), ing) == "job is now running"


def test_merge_findings_keeps_most_severe_and_all_reasons():
    a = findings.Finding("j", "no_progress", "WARNING", "r1", T0 - 20 * MIN, {})
    b = findings.Finding("j", "lease_overrun", "CRITICAL", "r2", T0 - 70 * MIN, {}, stuck_items=3)
    c = findings.Finding("k", "no_progress", "WARNING", "r3", T0, {})
    merged = findings.merge_findings([a, b, c])
    assert merged["j"].kind == "lease_overrun" and merged["j"].reason == "r2; r1" and merged["j"].stuck_items == 3
    assert merged["k"].reason == "r3"


def test_read_meter_bills_like_firestore():
    m = ReadMeter()
    m.query(0)  # an empty query still costs one read
    m.query(5)
    m.aggregation(0)
    m.aggregation(2500)  # 1 per 1000 index entries, rounded up
    m.gets(2)
    assert m.reads == 1 + 5 + 1 + 3 + 2


def test_never_claimed_from_snapshot():
    # every item born by the last progress check: exactly 0 (count(items) only grows)
    assert findings.never_claimed_from_snapshot(_job(counts={"succeeded": 7, "failed": 3})) == (0, True)
    # some not born at the snapshot: an upper bound only, a count is needed
    assert findings.never_claimed_from_snapshot(_job(counts={"succeeded": 6})) == (4, False)
    # unknown before fan-out is done or without totals — no count either
    assert findings.never_claimed_from_snapshot(_job(fanout_done_at=None)) == (None, True)
    assert findings.never_claimed_from_snapshot(_job(totals={})) == (None, True)


def test_classify_ingesting_and_its_recovery():
    from shared.sweeper.rules import ingesting

    f = ingesting.RULE.classify({"job_id": "j", "status": "ingesting", "created_at": T0 - 20 * MIN,
                                 "chunks_total": 4}, T0, CFG)
    assert f.kind == "ingesting_stall" and f.since == T0 - 20 * MIN and f.severity == "WARNING"
    assert f.reason == "still ingesting 20 min after creation (chunks_total 4)"
    assert not ingesting.RULE.reports_never_claimed


def test_classify_lease_overrun_per_job():
    from shared.sweeper.rules import lease_overrun
    from shared.sweeper.rules.base import MATCHED

    items = [{"gtin": "a", "lease_expires_at": T0 - 30 * MIN}, {"gtin": "b", "lease_expires_at": T0 - 70 * MIN}]
    f = lease_overrun.RULE.classify({**_job(), "job_id": "j", MATCHED: items}, T0, CFG)
    assert f.kind == "lease_overrun" and f.stuck_items == 2 and f.since == T0 - 70 * MIN
    assert f.severity == "CRITICAL" and f.reason == "2 item(s) processing with a lease expired 70 min ago (e.g. a, b)"
    # a final job is never flagged, whatever its items say
    assert lease_overrun.RULE.classify({**_job(status="completed"), "job_id": "j", MATCHED: items}, T0, CFG) is None


def test_severity_rank_tolerates_unknown_values():
    assert findings.Severity.rank_of("CRITICAL") > findings.Severity.rank_of("WARNING") > 0
    assert findings.Severity.rank_of(None) == findings.Severity.rank_of("bogus") == findings.Severity.rank_of("INFO") == 0
