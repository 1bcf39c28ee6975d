"""Issue 15, item 5: when a sweep sees open items that may have no task left, its Slack alert names the
operator's re-drive (`upcfan redrive JOB --dry-run`); the sweeper itself still creates no task."""

from __future__ import annotations

import json

import pytest
from sweeper_fakes import InMemorySweepStore
from test_sweeper_engine import CFG, MIN, T0, _job

from shared.naming import lease_shard_for
from shared import alerts
from shared.model import JOBS
from shared.sweeper import engine
from shared.sweeper.plan import may_be_stranded

HINT = "upcfan redrive {job} --dry-run"


@pytest.fixture
def posts(monkeypatch):
    sent: list[alerts.SlackMessage] = []
    monkeypatch.setattr(alerts, "post_message",
                        lambda msg, webhook_url=None: sent.append(msg) or alerts.SlackPostResult(ok=True, status=200))
    return sent


def _sweep(mem):
    return engine.run_sweep(now=T0, settings=CFG, store=mem, webhook_url="http://slack.invalid/hook")


def _alert_for(posts, job_id):
    [msg] = [m for m in posts if job_id in m.text]
    return msg.text, json.dumps(msg.blocks)


def test_queued_items_not_moving_name_the_redrive(posts):
    mem = InMemorySweepStore()
    _job(mem, "stuck", last_progress_at=T0 - 45 * MIN,
         counts={"queued": 3, "processing": 0, "succeeded": 7, "failed": 0, "cancelled": 0})
    r = _sweep(mem)
    assert [(f["job_id"], f["kind"]) for f in r.findings] == [("stuck", "queued_stall")]
    text, blocks = _alert_for(posts, "stuck")
    assert HINT.format(job="stuck") in text and HINT.format(job="stuck") in blocks
    assert "POST /api/batch/jobs/stuck/redrive" in blocks


def test_a_lapsed_lease_names_the_redrive(posts):
    mem = InMemorySweepStore()
    _job(mem, "held")
    mem.put(f"{JOBS}/held/items/00000000000017", {"status": "processing", "gtin": "00000000000017", "lease_shard": lease_shard_for("00000000000017"),
                                                  "lease_expires_at": T0 - 30 * MIN})
    _sweep(mem)
    text, _ = _alert_for(posts, "held")
    assert HINT.format(job="held") in text


def test_no_progress_without_open_items_does_not(posts):
    mem = InMemorySweepStore()
    _job(mem, "idle", last_progress_at=T0 - 20 * MIN,
         counts={"queued": 0, "processing": 0, "succeeded": 10, "failed": 0, "cancelled": 0})
    r = _sweep(mem)
    assert [(f["job_id"], f["kind"]) for f in r.findings] == [("idle", "no_progress")]
    text, blocks = _alert_for(posts, "idle")
    assert "redrive" not in text and "redrive" not in blocks


@pytest.mark.parametrize("kind,open_,never,expected", [
    ("queued_stall", 0, 5, True), ("lease_overrun", 1, 0, True), ("no_progress", 2, 0, True),
    ("no_progress", 0, None, False), ("no_progress", 0, 3, True), ("ingesting_stall", 0, None, False),
])
def test_which_findings_may_be_stranded(kind, open_, never, expected):
    assert may_be_stranded(kind, open_, never) is expected
