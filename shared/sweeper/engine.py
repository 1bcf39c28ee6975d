"""The sweep: runs every registered rule's query and classify step, plans flags and recoveries, commits, alerts."""

from __future__ import annotations

import datetime as dt
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from shared import alerts
from shared.config import Settings
from shared.config import settings as _settings
from shared.exceptions import StoreUnavailableError
from shared.model import ALERT_STATE, JOBS
from shared.sweeper import rules
from shared.sweeper.decisions import FlagAction
from shared.sweeper.findings import EPOCH, UTC, Finding, as_utc, merge_findings
from shared.sweeper.outbox import UNNOTIFIED, post_outbox
from shared.sweeper.plan import JobPlan, plan_findings, plan_recovery
from shared.sweeper.report import SweepReport
from shared.sweeper.rules.base import MATCHED, Query, Rule, Where
from shared.sweeper.store import AddStallEvent, FirestoreSweepStore, StoredDoc, SweepStore
from shared.sweeper.systemic import plan_and_write_systemic

# Never-claimed counts of the alerted jobs run in parallel.
COUNT_WORKERS = 16
REPORTED_FINDINGS = 50

# Flagged jobs, to find the ones that moved again (automatic single-field index).
FLAGGED = Query(JOBS, (Where("stall.flagged_at", ">", lambda now, cfg: EPOCH),))


@dataclass
class Scan:
    findings: dict[str, Finding]  # merged, one per job
    flagged: list[dict]  # jobs carrying a stall flag, with "job_id" and "_update_time"
    cooldowns: dict[str, dict]  # alert_state of flags written without last_alert_at (legacy), by job id
    pending: list[StoredDoc]  # un-notified stall_events
    checked: int


def run_sweep(now: dt.datetime | None = None, settings: Settings | None = None, *, db=None,
              webhook_url: str | None = None, store: SweepStore | None = None) -> SweepReport:
    """One sweep: find stalls, flag them, alert with cooldown, note recoveries. Never fixes anything."""
    started = time.monotonic()
    now = as_utc(now) or dt.datetime.now(UTC)
    cfg = settings or _settings()
    if store is None:
        store = FirestoreSweepStore(db) if db is not None else FirestoreSweepStore.for_settings(cfg)
    url = webhook_url if webhook_url is not None else cfg.slack_webhook_url
    reads_before = store.meter.reads
    report = SweepReport()
    try:
        found = scan(store, now, cfg, report.queries_ms)
    except Exception as exc:
        if not store.is_unavailable(exc):
            raise
        raise StoreUnavailableError(
            f"Firestore unreachable during sweep ({type(exc).__name__}); nothing was flagged",
            details={"project": cfg.project},
        ) from exc
    report.checked = found.checked
    mark = report.phase_done("scan", started)

    outbox, records = _flag(store, found, now, cfg, report)
    mark = report.phase_done("flag", mark)
    systemic = plan_and_write_systemic(store, now, cfg)
    mark = report.phase_done("systemic", mark)
    if systemic:
        report.systemic = True
        outbox.append(systemic)

    post_outbox(store, found.pending, outbox, url, now, report, systemic_posted=bool(systemic), records=records)
    report.phase_done("deliver", mark)
    report.documents_read = store.meter.reads - reads_before
    report.ms = round((time.monotonic() - started) * 1000, 1)
    report.findings = report.findings[:REPORTED_FINDINGS]
    return report


def _flag(store: SweepStore, found: Scan, now: dt.datetime, cfg: Settings,
          report: SweepReport) -> tuple[list[tuple[str, alerts.SlackMessage]], dict[str, dict]]:
    """Plans and commits every finding and recovery; tallies them; returns the alerts to post and the
    stall_events records written, by id."""
    with ThreadPoolExecutor(max_workers=COUNT_WORKERS) as pool:
        plans = plan_findings(store, list(found.findings.values()), found.cooldowns, now, cfg, pool)
    plans += [plan_recovery(store, j, now) for j in found.flagged if j["job_id"] not in found.findings]
    moved = store.write_job_groups([p.writes for p in plans])
    outbox = []
    for i, plan in enumerate(plans):
        alert = _tally(plan, i in moved, report)
        if alert is not None:
            outbox.append(alert)
    records = {w.event_id: w.record for p in plans for w in p.writes if isinstance(w, AddStallEvent)}
    return outbox, records


def _tally(plan: JobPlan, moved: bool, report: SweepReport) -> tuple[str, alerts.SlackMessage] | None:
    """Counts a committed plan into the report (or a skipped one, whose job moved); its alert to post."""
    if plan.summary is not None:
        report.findings.append(plan.summary)
    if moved:
        report.skipped_moved += 1
        if plan.summary is not None:
            plan.summary["action"] = FlagAction.SKIPPED_MOVED.value
        return None
    plan.log()
    report.flagged += plan.flagged
    report.suppressed += plan.suppressed
    report.recovered += plan.recovered
    return plan.outbox


def scan_queries() -> dict[str, Query]:
    """The sweep's independent queries by name: every registered rule's, then the flagged jobs and
    the un-notified alerts (the bench times each one alone)."""
    return {rule.name: rule.query for rule in rules.RULES} | {"flagged": FLAGGED, "pending": UNNOTIFIED}


def scan(store: SweepStore, now: dt.datetime, cfg: Settings, timings: dict | None = None) -> Scan:
    """Runs every registered rule's query (and the flagged / un-notified queries) concurrently,
    then classifies: the sweep takes the slowest query, not their sum."""
    registered = rules.RULES
    queries = scan_queries()
    with ThreadPoolExecutor(max_workers=len(queries)) as pool:
        futures = {name: pool.submit(_timed_query, store, q, now, cfg, timings, name) for name, q in queries.items()}
        res = {name: fut.result() for name, fut in futures.items()}

    # Job documents the job queries returned: a per-job rule reads only the jobs missing here.
    jobs_read = {d.id: d for rule in registered if _queries_jobs(rule.query) for d in res[rule.name]}
    found: list[Finding] = []
    for rule in registered:
        if rule.query.per_job:
            found += _classify_per_job(store, rule, res[rule.name], jobs_read, now, cfg)
        else:
            found += [f for d in res[rule.name] if (f := _classify(rule, d, now, cfg))]
    merged = merge_findings(found)
    flagged = [{**d.data, "job_id": d.id, "_update_time": d.update_time} for d in res["flagged"]]
    checked = sum(len(docs) for name, docs in res.items() if name != "pending")
    return Scan(merged, flagged, _legacy_cooldowns(store, merged), res["pending"], checked)


def _timed_query(store: SweepStore, query: Query, now: dt.datetime, cfg: Settings, timings: dict | None,
                 name: str) -> list[StoredDoc]:
    started = time.monotonic()
    docs = store.query(query, now, cfg)
    if timings is not None:
        timings[name] = round((time.monotonic() - started) * 1000, 1)
    return docs


def _queries_jobs(query: Query) -> bool:
    return query.collection == JOBS and not query.collection_group and not query.per_job


def _classify(rule: Rule, job: StoredDoc, now: dt.datetime, cfg: Settings,
              matched: list[dict] | None = None) -> Finding | None:
    """The rule's verdict on one job; the engine, not the rule, attaches the job's update time."""
    doc = {**job.data, "job_id": job.id}
    if matched is not None:
        doc[MATCHED] = matched
    finding = rule.classify(doc, now, cfg)
    if finding is not None:
        finding.update_time = job.update_time
    return finding


def _classify_per_job(store: SweepStore, rule: Rule, matched: list[StoredDoc], jobs_read: dict[str, StoredDoc],
                      now: dt.datetime, cfg: Settings) -> list[Finding]:
    """Groups a per-job rule's documents by job, reads the jobs no other query returned, classifies each job."""
    by_job: dict[str, list[dict]] = {}
    for d in matched:
        if d.job_id is not None:
            by_job.setdefault(d.job_id, []).append(d.data)
    jobs = jobs_read | store.get_many(JOBS, [j for j in by_job if j not in jobs_read])
    found = []
    for job_id, docs in by_job.items():
        job = jobs.get(job_id)
        if job is not None and (f := _classify(rule, job, now, cfg, matched=docs)):
            found.append(f)
    return found


def _legacy_cooldowns(store: SweepStore, findings: dict[str, Finding]) -> dict[str, dict]:
    """Cooldowns come from the flag itself; only flags written without them need their alert_state."""
    legacy = [f.job_id for f in findings.values() if (f.job.get("stall") or {}) and "last_alert_at" not in f.job["stall"]]
    return {key: d.data for key, d in store.get_many(ALERT_STATE, legacy).items()}
