"""Who watches the watcher, in production: infra plans and applies a log-based counter of the sweeper's
`sweep_done` lines and an alert policy on its absence for three schedule periods, with recording fakes of
the official Cloud Logging / Cloud Monitoring clients; recorded requests are compared with fixtures under
tests/unit/fixtures/infra/ (regenerate with UPCFAN_UPDATE_FIXTURES=1)."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest

from infra import cli, model, runner, stack
from infra.clients import Clients
from infra.fakes import fake_clients
from infra.resources.base import CREATE, NOOP, UPDATE
from infra.resources.monitoring import SWEEP_DONE_FILTER, schedule_period_s

FIXTURES = Path(__file__).parent / "fixtures" / "infra"
PROJECT, REGION, BUCKET = "demo-prod", "us-central1", "upcfan-drop"
CHANNEL = f"projects/{PROJECT}/notificationChannels/1234"


def desired(**kw) -> model.Desired:
    return model.Desired(project=PROJECT, region=REGION, bucket=BUCKET, **kw)


def watchdog(d: model.Desired):
    return [r for r in stack.build(d) if r.kind in ("logging.metric", "monitoring.alertPolicy")]


def test_plan_creates_the_counter_then_the_absence_policy_for_three_periods():
    changes = runner.plan(watchdog(desired(alert_channels=(CHANNEL,))), Clients(overrides=fake_clients(BUCKET)))
    assert [(c.action, c.resource.kind) for c in changes] == [(CREATE, "logging.metric"),
                                                              (CREATE, "monitoring.alertPolicy")]
    metric, policy = (dict((k, new) for k, (_, new) in c.fields.items()) for c in changes)
    assert metric["filter"] == SWEEP_DONE_FILTER and 'jsonPayload.event="sweep_done"' in metric["filter"]
    assert policy["condition.duration_s"] == 3 * 300  # */5 * * * *: 15 minutes without a sweep
    assert policy["condition.filter"] == ('metric.type="logging.googleapis.com/user/upcfan-sweep-done" '
                                          'AND resource.type="cloud_run_revision"')
    assert policy["condition.reducer"] == "REDUCE_SUM" and policy["notification_channels"] == [CHANNEL]


def test_apply_then_plan_is_a_no_op_and_a_new_channel_is_one_update():
    fakes = fake_clients(BUCKET)
    clients = Clients(overrides=fakes)
    runner.apply(watchdog(desired()), clients)
    assert [c.action for c in runner.plan(watchdog(desired()), clients)] == [NOOP, NOOP]
    changes = runner.plan(watchdog(desired(alert_channels=(CHANNEL,))), clients)
    assert [(c.action, sorted(c.fields)) for c in changes] == [(NOOP, []), (UPDATE, ["notification_channels"])]
    runner.apply(watchdog(desired(alert_channels=(CHANNEL,))), clients)
    method, req = fakes["alert_policies"].calls[-1]
    assert method == "update_alert_policy" and list(req.update_mask.paths) == ["notification_channels"]
    assert req.alert_policy.name == f"projects/{PROJECT}/alertPolicies/1"  # found by display name, not recreated
    assert len(fakes["alert_policies"].policies) == 1
    assert [c.action for c in runner.plan(watchdog(desired(alert_channels=(CHANNEL,))), clients)] == [NOOP, NOOP]


def test_a_slower_schedule_moves_the_absence_window():
    fakes = fake_clients(BUCKET)
    clients = Clients(overrides=fakes)
    runner.apply(watchdog(desired()), clients)
    (_, change) = runner.plan(watchdog(desired(sweep_schedule="*/10 * * * *")), clients)
    assert change.fields["condition.duration_s"] == (900, 1800)
    runner.apply(watchdog(desired(sweep_schedule="*/10 * * * *")), clients)
    assert list(fakes["alert_policies"].calls[-1][1].update_mask.paths) == ["conditions", "documentation"]


@pytest.mark.parametrize("schedule, period", [("*/5 * * * *", 300), ("* * * * *", 60), ("7 * * * *", 3600),
                                              ("0 */2 * * *", 7200)])
def test_schedule_period(schedule, period):
    assert schedule_period_s(schedule) == period


@pytest.mark.parametrize("schedule", ["*/5 9-17 * * *", "0 9 * * 1", "every 5 minutes", "*/0 * * * *"])
def test_a_schedule_without_a_fixed_period_is_refused_by_name(schedule):
    with pytest.raises(ValueError, match="sweep schedule"):
        schedule_period_s(schedule)


def test_a_period_too_long_for_an_absence_window_is_refused():
    from infra.resources.monitoring import SweeperAbsencePolicy

    with pytest.raises(ValueError, match="23 h|1410 min"):
        SweeperAbsencePolicy(PROJECT, "p", "m", 12 * 3600)


def test_cli_plan_lists_the_watchdog_and_says_when_nobody_is_notified():
    out = io.StringIO()
    assert cli.main(["plan", f"--project={PROJECT}", f"--region={REGION}", "--only=logging", "--only=monitoring"],
                    clients=Clients(overrides=fake_clients(BUCKET)), out=out) == 0
    text = out.getvalue()
    assert "logging.metric  projects/demo-prod/metrics/upcfan-sweep-done" in text
    assert "monitoring.alertPolicy" in text and "notifies nobody" in text
    out = io.StringIO()
    cli.main(["plan", f"--project={PROJECT}", f"--region={REGION}", "--only=monitoring", f"--alert-channel={CHANNEL}"],
             clients=Clients(overrides=fake_clients(BUCKET)), out=out)
    assert "notifies nobody" not in out.getvalue() and CHANNEL in out.getvalue()


def test_deploy_passes_the_channels_to_infra():
    from infra import deploy

    cmd = deploy.infra_cmd("apply", desired(alert_channels=(CHANNEL,)), before_deploy=True)
    assert f"--alert-channel={CHANNEL}" in cmd


@pytest.mark.parametrize("client_name", ["logging_metrics", "alert_policies"])
def test_apply_requests_match_fixtures_and_parse_back(client_name):
    from google.cloud import logging_v2, monitoring_v3

    fakes = fake_clients(BUCKET)
    runner.apply(watchdog(desired(alert_channels=(CHANNEL,))), Clients(overrides=fakes))
    recorded = fakes[client_name].recorded()
    path = FIXTURES / f"apply_{client_name}.json"
    if os.environ.get("UPCFAN_UPDATE_FIXTURES") == "1":
        path.write_text(json.dumps(recorded, indent=2, sort_keys=True) + "\n")
    assert recorded == json.loads(path.read_text())
    types = {"CreateLogMetricRequest": logging_v2.types.CreateLogMetricRequest,
             "CreateAlertPolicyRequest": monitoring_v3.CreateAlertPolicyRequest}
    for call in recorded:
        types[call["type"]].from_json(json.dumps(call["request"]))
