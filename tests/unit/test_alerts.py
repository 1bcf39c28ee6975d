"""Slack message building: escaping, fields, Block Kit shape; delivery outcomes without a network."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from shared import alerts

NOW = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.timezone.utc)


def _alert(**kw):
    base = dict(severity="WARNING", job_id="up-<1>&x", kind="no_progress", reason="no progress <for> 20 min & more",
                gcs_path="gs://b/a<b>&c.txt", stalled_for_s=20 * 60 + 5, succeeded=4, failed=1, open=3,
                never_claimed=7, detected_at=NOW)
    base.update(kw)
    return alerts.StallAlert(**base)


def _all_text(msg: alerts.SlackMessage) -> str:
    return msg.text + json.dumps(msg.blocks)


def test_escape():
    assert alerts.escape("a&b<c>d") == "a&amp;b&lt;c&gt;d"
    assert alerts.escape(5) == "5"


@pytest.mark.parametrize("secs,expected", [(45, "45s"), (20 * 60 + 5, "20m"), (2 * 3600 + 5 * 60, "2h 05m"), (-3, "0s")])
def test_format_duration(secs, expected):
    assert alerts.format_duration(secs) == expected


def test_stall_message_escapes_every_user_string():
    msg = alerts.build_stall_message(_alert())
    text = _all_text(msg)
    for raw in ("<1>", "a<b>", "<for>", "&c.txt", "& more"):
        assert raw not in text, raw
    assert "up-&lt;1&gt;&amp;x" in msg.text and "gs://b/a&lt;b&gt;&amp;c.txt" in msg.text


def test_stall_message_fields_and_commands():
    msg = alerts.build_stall_message(_alert(job_id="job-1", gcs_path="gs://b/f.txt", reason="r"))
    text = _all_text(msg)
    for needle in ("WARNING", "job-1", "gs://b/f.txt", "20m", "succeeded 4", "failed 1", "open 3",
                   "never claimed 7", "upcfan status job-1", "upcfan items job-1 --status failed",
                   "upcfan retry-failed job-1", "upcfan cancel job-1", "GET /api/batch/status/job-1",
                   "GET /api/batch/jobs/job-1/items?status=failed", "POST /api/batch/jobs/job-1/retry-failed",
                   "POST /api/batch/jobs/job-1/cancel"):
        assert needle in text, needle


def test_block_kit_shape():
    msg = alerts.build_stall_message(_alert(severity="CRITICAL", never_claimed=None))
    payload = msg.to_payload()
    assert set(payload) == {"text", "blocks"} and payload["text"]
    types = [b["type"] for b in payload["blocks"]]
    assert types[0] == "header" and "section" in types and types[-1] == "context"
    assert payload["blocks"][0]["text"]["type"] == "plain_text"
    assert len(payload["blocks"][0]["text"]["text"]) <= 150
    section = payload["blocks"][1]
    assert len(section["fields"]) <= 10 and all(f["type"] == "mrkdwn" for f in section["fields"])
    assert all(len(f["text"]) <= 2000 for f in section["fields"])
    assert "never claimed unknown" in msg.text and "CRITICAL" in msg.text
    json.dumps(payload)  # serialisable as-is


def test_actions_change_headline():
    assert "escalated to" in alerts.build_stall_message(_alert(action="escalated")).text
    assert "still stalled" in alerts.build_stall_message(_alert(action="reminder")).text


def test_systemic_and_recovered_messages_escape():
    sysmsg = alerts.build_systemic_message(12, 3, [f"j<{i}>" for i in range(12)])
    text = _all_text(sysmsg)
    assert "12 upcfan jobs" in sysmsg.text and "threshold 3" in sysmsg.text
    assert "j<1>" not in text and "j&lt;1&gt;" in text and "2 more" in text
    rec = alerts.build_recovered_message("j&1", "gs://b/<x>", "no_progress", "progress at <t>", 600)
    assert "RECOVERED" in rec.text and "j&amp;1" in rec.text and "<x>" not in _all_text(rec)


def test_post_without_url_is_not_configured():
    d = alerts.post_message(alerts.SlackMessage(text="x"), webhook_url="")
    assert not d.ok and not d.transient and "not configured" in d.error


def test_post_unreachable_never_raises_nor_leaks_url():
    d = alerts.post_message(alerts.SlackMessage(text="x"), webhook_url="http://127.0.0.1:9/secret-path")
    assert not d.ok and d.transient and "secret-path" not in d.error and "127.0.0.1" not in d.error


def test_retry_after_parsing():
    assert alerts._retry_after_s({"Retry-After": ["2"]}) == 2.0
    assert alerts._retry_after_s({"retry-after": "x"}) is None
    assert alerts._retry_after_s(None) is None


def test_429_waits_are_bounded_by_the_slack_policy(monkeypatch):
    """A short Retry-After is waited out at most `SLACK.attempts - 1` times; then the 429 is returned."""
    from types import SimpleNamespace

    import slack_sdk.webhook

    from shared.retry import SLACK

    sends = []

    class Client:
        def __init__(self, url, timeout, retry_handlers):
            assert retry_handlers == []

        def send_dict(self, payload):
            sends.append(payload)
            return SimpleNamespace(status_code=429, headers={"Retry-After": "0"}, body="slow down")

    monkeypatch.setattr(slack_sdk.webhook, "WebhookClient", Client)
    waits = []
    r = alerts.post_message(alerts.SlackMessage(text="x"), webhook_url="http://hook", sleep=waits.append)
    assert len(sends) == SLACK.attempts and waits == [0.0] * (SLACK.attempts - 1)
    assert not r.ok and r.transient and r.status == 429 and r.error == "slack rate limited (429, retry-after 0.0s)"


def test_a_stranded_alert_names_the_redrive_dry_run_first():
    """Issue 15, item 5: open items that may have no task: the alert says what an operator can run."""
    msg = alerts.build_stall_message(_alert(job_id="job-1", kind="queued_stall", stranded=True))
    assert "upcfan redrive job-1 --dry-run" in msg.text
    commands = json.dumps(msg.blocks)
    assert commands.index("upcfan redrive job-1 --dry-run") < commands.index("upcfan status job-1")
    assert "POST /api/batch/jobs/job-1/redrive" in commands
    plain = alerts.build_stall_message(_alert(job_id="job-1"))
    assert "redrive" not in _all_text(plain)


def test_alerts_and_job_notes_link_to_the_jobs_console_page_only_when_a_console_url_is_set(monkeypatch):
    from shared import alerts as alerts_module
    from shared.config import settings

    job = {"job_id": "j-1", "status": "completed", "gcs_path": "gs://b/f.csv", "totals": {"lines": 1, "items": 1}}
    builders = [lambda: alerts_module.build_job_finished_message(job),
                lambda: alerts_module.build_job_started_message(job),
                lambda: alerts_module.build_pause_message(job, "operator", "why", "op@example.com"),
                lambda: alerts_module.build_recovered_message("j-1", "gs://b/f.csv", "no_progress", "moved", 60)]
    monkeypatch.delenv("UPCFAN_CONSOLE_URL", raising=False)
    settings.cache_clear()
    for build in builders:
        assert "console" not in str(build().blocks)
    monkeypatch.setenv("UPCFAN_CONSOLE_URL", "https://console.example/")
    settings.cache_clear()
    for build in builders:
        blocks = build().blocks
        links = [b for b in blocks if "https://console.example/jobs/j-1|Open job j-1 in the console" in str(b)]
        assert len(links) == 1 and blocks.index(links[0]) == len(blocks) - 2, blocks  # before the context line
    settings.cache_clear()
