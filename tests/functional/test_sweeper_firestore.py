"""The sweeper on the real Firestore emulator with a local Slack sink: flags and alerts, never fixes.

Every test runs in its own emulator project (`demo-sweep-<uuid>`), so global sweeper queries
see only that test's jobs; time is a fake clock passed as `now=`.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from google.cloud import firestore

from shared.naming import lease_shard_for
from shared import sweeper
from shared.sweeper import engine, store
from shared.config import load_settings
from shared.model import ALERT_STATE, EVENTS, ITEMS, JOBS, STALL_EVENTS

T0 = dt.datetime(2026, 3, 1, 12, 0, 0, tzinfo=dt.timezone.utc)
MIN = dt.timedelta(minutes=1)


class SlackSink:
    """A tiny webhook on 127.0.0.1 that records posts and fails on demand (status, Retry-After)."""

    def __init__(self):
        self.posts: list[dict] = []
        self.fail_status: int | None = None
        self.retry_after: str | None = None
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if sink.fail_status:
                    self.send_response(sink.fail_status)
                    if sink.retry_after:
                        self.send_header("Retry-After", sink.retry_after)
                    self.end_headers()
                    self.wfile.write(b"fail")
                    return
                sink.posts.append(json.loads(body))
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def sink():
    s = SlackSink()
    yield s
    s.close()


@pytest.fixture
def env(firestore_emulator):
    """A private project on the session emulator, and settings pointing at it."""
    project = f"demo-sweep-{uuid.uuid4().hex[:10]}"
    db = firestore.Client(project=project)
    cfg = load_settings().replace(project=project, stall_minutes=15, stall_critical_minutes=60,
                              ingesting_stall_minutes=15, queued_stall_minutes=30, lease_overrun_minutes=10,
                              alert_cooldown_minutes=60, systemic_threshold=3)
    return db, cfg


def sweep(env, sink, now, url=None):
    db, cfg = env
    return sweeper.run_sweep(now=now, settings=cfg, db=db, webhook_url=sink.url if url is None else url)


def _job_id(tag="job"):
    return f"{tag}-{uuid.uuid4().hex[:12]}"


def make_job(db, *, status="running", last_progress=None, created=None, fanout=None, items_total=10,
             counts=None, gcs_path="gs://bucket/upload.txt", stall=None, job_id=None):
    job_id = job_id or _job_id()
    created = created or T0 - 120 * MIN
    db.collection(JOBS).document(job_id).set({
        "job_id": job_id, "gcs_path": gcs_path, "status": status, "created_at": created,
        "updated_at": created, "fanout_done_at": fanout if fanout is not None else (created if status != "ingesting" else None),
        "last_progress_at": last_progress or created, "totals": {"lines": items_total, "items": items_total},
        "counts": counts or {"queued": 0, "processing": 1, "succeeded": 4, "failed": 1, "cancelled": 0},
        "round": 1, "stall": stall, "chunks_total": 1,
    })
    return job_id


def make_item(db, job_id, gtin, *, status="processing", lease_expires=None):
    db.collection(JOBS).document(job_id).collection(ITEMS).document(gtin).set({
        "job_id": job_id, "gtin": gtin, "status": status, "attempt": 1, "round": 1,
        "lease_expires_at": lease_expires or T0, "lease_owner": "w1", "lease_shard": lease_shard_for(gtin),
    })


def job(db, job_id):
    return db.collection(JOBS).document(job_id).get().to_dict()


def job_events(db, job_id, alerts=False):
    """The job's events by time; `alert_sent` ones (one per alert that reached Slack) only with `alerts`."""
    events = (e.to_dict() for e in db.collection(JOBS).document(job_id).collection(EVENTS).stream())
    return sorted((e for e in events if alerts or e["type"] != "alert_sent"), key=lambda e: e["at"])


def stall_events(db, job_id=None):
    docs = [d.to_dict() for d in db.collection(STALL_EVENTS).stream()]
    return [d for d in docs if job_id is None or d["job_id"] == job_id]


def snapshot_all(db):
    """Every document the sweeper must not change: jobs minus `stall`, and every item."""
    out = {}
    for j in db.collection(JOBS).stream():
        data = j.to_dict()
        data.pop("stall", None)
        out[j.reference.path] = data
    for it in db.collection_group(ITEMS).stream():
        out[it.reference.path] = (it.to_dict(), it.update_time)
    return out


def test_stalled_job_flagged_once_then_cooldown_then_escalation(env, sink):
    db, _ = env
    jid = make_job(db, last_progress=T0 - 20 * MIN)
    make_item(db, jid, "00000000000017", status="succeeded")

    r1 = sweep(env, sink, T0)
    assert r1.flagged == 1 and r1.alerted == 1
    stall = job(db, jid)["stall"]
    assert stall["kind"] == "no_progress" and stall["severity"] == "WARNING"
    # The flag, and the alert that reached Slack, are in the job's history (issue 16).
    assert sorted(e["type"] for e in job_events(db, jid, alerts=True)) == ["alert_sent", "stall_flagged"]
    assert {e["actor"] for e in job_events(db, jid, alerts=True)} == {"sweeper"}
    [sent] = [e for e in job_events(db, jid, alerts=True) if e["type"] == "alert_sent"]
    assert sent["details"]["kind"] == "no_progress" and sent["details"]["severity"] == "WARNING"
    assert len(sink.posts) == 1 and jid in sink.posts[0]["text"]

    # Same condition a few minutes later: no second flag, no second alert.
    r2 = sweep(env, sink, T0 + 5 * MIN)
    assert r2.flagged == 0 and r2.alerted == 0 and r2.suppressed == 1
    assert len(sink.posts) == 1 and len(job_events(db, jid, alerts=True)) == 2

    # Stalled past stall_critical_minutes (60): escalation beats the cooldown.
    r3 = sweep(env, sink, T0 + 45 * MIN)
    assert r3.flagged == 1 and r3.alerted == 1
    assert job(db, jid)["stall"]["severity"] == "CRITICAL"
    assert job(db, jid)["stall"]["flagged_at"] == stall["flagged_at"]  # same episode
    assert "CRITICAL" in sink.posts[-1]["text"]

    # Within the cooldown after the escalation: quiet. After it: one reminder.
    assert sweep(env, sink, T0 + 90 * MIN).alerted == 0
    r5 = sweep(env, sink, T0 + 106 * MIN)
    assert r5.alerted == 1 and r5.flagged == 0 and "still" in sink.posts[-1]["text"]
    assert len(sink.posts) == 3
    recs = stall_events(db, jid)
    assert sorted(r["action"] for r in recs) == ["escalated", "flagged", "unchanged"]
    for r in recs:
        assert r["notified"] is True and r["notify_error"] is None and r["cooldown_key"] == jid
        assert r["expire_at"] > r["detected_at"]


def test_completed_and_healthy_jobs_never_touched(env, sink):
    db, _ = env
    done = make_job(db, status="completed", last_progress=T0 - 300 * MIN)
    failed_final = make_job(db, status="completed_with_failures", last_progress=T0 - 300 * MIN)
    make_item(db, done, "00000000000017", status="processing", lease_expires=T0 - 200 * MIN)
    healthy = make_job(db, last_progress=T0 - 2 * MIN)
    before = {j: db.collection(JOBS).document(j).get() for j in (done, failed_final, healthy)}
    r = sweep(env, sink, T0)
    assert r.flagged == 0 and sink.posts == []
    for j, snap in before.items():
        after = db.collection(JOBS).document(j).get()
        assert after.update_time == snap.update_time
        assert list(db.collection(JOBS).document(j).collection(EVENTS).stream()) == []


def test_sweep_never_changes_items_tasks_status_counts(env, sink, monkeypatch):
    db, _ = env
    from shared import tasks

    created_tasks = []
    monkeypatch.setattr(tasks, "tasks_client", lambda: created_tasks.append("client") or None)
    stalled = make_job(db, last_progress=T0 - 50 * MIN)
    overrun = make_job(db, last_progress=T0 - 1 * MIN)
    ingesting = make_job(db, status="ingesting", created=T0 - 40 * MIN)
    for n, jid in enumerate((stalled, overrun)):
        make_item(db, jid, f"0000000000{n}017", status="processing", lease_expires=T0 - 30 * MIN)
        make_item(db, jid, f"0000000000{n}024", status="queued")
        make_item(db, jid, f"0000000000{n}031", status="succeeded")
    before = snapshot_all(db)
    r = sweep(env, sink, T0)
    assert r.flagged == 3
    assert {f["job_id"]: f["kind"] for f in r.findings} == {
        stalled: "queued_stall", overrun: "lease_overrun", ingesting: "ingesting_stall"}
    assert snapshot_all(db) == before
    assert created_tasks == []
    # and the flag is cleared without touching anything else either
    db.collection(JOBS).document(ingesting).update({"status": "running", "last_progress_at": T0 + MIN})
    before = snapshot_all(db)
    r2 = sweep(env, sink, T0 + 2 * MIN)
    assert r2.recovered == 1 and job(db, ingesting)["stall"] is None
    assert snapshot_all(db) == before and created_tasks == []


def test_never_claimed_reported_from_count(env, sink):
    db, _ = env
    jid = make_job(db, last_progress=T0 - 20 * MIN, items_total=7,
                   counts={"queued": 0, "processing": 0, "succeeded": 2, "failed": 0, "cancelled": 0})
    make_item(db, jid, "00000000000017", status="succeeded")
    make_item(db, jid, "00000000000024", status="succeeded")
    r = sweep(env, sink, T0)
    assert r.findings[0]["never_claimed"] == 5
    assert "never claimed 5" in sink.posts[0]["text"]


def test_queued_stall_classified(env, sink):
    db, _ = env
    jid = make_job(db, last_progress=T0 - 40 * MIN, fanout=T0 - 50 * MIN,
                   counts={"queued": 3, "processing": 0, "succeeded": 2, "failed": 0, "cancelled": 0})
    r = sweep(env, sink, T0)
    assert r.findings[0]["kind"] == "queued_stall" and job(db, jid)["stall"]["kind"] == "queued_stall"


def test_systemic_alert_at_third_stall_in_an_hour(env, sink):
    db, _ = env
    make_job(db, last_progress=T0 - 20 * MIN)
    assert sweep(env, sink, T0).systemic is False
    make_job(db, last_progress=T0 - 10 * MIN)
    assert sweep(env, sink, T0 + 10 * MIN).systemic is False
    make_job(db, last_progress=T0 - 5 * MIN)
    r = sweep(env, sink, T0 + 20 * MIN)
    assert r.systemic is True
    systemic = [p for p in sink.posts if "systemic" in p["text"]]
    assert len(systemic) == 1 and "3 upcfan jobs" in systemic[0]["text"]
    assert not db.collection(JOBS).document("systemic").collection(EVENTS).get()  # names no job
    # A fourth stall within the systemic cooldown does not repeat it.
    make_job(db, last_progress=T0)
    assert sweep(env, sink, T0 + 30 * MIN).systemic is False
    assert len([p for p in sink.posts if "systemic" in p["text"]]) == 1


@pytest.mark.parametrize("status,retry_after", [(500, None), (503, None), (429, "30")])
def test_slack_down_sweep_succeeds_and_next_sweep_retries(env, sink, status, retry_after):
    db, _ = env
    jid = make_job(db, last_progress=T0 - 20 * MIN)
    sink.fail_status, sink.retry_after = status, retry_after
    r1 = sweep(env, sink, T0)
    assert r1.flagged == 1 and r1.alerted == 0 and r1.notify_failed == 1
    [rec] = stall_events(db, jid)
    assert rec["notified"] is False and str(status) in rec["notify_error"]
    assert job(db, jid)["stall"]["severity"] == "WARNING"
    assert "alert_sent" not in [e["type"] for e in job_events(db, jid, alerts=True)]  # not sent: not in the history

    sink.fail_status = None
    r2 = sweep(env, sink, T0 + 5 * MIN)  # inside the cooldown: only the retry posts
    assert r2.retried == 1 and r2.alerted == 1
    assert len(sink.posts) == 1 and jid in sink.posts[0]["text"]
    [rec] = stall_events(db, jid)
    assert rec["notified"] is True and rec["notify_error"] is None
    assert [e["type"] for e in job_events(db, jid, alerts=True)].count("alert_sent") == 1
    assert sweep(env, sink, T0 + 10 * MIN).alerted == 0


def test_slack_unreachable_is_recorded(env, sink):
    db, _ = env
    make_job(db, last_progress=T0 - 20 * MIN)
    sink.close()
    r = sweep(env, sink, T0)  # connection refused
    assert r.flagged == 1 and r.notify_failed == 1
    [rec] = stall_events(db)
    assert rec["notified"] is False and "unreachable" in rec["notify_error"]
    assert "127.0.0.1" not in rec["notify_error"]


def test_short_retry_after_is_waited_out(env, sink, monkeypatch):
    from shared import alerts

    db, _ = env
    make_job(db, last_progress=T0 - 20 * MIN)
    sink.fail_status, sink.retry_after = 429, "0"
    waits = []

    real_post = alerts.post_message

    def post(msg, webhook_url=None):
        def sleep(s):
            waits.append(s)
            sink.fail_status = None  # the rate limit window passes
        return real_post(msg, webhook_url=webhook_url, sleep=sleep)

    monkeypatch.setattr(alerts, "post_message", post)
    r = sweep(env, sink, T0)
    assert waits == [0.0] and r.alerted == 1 and len(sink.posts) == 1


def test_message_content_escaped_with_fields(env, sink):
    db, _ = env
    jid = make_job(db, last_progress=T0 - 25 * MIN, gcs_path="gs://b/<script>&evil>.txt")
    sweep(env, sink, T0)
    [post] = sink.posts
    raw = json.dumps(post)
    assert "<script>" not in raw and "&lt;script&gt;&amp;evil&gt;.txt" in raw
    assert "WARNING" in post["text"] and jid in post["text"] and "25m" in post["text"]
    blocks_text = json.dumps(post["blocks"])
    for needle in (f"upcfan status {jid}", f"upcfan items {jid} --status failed", f"upcfan retry-failed {jid}",
                   f"upcfan cancel {jid}", f"/api/batch/status/{jid}", "succeeded 4", "failed 1", "open 1",
                   "never claimed"):
        assert needle in blocks_text, needle


def test_recovered_note_and_flag_cleared(env, sink):
    db, _ = env
    jid = make_job(db, last_progress=T0 - 20 * MIN)
    sweep(env, sink, T0)
    db.collection(JOBS).document(jid).update({"last_progress_at": T0 + 3 * MIN})
    r = sweep(env, sink, T0 + 5 * MIN)
    assert r.recovered == 1 and job(db, jid)["stall"] is None
    assert [e["type"] for e in job_events(db, jid)] == ["stall_flagged", "stall_recovered"]
    assert "RECOVERED" in sink.posts[-1]["text"] and jid in sink.posts[-1]["text"]
    # Nothing more to say next time.
    r2 = sweep(env, sink, T0 + 10 * MIN)
    assert r2.recovered == 0 and r2.alerted == 0


def test_flagged_job_that_completed_is_recovered(env, sink):
    db, _ = env
    jid = make_job(db, last_progress=T0 - 20 * MIN)
    sweep(env, sink, T0)
    db.collection(JOBS).document(jid).update({"status": "completed"})
    r = sweep(env, sink, T0 + 5 * MIN)
    assert r.recovered == 1 and job(db, jid)["stall"] is None and job(db, jid)["status"] == "completed"
    assert "job is now completed" in sink.posts[-1]["text"]


def test_alert_state_and_reads_scale_with_stalls(env, sink):
    db, _ = env
    for _ in range(20):
        make_job(db, status="completed", last_progress=T0 - 300 * MIN)
        make_job(db, last_progress=T0 - 1 * MIN)
    jid = make_job(db, last_progress=T0 - 20 * MIN)
    r = sweep(env, sink, T0)
    assert r.flagged == 1
    assert r.documents_read <= 12  # 1 stalled job, its count, and ≤ 1 per empty query
    state = db.collection(ALERT_STATE).document(jid).get().to_dict()
    assert state["last_severity"] == "WARNING" and state["last_alert_at"] == T0


def test_firestore_unreachable_raises_store_unavailable(firestore_emulator, monkeypatch):
    import socket

    from shared.exceptions import StoreUnavailableError

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", f"127.0.0.1:{port}")
    monkeypatch.setattr(store, "QUERY_TIMEOUT_S", 1.0)
    db = firestore.Client(project=f"demo-sweep-{uuid.uuid4().hex[:10]}")
    cfg = load_settings().replace(project=db.project)
    with pytest.raises(StoreUnavailableError) as err:
        sweeper.run_sweep(now=T0, settings=cfg, db=db, webhook_url="")
    assert "Firestore unreachable" in err.value.message


def test_job_that_moved_between_read_and_write_is_left_alone(env, sink, monkeypatch):
    """Findings are committed in shared batches with a per-job update-time precondition: a job
    that changes after the scan fails only its own writes; the others in the batch land."""
    db, _ = env
    a, moved, c = (make_job(db, last_progress=T0 - 16 * MIN) for _ in range(3))  # stalled from T0 + 1
    flagged_then_moved = make_job(db, last_progress=T0 - 20 * MIN)
    assert sweep(env, sink, T0 - 1 * MIN).flagged == 1  # the fourth job; the next sweep will recover it
    db.collection(JOBS).document(flagged_then_moved).update({"last_progress_at": T0})
    real_scan = engine.scan

    def scan_then_jobs_move(*args, **kwargs):
        result = real_scan(*args, **kwargs)
        for j in (moved, flagged_then_moved):  # a worker reports progress after our read
            db.collection(JOBS).document(j).update({"updated_at": T0})
        return result

    monkeypatch.setattr(engine, "scan", scan_then_jobs_move)
    events_before = {j: len(job_events(db, j)) for j in (a, moved, c, flagged_then_moved)}
    records_before = {j: len(stall_events(db, j)) for j in (a, moved, c, flagged_then_moved)}
    r = sweep(env, sink, T0 + 1 * MIN)
    assert r.skipped_moved == 2 and r.recovered == 0
    by_job = {f["job_id"]: f for f in r.findings}
    assert by_job[moved]["action"] == "skipped_moved"
    for j in (a, c):
        assert job(db, j)["stall"]["kind"] == "no_progress"
        assert len(job_events(db, j)) == events_before[j] + 1
        assert len(stall_events(db, j)) == records_before[j] + 1
    # the moved jobs: nothing written at all (no flag change, no event, no record)
    assert job(db, moved)["stall"] is None
    assert job(db, flagged_then_moved)["stall"] is not None
    for j in (moved, flagged_then_moved):
        assert len(job_events(db, j)) == events_before[j]
        assert len(stall_events(db, j)) == records_before[j]
    # next sweep, nothing moving underneath: the recovery lands
    monkeypatch.setattr(engine, "scan", real_scan)
    r2 = sweep(env, sink, T0 + 2 * MIN)
    assert r2.recovered == 1 and job(db, flagged_then_moved)["stall"] is None


def test_many_findings_commit_in_few_batches(env, sink, monkeypatch):
    db, _ = env
    jids = [make_job(db, last_progress=T0 - 20 * MIN, counts={"queued": 0, "processing": 0, "succeeded": 10,
                                                              "failed": 0, "cancelled": 0}) for _ in range(30)]
    commits = []
    real_batch = db.batch

    def counting_batch():
        b = real_batch()
        real_commit = b.commit

        def commit(*a, **kw):
            commits.append(len(b._write_pbs))
            return real_commit(*a, **kw)

        b.commit = commit
        return b

    monkeypatch.setattr(db, "batch", counting_batch)
    r = sweep(env, sink, T0)
    assert r.flagged == 30 and r.skipped_moved == 0
    flag_commits = [n for n in commits if n >= 4]  # per-job groups are 4 writes; delivery marks come after
    assert 1 <= len(flag_commits) <= store.COMMIT_PARALLEL and sum(flag_commits) >= 30 * 4
    assert all(job(db, j)["stall"]["kind"] == "no_progress" for j in jids)
    # counts snapshot shows every item born: never_claimed is exactly 0 without a count aggregation
    assert {f["never_claimed"] for f in r.findings} == {0}


def test_cooldown_is_read_from_the_flag(env, sink):
    """The per-job cooldown travels on the job's own flag: no alert_state read per stalled job."""
    db, _ = env
    jids = [make_job(db, last_progress=T0 - 70 * MIN) for _ in range(5)]  # CRITICAL already: no escalation
    r1 = sweep(env, sink, T0)
    assert r1.flagged == 5 and r1.alerted == 5 + 1 and r1.systemic  # five stalls and the systemic alert
    for j in jids:
        stall = job(db, j)["stall"]
        assert stall["last_alert_at"] == T0 and stall["last_severity"] == "CRITICAL"
    r2 = sweep(env, sink, T0 + 5 * MIN)  # in cooldown: quiet, and each stalled job read at most twice
    assert r2.alerted == 0 and r2.suppressed == 5 and r2.flagged == 0
    fixed = 6  # ingesting, items, pending queries and the systemic count (≥ 1 read each), systemic state
    assert r2.documents_read <= 2 * 5 + fixed
    # a reminder after the cooldown moves the flag's alert time, not flagged_at, and adds no stall event
    r3 = sweep(env, sink, T0 + 61 * MIN)
    assert r3.alerted == 5 and r3.flagged == 0
    for j in jids:
        stall = job(db, j)["stall"]
        assert stall["last_alert_at"] == T0 + 61 * MIN and stall["flagged_at"] == T0
        assert [e["type"] for e in job_events(db, j)] == ["stall_flagged"]


def test_flag_without_alert_fields_uses_alert_state(env, sink):
    """Flags written before the flag carried its cooldown: the alert_state doc still rules."""
    db, _ = env
    legacy = {"kind": "no_progress", "severity": "WARNING", "reason": "r", "flagged_at": T0 - 5 * MIN}
    quiet = make_job(db, last_progress=T0 - 20 * MIN, stall=legacy)
    db.collection(ALERT_STATE).document(quiet).set({"job_id": quiet, "last_alert_at": T0 - 5 * MIN,
                                                    "last_severity": "WARNING"})
    loud = make_job(db, last_progress=T0 - 20 * MIN, stall=legacy)  # no alert_state: never alerted
    r = sweep(env, sink, T0)
    assert r.suppressed == 1 and r.alerted == 1
    assert [p for p in sink.posts if loud in p["text"]] and not [p for p in sink.posts if quiet in p["text"]]
    assert job(db, loud)["stall"]["last_alert_at"] == T0


def test_never_claimed_counts_items_born_at_fanout_that_no_delivery_claimed(env, sink):
    """Issue 15: items are born `queued` (attempt 0) at fan-out, so `count(items) == totals.items` and the
    never-reached-a-worker figure is the queued items with attempt 0 (a re-queued item, attempt 1, is not)."""
    db, _ = env
    jid = make_job(db, last_progress=T0 - 40 * MIN, items_total=5,
                   counts={"queued": 4, "processing": 0, "succeeded": 1, "failed": 0, "cancelled": 0})
    make_item(db, jid, "00000000000017", status="succeeded")
    make_item(db, jid, "00000000000024", status="queued")  # re-queued after a retryable error: was claimed
    for gtin in ("00000000000031", "00000000000048", "00000000000055"):
        make_item(db, jid, gtin, status="queued")
        db.collection(JOBS).document(jid).collection(ITEMS).document(gtin).update({"attempt": 0})
    r = sweep(env, sink, T0)
    assert [(f["kind"], f["never_claimed"]) for f in r.findings] == [("queued_stall", 3)]
    assert "never claimed 3" in sink.posts[0]["text"]


def test_a_missed_progress_check_is_reported_until_a_check_runs(env, sink):
    db, _ = env
    jid = make_job(db, last_progress=T0 - 3 * MIN, items_total=6,
                   counts={"queued": 0, "processing": 0, "succeeded": 6, "failed": 0, "cancelled": 0})
    db.collection(JOBS).document(jid).update({"progress_check_missed_at": T0 - 5 * MIN,
                                              "progress_check_missed_error": f"{jid}-p1: PermissionDenied: 403"})
    r = sweep(env, sink, T0)
    assert [(f["job_id"], f["kind"]) for f in r.findings] == [(jid, "progress_check_missed")]
    assert job(db, jid)["stall"]["kind"] == "progress_check_missed" and job(db, jid)["status"] == "running"
    # a check ran (it clears the flag; the job is otherwise unchanged): the next sweep notes the recovery
    db.collection(JOBS).document(jid).update({"progress_check_missed_at": None})
    r2 = sweep(env, sink, T0 + MIN)
    assert r2.recovered == 1 and job(db, jid)["stall"] is None


def test_lease_overrun_finds_overrun_items_in_every_lease_shard(env, sink):
    """The sharded query (`lease_shard in [0..15]`) reads what the unsharded one did: overrun items of
    every shard, none of a live lease; and an item still processing from before shards existed has
    none, so it is not matched (docs/architecture.md, Firestore write rate)."""
    from shared.naming import LEASE_SHARDS

    db, _ = env
    jid = make_job(db, last_progress=T0 - 1 * MIN)  # moving: only its items can flag it
    by_shard: dict[int, str] = {}
    n = 0
    while len(by_shard) < LEASE_SHARDS:
        gtin = f"{n:014d}"
        by_shard.setdefault(lease_shard_for(gtin), gtin)
        n += 1
    for gtin in by_shard.values():
        make_item(db, jid, gtin, status="processing", lease_expires=T0 - 30 * MIN)
    make_item(db, jid, "09999999999999", status="processing", lease_expires=T0 + 1 * MIN)  # live lease
    legacy = "09999999999990"
    make_item(db, jid, legacy, status="processing", lease_expires=T0 - 30 * MIN)
    db.collection(JOBS).document(jid).collection(ITEMS).document(legacy).update({"lease_shard": firestore.DELETE_FIELD})
    r = sweep(env, sink, T0)
    (finding,) = [f for f in r.findings if f["job_id"] == jid]
    assert finding["kind"] == "lease_overrun"
    flag = job(db, jid)["stall"]
    assert flag["kind"] == "lease_overrun" and f"{LEASE_SHARDS} item(s) processing" in flag["reason"]
