"""Who watches the watcher, locally: the local Cloud Scheduler's watchdog (devstack/scheduler.py) posts one
"upcfan sweeper stopped" alert to the Slack sink when no sweep has succeeded for three periods (the local
equivalent of infra's log-metric absence policy), and a successful sweep re-arms it."""

from __future__ import annotations

import time

import pytest

from devstack.testing import poll

pytestmark = pytest.mark.integration

PERIOD_S = 1.0  # local-only knob: the schedule's period is 5 minutes


def _watchdog_alerts(slack_sink) -> list[dict]:
    return [m for m in slack_sink.messages() if "upcfan sweeper stopped" in (m.get("text") or "")]


def test_a_paused_scheduler_is_noticed_after_three_periods_and_alerted_once(scheduler, slack_sink):
    assert scheduler.watchdog()["armed"] is False  # test stacks start paused and unarmed
    before = len(_watchdog_alerts(slack_sink))
    scheduler.pause()
    armed_at = time.time()
    scheduler.watchdog(PERIOD_S)
    try:
        alerts = poll(lambda: _watchdog_alerts(slack_sink)[before:], timeout_s=30, interval_s=0.2,
                      what="the watchdog's alert in the Slack sink")
        alert = alerts[0]
        assert alert["received_ts"] - armed_at >= 3 * PERIOD_S  # not before three periods of silence
        assert "PAUSED" in alert["text"] and "gcloud scheduler jobs run upcfan-sweeper" in alert["text"]
        # Still paused, twice as long again: one alert per outage, not one per check.
        poll(lambda: scheduler.watchdog()["silent_for_s"] >= 6 * PERIOD_S, timeout_s=30, interval_s=0.2,
             what="six periods of silence")
        assert len(_watchdog_alerts(slack_sink)[before:]) == 1
        assert [a["status"] for a in scheduler.watchdog()["alerts"]][-1] == 200

        # A sweep succeeds: silence resets, and a new outage alerts again.
        assert scheduler.run()["status"] == 200
        assert scheduler.watchdog()["silent_for_s"] < 3 * PERIOD_S
        poll(lambda: len(_watchdog_alerts(slack_sink)[before:]) == 2, timeout_s=30, interval_s=0.2,
             what="a second alert after a new outage")
    finally:
        scheduler.watchdog(0)  # disarmed: the rest of the session's Slack counts stay clean
