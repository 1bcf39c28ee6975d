"""The job-started Slack note (sent once, by the transaction that finished fan-out), and that every
function that sends a note mounts the Slack webhook in production (infra's model and deploy's command)."""

from __future__ import annotations

import datetime as dt
import json

from infra import deploy, model
from shared import alerts, ingest
from shared.events import Event
from shared.store.memory import MemoryStore

JOB = {"job_id": "job-<1>&x", "status": "running", "gcs_path": "gs://b/a<b>&c.txt", "handler": "dry_run",
       "totals": {"lines": 2010, "items": 2000, "invalid": 5, "duplicate": 5, "skipped": 0}}

# Every function that can post to Slack, and what it posts. A function missing here that posts would
# log `..._not_notified` in production (no UPCFAN_SLACK_WEBHOOK_URL): keep this list honest.
NOTE_SENDERS = {
    "ingest": "job-started note (fan-out done); job-finished note when items finished before fan-out ended",
    "worker": "job-finished note (/progress); pause alert (circuit breaker)",
    "api": "job-finished note (retry round, re-drive); pause alert (operator pause)",
    "sweeper": "stall, escalation, reminder, recovery and systemic alerts",
}


def test_message_counts_commands_and_escaping():
    msg = alerts.build_job_started_message(JOB)
    text = msg.text + json.dumps(msg.blocks)
    assert msg.text.startswith("INFO: upcfan job job-&lt;1&gt;&amp;x started")
    for raw in ("<1>", "a<b>"):
        assert raw not in text
    for needle in ("lines 2010", "items 2000", "invalid 5", "duplicate 5", "upcfan status job-&lt;1&gt;&amp;x",
                   "upcfan cancel", "upcfan pause", "dry_run"):
        assert needle in text, needle


def test_notify_never_raises():
    d = alerts.notify_job_started(JOB, post=lambda m: (_ for _ in ()).throw(RuntimeError("boom")))
    assert not d.ok and "boom" in d.error


def test_the_fanout_transaction_that_starts_the_job_sends_one_note(monkeypatch):
    store = MemoryStore()
    now = dt.datetime(2026, 1, 2, tzinfo=dt.timezone.utc)
    store.create_job({"job_id": "j1", "status": "ingesting", "round": 1, "gcs_path": "gs://b/f", "chunks_total": 1,
                      "counts": {}}, Event("created", "test", now))
    store.put_chunk("j1", 0, {"start": 0, "end": 10, "status": "done", "done_at": now,
                              "totals": {"lines": 3, "items": 3, "invalid": 0, "duplicate": 0, "skipped": 0}})
    sent: list[dict] = []
    monkeypatch.setattr(alerts, "notify_job_started",
                        lambda job, **kw: sent.append(job) or alerts.SlackPostResult(ok=True, status=200))
    monkeypatch.setattr(alerts, "notify_job_finished", lambda job, **kw: alerts.SlackPostResult(ok=True, status=200))
    assert ingest._maybe_finish_fanout(store, "j1") is True
    assert ingest._maybe_finish_fanout(store, "j1") is False  # a redelivered last chunk: no second note
    assert len(sent) == 1 and sent[0]["job_id"] == "j1" and sent[0]["totals"]["items"] == 3
    notes = [doc for event_id, doc in store.events["j1"] if event_id == "job_started_note"]
    assert [(n["type"], n["details"]["sent"]) for n in notes] == [("job_started_note", True)]


def test_every_note_sender_mounts_the_slack_webhook_in_production():
    assert set(NOTE_SENDERS) == set(model.FUNCTIONS)
    d = model.Desired(project="demo-prod", region="us-central1", bucket="b")
    specs = {s.name: s for s in deploy.function_specs(1)}
    grants = {(g.account, g.role, g.target) for g in model.GRANTS}
    for fn in NOTE_SENDERS:
        assert (model.SLACK_ENV, model.SLACK_SECRET) in model.FUNCTION_SECRETS[fn], fn
        cmd = deploy.gcloud_deploy(specs[fn], d, deploy.REPO_ROOT, "h", {})
        flag = next(a for a in cmd if a.startswith("--set-secrets="))
        assert f"{model.SLACK_ENV}={model.SLACK_SECRET}:latest" in flag, fn
        # Cloud Run refuses a revision whose service account cannot read a secret it mounts.
        assert (fn, "roles/secretmanager.secretAccessor", f"secret:{model.SLACK_SECRET}") in grants, fn


def test_the_started_note_names_the_jobs_handler_from_its_options():
    from shared.alerts import build_job_started_message

    text = build_job_started_message({"job_id": "j1", "options": {"handler": "dry_run"}, "totals": {}}).text
    assert "Handler dry_run" in text
