"""The job-finished Slack note: message content and escaping, never raising, sent once per job."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from shared import alerts, progress
from shared.events import Event
from shared.item_state import Create
from shared.store.memory import MemoryStore

JOB = {"job_id": "job-<1>&x", "status": "completed_with_failures", "gcs_path": "gs://b/a<b>&c.txt", "round": 1,
       "totals": {"lines": 2010, "items": 2000, "invalid": 5, "duplicate": 5, "skipped": 2},
       "counts": {"succeeded": 1997, "failed": 3, "cancelled": 0, "queued": 0, "processing": 0}}


def _text(msg: alerts.SlackMessage) -> str:
    return msg.text + json.dumps(msg.blocks)


def test_message_is_info_with_the_line_summary_and_escaped():
    msg = alerts.build_job_finished_message(JOB)
    text = _text(msg)
    assert msg.text.startswith("INFO: upcfan job job-&lt;1&gt;&amp;x completed with failures")
    for raw in ("<1>", "a<b>", "&c.txt"):
        assert raw not in text, raw
    for needle in ("lines 2010", "succeeded 1997", "failed 3", "invalid 5", "duplicate 5", "cancelled 0",
                   "gs://b/a&lt;b&gt;&amp;c.txt", "--status failed", "retry-failed"):
        assert needle in text, needle
    assert {b["type"] for b in msg.blocks} <= {"section", "context"}


def test_a_clean_job_does_not_suggest_a_retry():
    msg = alerts.build_job_finished_message({**JOB, "job_id": "j", "status": "completed",
                                             "counts": {"succeeded": 2000, "failed": 0}})
    assert "completed" in msg.text and "retry-failed" not in _text(msg)


def test_notify_posts_once_and_reports_the_delivery():
    sent = []
    d = alerts.notify_job_finished(JOB, post=lambda m: sent.append(m) or alerts.SlackPostResult(ok=True, status=200))
    assert d.ok and len(sent) == 1 and "job-&lt;1&gt;" in sent[0].text


@pytest.mark.parametrize("post", [
    lambda m: (_ for _ in ()).throw(RuntimeError("boom")),
    lambda m: alerts.SlackPostResult(ok=False, status=500, error="slack answered 500"),
])
def test_notify_never_raises(post):
    d = alerts.notify_job_finished(JOB, post=post)
    assert not d.ok and d.error


def test_notify_without_a_webhook_is_quiet(monkeypatch):
    monkeypatch.setenv("UPCFAN_SLACK_WEBHOOK_URL", "")
    from shared.config import settings

    settings.cache_clear()
    try:
        d = alerts.notify_job_finished(JOB)
    finally:
        settings.cache_clear()  # later tests read their own environment
    assert not d.ok and "not configured" in d.error


@pytest.fixture
def job_db(monkeypatch):
    """A running job whose three items are final (2 succeeded, 1 failed), in the in-memory store."""
    store = MemoryStore()
    now = dt.datetime(2026, 1, 2, tzinfo=dt.timezone.utc)
    store.create_job({"job_id": "j1", "status": "running", "round": 1, "fanout_done_at": now, "gcs_path": "gs://b/f",
                      "totals": {"lines": 3, "items": 3, "invalid": 0, "duplicate": 0}, "counts": {}},
                     Event("created", "test", now))
    for gtin, status in (("00000000000017", "succeeded"), ("00000000000024", "succeeded"), ("00000000000031", "failed")):
        store.transact_item("seed", "j1", gtin, lambda _, g=gtin, st=status: (None, Create({"gtin": g, "status": st})))
    sent: list[dict] = []
    monkeypatch.setattr(alerts, "notify_job_finished",
                        lambda job, **kw: sent.append(job) or alerts.SlackPostResult(ok=True, status=200))
    return store, sent


def test_progress_notifies_once_right_after_the_final_transition(job_db):
    db, sent = job_db
    first = progress.check_job_progress("j1", store=db)
    assert first["completed"] is True
    assert len(sent) == 1 and sent[0]["job_id"] == "j1" and sent[0]["status"] == "completed_with_failures"
    assert sent[0]["counts"]["failed"] == 1 and sent[0]["gcs_path"] == "gs://b/f"
    # Redelivered / concurrent progress checks find the job final: no second note.
    for _ in range(3):
        progress.check_job_progress("j1", store=db)
    assert len(sent) == 1
    # The outcome is in the job's events, where an operator (and scripts/smoke) can see the note left.
    notes = [doc for event_id, doc in db.events["j1"] if event_id == "job_finished_note"]
    assert [(n["type"], n["details"]["sent"], n["details"]["status"]) for n in notes] == [("job_finished_note", True, 200)]


def test_a_retry_round_finishing_is_not_announced_again(job_db):
    db, sent = job_db
    db.update_job("j1", {"round": 2, "status": "running"})
    assert progress.check_job_progress("j1", store=db)["completed"] is True
    assert sent == []


def test_a_failing_notice_never_fails_the_progress_check(job_db, monkeypatch):
    db, _ = job_db

    def boom(job, **kw):
        raise RuntimeError("slack down")

    monkeypatch.setattr(alerts, "notify_job_finished", boom)
    assert progress.check_job_progress("j1", store=db)["status"] == "completed_with_failures"
