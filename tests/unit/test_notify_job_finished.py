"""The job-finished Slack note: message content and escaping, never raising, sent once per job."""

from __future__ import annotations

import json

import pytest

from shared import alerts, progress

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


class _Snap:
    def __init__(self, doc):
        self._doc = doc
        self.exists = doc is not None

    def to_dict(self):
        return dict(self._doc)


class _Ref:
    def __init__(self, doc):
        self.doc = doc
        self.id = doc["job_id"]

    def get(self, **_):
        return _Snap(self.doc)

    def update(self, fields):
        self.doc.update(fields)

    def collection(self, _):
        return self

    def document(self, _):
        return self


class _Db:
    def __init__(self, doc):
        self.ref = _Ref(doc)

    def collection(self, _):
        return self.ref


@pytest.fixture
def job_db(monkeypatch):
    doc = {"job_id": "j1", "status": "running", "round": 1, "fanout_done_at": "t", "gcs_path": "gs://b/f",
           "totals": {"lines": 3, "items": 3, "invalid": 0, "duplicate": 0}, "counts": {}}
    counts = {"queued": 0, "processing": 0, "succeeded": 2, "failed": 1, "cancelled": 0}
    monkeypatch.setattr(progress, "count_items_by_status", lambda db, job_id: dict(counts))

    def complete(db, job_ref, at, counts_, tries=4, seen=None):
        # The transaction's outcome: only the check that moves a completable job wins.
        if seen is not None:
            seen.clear()
            seen.update(job_ref.doc)
        if job_ref.doc["status"] not in ("running", "ingesting"):
            return None
        job_ref.doc["status"] = "completed_with_failures"
        return "completed_with_failures"

    monkeypatch.setattr(progress, "_complete_with_backoff", complete)
    sent: list[dict] = []
    monkeypatch.setattr(alerts, "notify_job_finished", lambda job, **kw: sent.append(job))
    return _Db(doc), sent


def test_progress_notifies_once_right_after_the_final_transition(job_db):
    db, sent = job_db
    first = progress.check_job_progress("j1", db=db)
    assert first["completed"] is True
    assert len(sent) == 1 and sent[0]["job_id"] == "j1" and sent[0]["status"] == "completed_with_failures"
    assert sent[0]["counts"]["failed"] == 1 and sent[0]["gcs_path"] == "gs://b/f"
    # Redelivered / concurrent progress checks find the job final: no second note.
    for _ in range(3):
        progress.check_job_progress("j1", db=db)
    assert len(sent) == 1


def test_a_retry_round_finishing_is_not_announced_again(job_db):
    db, sent = job_db
    db.ref.doc.update({"round": 2, "status": "running"})
    assert progress.check_job_progress("j1", db=db)["completed"] is True
    assert sent == []


def test_a_failing_notice_never_fails_the_progress_check(job_db, monkeypatch):
    db, _ = job_db

    def boom(job, **kw):
        raise RuntimeError("slack down")

    monkeypatch.setattr(alerts, "notify_job_finished", boom)
    assert progress.check_job_progress("j1", db=db)["status"] == "completed_with_failures"
