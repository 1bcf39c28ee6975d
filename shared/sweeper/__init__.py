"""The sweeper: finds stalled jobs and items with indexed queries, flags them and alerts — never "fixes".

Guarantee 4 ("stalls are seen, not fixed"): the only writes this module makes are the
`_write_*` functions at the bottom of the file. They touch `jobs/{id}.stall` (one field, with
`update()` and an update-time precondition, so a job that moved since we read it is left
alone), `jobs/{id}/events`, `stall_events` and `alert_state`. Nothing here writes an item,
creates or deletes a task, or changes a job's status, counts or totals
(tests/unit/test_sweeper_rules.py checks this on the source).

A sweep's flags, recoveries and their records are committed together in atomic WriteBatches
(≤ MAX_BATCH_OPS writes, ≤ COMMIT_PARALLEL in flight); one job's writes never straddle two
batches. A batch whose precondition fails is halved until the job(s) that moved stand alone;
those are skipped (`skipped_moved`) and looked at again by the next sweep.

Queries, each one costing reads in proportion to *stalled* things, not to all jobs:

| finding | query | index |
|---|---|---|
| running, no progress (`no_progress`) and queued items not moving (`queued_stall`) | jobs `status == running AND last_progress_at < now - min(stall, queued_stall)`; classified in memory | jobs (status, last_progress_at) |
| item lease overrun (`lease_overrun`) | group `items` `status == processing AND lease_expires_at < now - overrun` | items CG (status, lease_expires_at) |
| ingesting too long (`ingesting_stall`) | jobs `status == ingesting AND created_at < now - ingesting_stall` | jobs (status, created_at) |
| flagged jobs (recovery check) | jobs `stall.flagged_at > epoch` | automatic single-field index |
| per-job cooldown | none: read from the finding's own `stall.last_alert_at/last_severity` | — |
| systemic cooldown | get `alert_state/systemic`, only when the count reaches the threshold | — |
| jobs that stalled in the last hour (systemic) | count(alert_state `episode_at >= now - 1h`) | automatic single-field index |
| un-notified alerts to retry | stall_events `notify_state in (pending, failed) AND detected_at >= now - 24h` | stall_events (notify_state, detected_at) |

`queued_stall` formulation: a running job is `queued_stall` when its `fanout_done_at` and
`last_progress_at` are both older than `queued_stall_minutes` and its counts snapshot still
shows queued items or items never born (`totals.items > sum(counts)`). Firestore cannot
compare two fields, so the query is the `no_progress` one with the smaller of the two
cutoffs, and the classification happens on the (already stalled) documents it returns.
`last_progress_at` is set at job creation and at fan-out, so a running job always has it.

Cooldown without a read: the flag on the job carries `last_alert_at` / `last_severity`, written in
the same atomic batch as `alert_state/{job}` whenever an alert is decided (a reminder therefore
rewrites `stall` too, under the same precondition). A finding whose job carries no flag has no
cooldown in force: `alert_state` can only hold a WARNING/CRITICAL alert while the flag is set (they
are written together, and a recovery clears the flag and writes INFO together), and after an INFO
prior `decide_alert` alerts anyway. Such findings are therefore decided with no prior (`first`).
Flags written before this field existed fall back to one batched `get_all` of their `alert_state`.
Documents read per sweep: the stalled jobs (stall queries) + the flagged jobs + ≤ 1 per empty query
+ one count aggregation per alerted job whose counts snapshot does not settle "never claimed".
"""

from __future__ import annotations

import datetime as dt
import json
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable

from google.api_core import exceptions as gexc
from google.api_core import retry as api_retry
from google.cloud.firestore_v1.base_query import FieldFilter

from shared import alerts
from shared.config import Settings
from shared.config import settings as _settings
from shared.exceptions import StoreUnavailableError
from shared.events import event_doc
from shared.log import log_event
from shared.model import ALERT_STATE, EVENTS, ITEMS, JOBS, STALL_EVENTS, ItemStatus, JobStatus

UTC = dt.timezone.utc
EPOCH = dt.datetime(1970, 1, 1, tzinfo=UTC)

SYSTEMIC_WINDOW = dt.timedelta(minutes=60)
SYSTEMIC_KEY = "systemic"
RETRY_WINDOW = dt.timedelta(hours=24)
STALL_EVENT_TTL = dt.timedelta(days=30)
# Slack incoming webhooks take ~1 message/s; a sweep posts at most this many, the rest wait.
MAX_POSTS_PER_SWEEP = 20
MAX_RETRIES_PER_SWEEP = 50
# Bounds the lease-overrun scan: a pathological backlog costs at most this many reads a sweep.
LEASE_OVERRUN_LIMIT = 1000
QUERY_TIMEOUT_S = 10.0
WRITE_WORKERS = 16
# Flag-phase commits: atomic WriteBatches of whole per-job write groups, ≤ 500 writes each, a few in flight.
MAX_BATCH_OPS = 500
MIN_BATCH_OPS = 100
COMMIT_PARALLEL = 4

SEVERITY_RANK = {"INFO": 0, "WARNING": 1, "CRITICAL": 2}

# Kinds of stall
NO_PROGRESS = "no_progress"
QUEUED_STALL = "queued_stall"
LEASE_OVERRUN = "lease_overrun"
INGESTING_STALL = "ingesting_stall"

# notify_state of a stall_events record
PENDING, SENT, FAILED, SUPPRESSED, NOT_CONFIGURED = "pending", "sent", "failed", "suppressed", "not_configured"
ROLLED_UP = "rolled_up"  # over the post budget while a systemic alert covers it: not retried

_UNAVAILABLE = (
    gexc.ServiceUnavailable,
    gexc.DeadlineExceeded,
    gexc.RetryError,
    gexc.Unauthenticated,
    gexc.PermissionDenied,
)


def _retry() -> api_retry.Retry:
    return api_retry.Retry(initial=0.1, maximum=1.0, multiplier=2.0, timeout=QUERY_TIMEOUT_S)


# --------------------------------------------------------------------------------------------
# Report


@dataclass
class SweepReport:
    checked: int = 0  # documents examined (candidates from all queries)
    flagged: int = 0  # new stall flags and escalations written
    alerted: int = 0  # Slack posts delivered (stall, reminder, recovered, systemic, retries)
    recovered: int = 0  # flags cleared because the job moved again or finished
    suppressed: int = 0  # alerts held back by cooldown
    notify_failed: int = 0  # posts that failed or were deferred (retried next sweep)
    retried: int = 0  # earlier un-notified alerts delivered now
    systemic: bool = False
    skipped_moved: int = 0  # findings whose job changed between read and write (left alone)
    ms: float = 0.0
    phases_ms: dict = field(default_factory=dict)  # scan / flag / systemic / deliver
    queries_ms: dict = field(default_factory=dict)  # each scan query's own time (they run concurrently)
    documents_read: int = 0
    findings: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


class ReadMeter:
    """Counts billed reads honestly: docs returned (≥ 1 per query) and 1 per 1000 index entries counted."""

    def __init__(self) -> None:
        self.reads = 0
        self._lock = threading.Lock()

    def _add(self, n: int) -> None:
        with self._lock:  # count aggregations run on the write pool's threads
            self.reads += n

    def query(self, returned: int) -> None:
        self._add(max(1, returned))

    def gets(self, n: int) -> None:
        self._add(n)

    def aggregation(self, counted: int) -> None:
        self._add(max(1, math.ceil(counted / 1000)))


# --------------------------------------------------------------------------------------------
# Pure decision logic (fake clock friendly: every function takes `now`)


@dataclass
class Finding:
    job_id: str
    kind: str
    severity: str
    reason: str
    since: dt.datetime  # when the job (or its oldest stuck item) last moved
    job: dict
    update_time: Any = None
    stuck_items: int = 0


def as_utc(value: Any) -> dt.datetime | None:
    if not isinstance(value, dt.datetime):
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def severity_for(stalled_for: dt.timedelta, cfg: Settings) -> str:
    """WARNING once stalled; CRITICAL when stalled longer than `stall_critical_minutes`."""
    return "CRITICAL" if stalled_for >= dt.timedelta(minutes=cfg.stall_critical_minutes) else "WARNING"


def _minutes(delta: dt.timedelta) -> int:
    return int(delta.total_seconds() // 60)


def _open_in_snapshot(job: dict) -> tuple[int, int]:
    """(queued + processing, items never born) from the job's counts snapshot."""
    counts = job.get("counts") or {}
    born = sum(int(counts.get(k) or 0) for k in ("queued", "processing", "succeeded", "failed", "cancelled"))
    total = int((job.get("totals") or {}).get("items") or 0)
    return int(counts.get("queued") or 0) + int(counts.get("processing") or 0), max(0, total - born)


def classify_running(job: dict, now: dt.datetime, cfg: Settings) -> tuple[str, dt.datetime, str] | None:
    """(kind, since, reason) for a running job that stopped moving, else None."""
    last = as_utc(job.get("last_progress_at"))
    if last is None:
        return None
    fanout = as_utc(job.get("fanout_done_at"))
    queued_cutoff = now - dt.timedelta(minutes=cfg.queued_stall_minutes)
    counts = job.get("counts") or {}
    queued = int(counts.get("queued") or 0)
    _, unborn = _open_in_snapshot(job)
    if fanout is not None and fanout <= queued_cutoff and last <= queued_cutoff and (queued or unborn):
        return QUEUED_STALL, last, (
            f"{queued} queued and {unborn} never-claimed items have not moved for {_minutes(now - last)} min "
            f"(fan-out done {_minutes(now - fanout)} min ago)"
        )
    if last <= now - dt.timedelta(minutes=cfg.stall_minutes):
        return NO_PROGRESS, last, f"running with no progress for {_minutes(now - last)} min"
    return None


def decide_alert(severity: str, prior: dict | None, now: dt.datetime, cooldown_minutes: float) -> str | None:
    """Why to alert ('first', 'escalated', 'cooldown_elapsed'), or None to stay quiet."""
    if not prior or as_utc(prior.get("last_alert_at")) is None:
        return "first"
    if SEVERITY_RANK.get(severity, 0) > SEVERITY_RANK.get(prior.get("last_severity") or "INFO", 0):
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
    """How a flagged job moved again (final status, progress after the flag, left ingesting), else None."""
    status = job.get("status")
    if status in {s.value for s in JobStatus if s.is_final}:
        return f"job is now {status}"
    flagged_at = as_utc(stall.get("flagged_at"))
    last = as_utc(job.get("last_progress_at"))
    if flagged_at and last and last > flagged_at:
        return f"progress at {last.isoformat(timespec='seconds')}"
    if stall.get("kind") == INGESTING_STALL and status != JobStatus.INGESTING.value:
        return f"job is now {status}"
    return None


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


def merge_findings(findings: Iterable[Finding]) -> dict[str, Finding]:
    """One finding per job: the most severe (then first) kind, with every reason kept."""
    merged: dict[str, Finding] = {}
    for f in findings:
        cur = merged.get(f.job_id)
        if cur is None:
            merged[f.job_id] = f
            continue
        best, other = (f, cur) if SEVERITY_RANK[f.severity] > SEVERITY_RANK[cur.severity] else (cur, f)
        best.reason = f"{best.reason}; {other.reason}"
        best.stuck_items = max(best.stuck_items, other.stuck_items)
        best.since = min(best.since, other.since)
        best.update_time = best.update_time or other.update_time
        merged[f.job_id] = best
    return merged


# --------------------------------------------------------------------------------------------
# The sweep


def run_sweep(now: dt.datetime | None = None, settings: Settings | None = None, *, db=None,
              webhook_url: str | None = None) -> SweepReport:
    """One sweep: find stalls, flag them, alert with cooldown, note recoveries. Never fixes anything."""
    started = time.monotonic()
    now = as_utc(now) or dt.datetime.now(UTC)
    cfg = settings or _settings()
    db = db if db is not None else _client_for(cfg)
    url = webhook_url if webhook_url is not None else cfg.slack_webhook_url
    report = SweepReport()
    meter = ReadMeter()
    try:
        scan = _scan(db, now, cfg, meter, report.queries_ms)
    except _UNAVAILABLE as exc:
        raise StoreUnavailableError(
            f"Firestore unreachable during sweep ({type(exc).__name__}); nothing was flagged",
            details={"project": cfg.project},
        ) from exc
    report.checked = scan.checked
    mark = _phase(report, "scan", started)

    outbox: list[tuple[Any, alerts.SlackMessage]] = []  # (stall_event ref, message)
    with ThreadPoolExecutor(max_workers=WRITE_WORKERS) as pool:
        plans = _plan_findings(db, scan, now, cfg, meter, pool)
        plans += [_plan_recovery(db, j, now) for j in scan.flagged if j["job_id"] not in scan.findings]
        moved = _commit_plans(db, plans, pool)
    for i, plan in enumerate(plans):
        if plan.summary is not None:
            report.findings.append(plan.summary)
        if i in moved:
            report.skipped_moved += 1
            if plan.summary is not None:
                plan.summary["action"] = "skipped_moved"
            continue
        plan.log()
        report.flagged += plan.flagged
        report.suppressed += plan.suppressed
        report.recovered += plan.recovered
        if plan.outbox is not None:
            outbox.append(plan.outbox)

    mark = _phase(report, "flag", mark)
    systemic = _systemic(db, now, cfg, scan, meter)
    mark = _phase(report, "systemic", mark)
    if systemic:
        report.systemic = True
        outbox.append(systemic)

    _deliver(db, scan.pending, outbox, url, now, report, systemic_posted=bool(systemic))
    _phase(report, "deliver", mark)
    report.documents_read = meter.reads
    report.ms = round((time.monotonic() - started) * 1000, 1)
    report.findings = report.findings[:50]
    return report


def _phase(report: SweepReport, name: str, since: float) -> float:
    t = time.monotonic()
    report.phases_ms[name] = round((t - since) * 1000, 1)
    return t


def _client_for(cfg: Settings):
    from shared.clients import firestore_client

    if cfg.project == _settings().project:
        return firestore_client()
    from google.cloud import firestore

    return firestore.Client(project=cfg.project)


@dataclass
class _Scan:
    findings: dict[str, Finding]
    flagged: list[dict]  # jobs carrying a stall flag, with "_update_time"
    cooldowns: dict[str, dict]  # alert_state of flags written without last_alert_at (legacy), by job id
    pending: list[tuple[Any, dict]]  # un-notified stall_events (ref, data)
    checked: int


def _stream(query, meter: ReadMeter, timings: dict | None = None, name: str = "") -> list:
    started = time.monotonic()
    docs = list(query.stream(retry=_retry(), timeout=QUERY_TIMEOUT_S))
    meter.query(len(docs))
    if timings is not None:
        timings[name] = round((time.monotonic() - started) * 1000, 1)
    return docs


def scan_queries(db, now: dt.datetime, cfg: Settings) -> dict[str, Any]:
    """The sweep's independent queries by name (the bench times each one alone)."""
    jobs = db.collection(JOBS)
    cutoff = now - dt.timedelta(minutes=min(cfg.stall_minutes, cfg.queued_stall_minutes))
    queries = {
        # Running jobs that stopped moving (no_progress / queued_stall).
        "running": jobs.where(filter=FieldFilter("status", "==", JobStatus.RUNNING.value))
        .where(filter=FieldFilter("last_progress_at", "<", cutoff)),
        # Jobs stuck ingesting (planning / chunk fan-out never finished).
        "ingesting": jobs.where(filter=FieldFilter("status", "==", JobStatus.INGESTING.value))
        .where(filter=FieldFilter("created_at", "<", now - dt.timedelta(minutes=cfg.ingesting_stall_minutes))),
        # Items processing far past their lease: the delivery holding them is gone and no retry came.
        "items": db.collection_group(ITEMS)
        .where(filter=FieldFilter("status", "==", ItemStatus.PROCESSING.value))
        .where(filter=FieldFilter("lease_expires_at", "<", now - dt.timedelta(minutes=cfg.lease_overrun_minutes)))
        .limit(LEASE_OVERRUN_LIMIT),
        # Flagged jobs (to find the ones that moved again).
        "flagged": jobs.where(filter=FieldFilter("stall.flagged_at", ">", EPOCH)),
        "pending": db.collection(STALL_EVENTS)
        .where(filter=FieldFilter("notify_state", "in", [PENDING, FAILED]))
        .where(filter=FieldFilter("detected_at", ">=", now - RETRY_WINDOW))
        .limit(MAX_RETRIES_PER_SWEEP),
    }
    return queries


def _scan(db, now: dt.datetime, cfg: Settings, meter: ReadMeter, timings: dict | None = None) -> _Scan:
    jobs = db.collection(JOBS)
    found: list[Finding] = []
    checked = 0
    queries = scan_queries(db, now, cfg)
    # Independent queries run concurrently: the sweep takes the slowest one, not their sum.
    with ThreadPoolExecutor(max_workers=len(queries)) as pool:
        futures = {name: pool.submit(_stream, q, meter, timings, name) for name, q in queries.items()}
        res = {name: fut.result() for name, fut in futures.items()}

    running = res["running"]
    job_docs: dict[str, Any] = {}
    for snap in running:
        checked += 1
        job_docs[snap.id] = snap
        data = snap.to_dict()
        verdict = classify_running(data, now, cfg)
        if verdict:
            kind, since, reason = verdict
            found.append(Finding(snap.id, kind, severity_for(now - since, cfg), reason, since, data, snap.update_time))

    for snap in res["ingesting"]:
        checked += 1
        job_docs[snap.id] = snap
        data = snap.to_dict()
        created = as_utc(data.get("created_at")) or now
        found.append(Finding(snap.id, INGESTING_STALL, severity_for(now - created, cfg),
                             f"still ingesting {_minutes(now - created)} min after creation "
                             f"(chunks_total {data.get('chunks_total', '?')})", created, data, snap.update_time))

    by_job: dict[str, list[dict]] = {}
    for snap in res["items"]:
        checked += 1
        job_ref = snap.reference.parent.parent
        if job_ref is not None:
            by_job.setdefault(job_ref.id, []).append(snap.to_dict())
    missing = [jid for jid in by_job if jid not in job_docs]
    if missing:
        snaps = list(db.get_all([jobs.document(j) for j in missing], retry=_retry(), timeout=QUERY_TIMEOUT_S))
        meter.gets(len(missing))
        for snap in snaps:
            if snap.exists:
                job_docs[snap.id] = snap
    for jid, stuck in by_job.items():
        snap = job_docs.get(jid)
        if snap is None:
            continue
        data = snap.to_dict()
        if JobStatus(data.get("status", "failed")).is_final:
            continue  # completed jobs are never touched
        oldest = min(as_utc(i.get("lease_expires_at")) or now for i in stuck)
        sample = ", ".join(str(i.get("gtin", "?")) for i in stuck[:3])
        found.append(Finding(jid, LEASE_OVERRUN, severity_for(now - oldest, cfg),
                             f"{len(stuck)} item(s) processing with a lease expired {_minutes(now - oldest)} min ago "
                             f"(e.g. {sample})", oldest, data, snap.update_time, stuck_items=len(stuck)))

    merged = merge_findings(found)
    flagged = []
    for snap in res["flagged"]:
        checked += 1
        flagged.append({**snap.to_dict(), "job_id": snap.id, "_update_time": snap.update_time})

    # Cooldowns come from the flag itself; only flags written without them need their alert_state.
    legacy = [f.job_id for f in merged.values() if (f.job.get("stall") or {}) and "last_alert_at" not in f.job["stall"]]
    cooldowns: dict[str, dict] = {}
    if legacy:
        snaps = list(db.get_all([db.collection(ALERT_STATE).document(j) for j in legacy], retry=_retry(),
                                timeout=QUERY_TIMEOUT_S))
        meter.gets(len(legacy))
        cooldowns = {s.id: s.to_dict() for s in snaps if s.exists}
    pending = [(s.reference, s.to_dict()) for s in res["pending"]]

    return _Scan(merged, flagged, cooldowns, pending, checked)


def never_claimed_from_snapshot(job: dict) -> tuple[int | None, bool]:
    """(never-claimed items, exact?) from the job document alone.

    Items are born at their first claim and never deleted, so `count(items)` only grows and is
    at least the sum of the job's `counts` snapshot (written by the last progress check). Hence
    `totals.items - sum(counts)` is an upper bound of "never reached a worker"; when it is 0 the
    answer is exactly 0 and no count aggregation is needed. Before fan-out is done (or without
    totals) the answer is unknown (None) — also without a count.
    """
    total = (job.get("totals") or {}).get("items")
    if total is None or not job.get("fanout_done_at"):
        return None, True
    _, unborn = _open_in_snapshot(job)
    return (0, True) if unborn == 0 else (unborn, False)


def _never_claimed(db, job_id: str, job: dict, meter: ReadMeter) -> int | None:
    """totals.items - count(items): items whose task never reached a worker (items are born at claim).
    One count aggregation, only when the job's own snapshot cannot give the exact answer."""
    known, exact = never_claimed_from_snapshot(job)
    if exact:
        return known
    total = int((job.get("totals") or {}).get("items"))
    agg = db.collection(JOBS).document(job_id).collection(ITEMS).count(alias="n")
    born = int(agg.get(retry=_retry(), timeout=QUERY_TIMEOUT_S)[0][0].value)
    meter.aggregation(born)
    return max(0, total - born)


@dataclass
class _Plan:
    """The writes for one job, committed atomically with others in a batch, and what to report
    once they are in. `ops` apply `_write_*` functions to a batch."""

    job_id: str
    ops: list[Callable[[Any], None]]
    summary: dict | None = None
    outbox: tuple[Any, alerts.SlackMessage] | None = None
    flagged: int = 0
    suppressed: int = 0
    recovered: int = 0
    log_fields: dict | None = None

    def log(self) -> None:
        if self.log_fields:
            fields = dict(self.log_fields)
            event, severity = fields.pop("event"), fields.pop("severity", "INFO")
            log_event(event, severity=severity, logger="upcfan.sweeper", **fields)


def _plan_findings(db, scan: _Scan, now: dt.datetime, cfg: Settings, meter: ReadMeter, pool) -> list[_Plan]:
    """Decides every finding (flag / escalate / remind / suppress) and builds its writes; the only
    I/O is the never-claimed count for alerts whose job snapshot cannot answer it, run in parallel."""
    decided = []
    for f in scan.findings.values():
        existing = f.job.get("stall") or None
        same_episode = bool(existing) and moved_since_flag(f.job, existing) is None
        if not same_episode:
            action = "flagged"
            stall = {"kind": f.kind, "severity": f.severity, "reason": f.reason, "flagged_at": now}
        elif SEVERITY_RANK[f.severity] > SEVERITY_RANK.get(existing.get("severity"), 0) or f.kind != existing.get("kind"):
            action = "escalated"
            stall = {"kind": f.kind, "severity": f.severity, "reason": f.reason,
                     "flagged_at": existing.get("flagged_at") or now}
        else:
            action = "unchanged"
            stall = None
        prior = prior_alert(f.job_id, f.job, scan.cooldowns)
        why = decide_alert(f.severity, prior, now, cfg.alert_cooldown_minutes)
        decided.append((f, action, stall, why, prior))
    counted = [f for f, _, _, why, _ in decided if why and f.kind in (NO_PROGRESS, QUEUED_STALL, LEASE_OVERRUN)]
    nevers = dict(zip([f.job_id for f in counted],
                      pool.map(lambda f: _never_claimed(db, f.job_id, f.job, meter), counted)))
    return [_plan_finding(db, f, action, stall, why, prior, nevers.get(f.job_id), now)
            for f, action, stall, why, prior in decided]


def _plan_finding(db, f: Finding, action: str, stall: dict | None, why: str | None, prior: dict | None,
                  never: int | None, now: dt.datetime) -> _Plan:
    summary = {"job_id": f.job_id, "kind": f.kind, "severity": f.severity, "action": action,
               "alert": why or "suppressed"}
    plan = _Plan(f.job_id, [], summary)
    if stall is None and why is None:
        plan.suppressed = 1
        return plan

    message = None
    if why:
        counts = f.job.get("counts") or {}
        open_, _ = _open_in_snapshot(f.job)
        message = alerts.build_stall_message(alerts.StallAlert(
            severity=f.severity, job_id=f.job_id, kind=f.kind, reason=f.reason,
            gcs_path=f.job.get("gcs_path") or "", stalled_for_s=(now - f.since).total_seconds(),
            succeeded=int(counts.get("succeeded") or 0), failed=int(counts.get("failed") or 0),
            open=open_, never_claimed=never, detected_at=now,
            action="reminder" if action == "unchanged" else action,
        ))
        summary["never_claimed"] = never
    record = _stall_event_record(f.job_id, f.kind, f.severity, f.reason, now, action, message,
                                 notify_state=PENDING if why else SUPPRESSED,
                                 notify_error=None if why else "suppressed by cooldown")
    # The flag carries the alert cooldown (see the module docstring): a new flag or escalation
    # keeps the last alert's time and severity unless this one alerts; a reminder updates them.
    written = dict(stall if stall is not None else (f.job.get("stall") or {}))
    written["last_alert_at"] = now if why else (prior or {}).get("last_alert_at")
    written["last_severity"] = f.severity if why else (prior or {}).get("last_severity")
    plan.ops.append(lambda batch: _write_job_stall(db, batch, f.job_id, written, f.update_time))
    if stall is not None:
        details = {"kind": f.kind, "severity": f.severity, "reason": f.reason, "action": action,
                   "never_claimed": never}
        plan.ops.append(lambda batch: _write_job_event(db, batch, f.job_id, "stall_flagged", now, details))
    ref = db.collection(STALL_EVENTS).document()
    plan.ops.append(lambda batch: _write_stall_event(db, batch, record, ref))
    state: dict[str, Any] = {"job_id": f.job_id, "updated_at": now, "last_kind": f.kind}
    if action == "flagged":
        state["episode_at"] = now
    if why:
        state |= {"last_alert_at": now, "last_severity": f.severity}
    plan.ops.append(lambda batch: _write_alert_state(db, batch, f.job_id, state))
    if stall is not None:
        plan.flagged = 1
        plan.log_fields = {"event": "stall_flagged", "severity": "WARNING", "job_id": f.job_id, "kind": f.kind,
                           "stall_severity": f.severity, "action": action, "alert": why or "suppressed"}
    if why:
        plan.outbox = (ref, message)
    else:
        plan.suppressed = 1
    return plan


def _plan_recovery(db, job: dict, now: dt.datetime) -> _Plan:
    stall = job.get("stall") or {}
    how = moved_since_flag(job, stall) or "no longer matches a stall condition"
    flagged_at = as_utc(stall.get("flagged_at")) or now
    job_id = job["job_id"]
    message = alerts.build_recovered_message(job_id, job.get("gcs_path") or "", stall.get("kind", "?"), how,
                                             (now - flagged_at).total_seconds())
    record = _stall_event_record(job_id, stall.get("kind", "?"), "INFO", how, now, "recovered", message,
                                 notify_state=PENDING, notify_error=None)
    details = {"kind": stall.get("kind"), "how": how, "flagged_at": stall.get("flagged_at")}
    ref = db.collection(STALL_EVENTS).document()
    state = {"job_id": job_id, "updated_at": now, "last_alert_at": now, "last_severity": "INFO"}
    return _Plan(job_id, [
        lambda batch: _write_job_stall(db, batch, job_id, None, job.get("_update_time")),
        lambda batch: _write_job_event(db, batch, job_id, "stall_recovered", now, details),
        lambda batch: _write_stall_event(db, batch, record, ref),
        lambda batch: _write_alert_state(db, batch, job_id, state),
    ], outbox=(ref, message), recovered=1,
        log_fields={"event": "stall_recovered", "job_id": job_id, "kind": stall.get("kind"), "how": how})


def _commit_plans(db, plans: list[_Plan], pool) -> set[int]:
    """Commits every plan in as few atomic batches as fit (≤ MAX_BATCH_OPS writes, a few in parallel);
    a plan's writes never straddle two batches. Returns the indices of plans whose job changed since
    we read it (update-time precondition failed): they are left alone, the next sweep looks again."""
    chunks: list[list[int]] = []
    size = 0
    per_chunk = max(1, math.ceil(sum(len(p.ops) for p in plans) / COMMIT_PARALLEL))
    per_chunk = min(MAX_BATCH_OPS, max(MIN_BATCH_OPS, per_chunk))
    for i, plan in enumerate(plans):
        if not plan.ops:
            continue
        if not chunks or size + len(plan.ops) > per_chunk:
            chunks.append([])
            size = 0
        chunks[-1].append(i)
        size += len(plan.ops)
    moved: set[int] = set()
    for failed in pool.map(lambda chunk: _commit_chunk(db, plans, chunk), chunks):
        moved |= set(failed)
    return moved


def _commit_chunk(db, plans: list[_Plan], chunk: list[int]) -> list[int]:
    """One atomic batch; when a precondition fails, halves it until the moved job(s) stand alone."""
    batch = db.batch()
    for i in chunk:
        for op in plans[i].ops:
            op(batch)
    try:
        batch.commit(retry=_retry(), timeout=QUERY_TIMEOUT_S)
        return []
    except (gexc.FailedPrecondition, gexc.NotFound):
        # A job changed between our read and this write: it moved, so it is not ours to flag now.
        if len(chunk) == 1:
            return chunk
        mid = len(chunk) // 2
        return _commit_chunk(db, plans, chunk[:mid]) + _commit_chunk(db, plans, chunk[mid:])


def _systemic(db, now: dt.datetime, cfg: Settings, scan: _Scan, meter: ReadMeter):
    """Counts jobs whose current stall episode began within the hour (alert_state: one doc per job)."""
    if cfg.systemic_threshold <= 0:
        return None
    since = now - SYSTEMIC_WINDOW
    base = db.collection(ALERT_STATE).where(filter=FieldFilter("episode_at", ">=", since))
    n = int(base.count(alias="n").get(retry=_retry(), timeout=QUERY_TIMEOUT_S)[0][0].value)
    meter.aggregation(n)
    if n < cfg.systemic_threshold:
        return None
    prior = db.collection(ALERT_STATE).document(SYSTEMIC_KEY).get(retry=_retry(), timeout=QUERY_TIMEOUT_S)
    meter.gets(1)
    if not decide_systemic(n, cfg.systemic_threshold, prior.to_dict() if prior.exists else None, now,
                           cfg.alert_cooldown_minutes):
        return None
    ids = [s.id for s in _stream(base.limit(10), meter)]
    message = alerts.build_systemic_message(n, cfg.systemic_threshold, ids, int(SYSTEMIC_WINDOW.total_seconds() // 60))
    record = _stall_event_record(SYSTEMIC_KEY, "systemic", "CRITICAL", f"{n} jobs stalled within an hour", now,
                                 "systemic", message, notify_state=PENDING, notify_error=None)
    batch = db.batch()
    ref = db.collection(STALL_EVENTS).document()
    _write_stall_event(db, batch, record, ref)
    _write_alert_state(db, batch, SYSTEMIC_KEY, {"job_id": None, "updated_at": now, "last_alert_at": now,
                                                 "last_severity": "CRITICAL", "last_count": n})
    batch.commit()
    log_event("systemic_stall", severity="CRITICAL", logger="upcfan.sweeper", stalled_jobs=n)
    return (ref, message)


def _deliver(db, pending: list[tuple[Any, dict]], outbox: list, url: str, now: dt.datetime,
             report: SweepReport, *, systemic_posted: bool = False) -> None:
    """Posts the systemic alert and earlier un-notified alerts first, then this sweep's; bounded, and
    stops at the first outage. Outcomes are written back in one batch."""
    if systemic_posted and outbox:
        outbox = [outbox[-1]] + outbox[:-1]  # the systemic alert (last in) goes first
    queue: list[tuple[Any, alerts.SlackMessage, bool, int]] = []
    for ref, data in pending:
        try:
            raw = json.loads(data.get("message_json") or "{}")
            msg = alerts.SlackMessage(text=raw.get("text", ""), blocks=raw.get("blocks", []))
        except ValueError:
            continue
        if msg.text:
            queue.append((ref, msg, True, int(data.get("attempts") or 0)))
    queue += [(ref, msg, False, 0) for ref, msg in outbox]
    outage: str | None = None
    posts = 0
    marks: list[tuple[Any, dict]] = []
    for ref, msg, is_retry, attempts in queue:
        if not url:
            marks.append((ref, {"notified": False, "notify_state": NOT_CONFIGURED,
                                "notify_error": "slack webhook not configured"}))
            continue
        if outage or posts >= MAX_POSTS_PER_SWEEP:
            if systemic_posted and not outage and not is_retry:
                marks.append((ref, {"notified": False, "notify_state": ROLLED_UP,
                                    "notify_error": "over the per-sweep post budget; counted in the systemic alert"}))
            else:
                error = f"deferred: {outage}" if outage else "deferred: per-sweep post budget reached"
                marks.append((ref, {"notified": False, "notify_state": FAILED, "notify_error": error}))
            report.notify_failed += 1
            continue
        posts += 1
        result = alerts.post_message(msg, webhook_url=url)
        if result.ok:
            marks.append((ref, {"notified": True, "notify_state": SENT, "notify_error": None,
                                "notified_at": now, "attempts": attempts + 1}))
            report.alerted += 1
            report.retried += 1 if is_retry else 0
        else:
            marks.append((ref, {"notified": False, "notify_state": FAILED,
                                "notify_error": result.error, "attempts": attempts + 1}))
            report.notify_failed += 1
            log_event("alert_failed", severity="WARNING", logger="upcfan.sweeper", error=result.error,
                      status=result.status)
            if result.transient:
                outage = result.error
    _write_mark_stall_events(db, marks)


def _stall_event_record(job_id: str, kind: str, severity: str, reason: str, now: dt.datetime, action: str,
                        message: alerts.SlackMessage | None, *, notify_state: str, notify_error: str | None) -> dict:
    return {
        "job_id": job_id, "kind": kind, "severity": severity, "reason": reason, "action": action,
        "detected_at": now, "notified": False, "notify_state": notify_state, "notify_error": notify_error,
        "attempts": 0, "cooldown_key": job_id,
        "message_json": json.dumps(message.to_payload()) if message else None,
        "expire_at": now + STALL_EVENT_TTL,
    }


# --------------------------------------------------------------------------------------------
# The only writes the sweeper makes. Keep this list short; tests/unit/test_sweeper_rules.py
# fails if any other function in this module calls set/update/create/delete/commit... on a
# document other than through these.


def _write_job_stall(db, batch, job_id: str, stall: dict | None, update_time) -> None:
    """jobs/{id}.stall only (never status, counts or totals), only if the job is unchanged since read."""
    ref = db.collection(JOBS).document(job_id)
    option = db.write_option(last_update_time=update_time) if update_time is not None else None
    batch.update(ref, {"stall": stall}, option=option)


def _write_job_event(db, batch, job_id: str, event_type: str, now: dt.datetime, details: dict) -> None:
    assert event_type in ("stall_flagged", "stall_recovered")
    ref = db.collection(JOBS).document(job_id).collection(EVENTS).document()
    batch.set(ref, event_doc(event_type, "sweeper", now, details))


def _write_stall_event(db, batch, record: dict, ref) -> None:
    assert ref.parent.id == STALL_EVENTS
    batch.set(ref, record)


def _write_mark_stall_events(db, marks: list[tuple[Any, dict]]) -> None:
    """Delivery outcomes onto stall_events records, ≤ 500 per batch."""
    for i in range(0, len(marks), 500):
        batch = db.batch()
        for ref, fields in marks[i:i + 500]:
            assert ref.parent.id == STALL_EVENTS
            batch.update(ref, fields)
        try:
            batch.commit()
        except gexc.GoogleAPICallError as exc:  # a lost mark means one extra retry post, never a crash
            log_event("stall_event_mark_failed", severity="WARNING", logger="upcfan.sweeper",
                      error=type(exc).__name__)


def _write_alert_state(db, batch, key: str, fields: dict) -> None:
    batch.set(db.collection(ALERT_STATE).document(key), fields, merge=True)
