"""shared/config.py: one validated settings object; a bad value fails with the variable's name.

Issue 14 item 5 (validated settings): before, `UPCFAN_LEASE_S=abc` surfaced as a bare ValueError deep
in the worker, and negative counts or a heartbeat slower than the lease were taken as given."""

from __future__ import annotations

import pytest

from shared import config
from shared.config import SettingsError, load_settings, parse_bool

VARS = ("GOOGLE_CLOUD_PROJECT", "GCLOUD_PROJECT", "UPCFAN_LEASE_S", "UPCFAN_HEARTBEAT_S", "UPCFAN_ITEM_QUEUE_SHARDS",
        "UPCFAN_DEFAULT_HANDLER", "UPCFAN_WORKER_URL", "UPCFAN_MARKETPLACE_API_KEY", "UPCFAN_MAX_LINES",
        "UPCFAN_STALL_MINUTES", "UPCFAN_STALL_CRITICAL_MINUTES", "UPCFAN_SLACK_WEBHOOK_URL",
        "UPCFAN_SMALL_JOB_MAX_LINES", "UPCFAN_SMALL_ITEM_QUEUE_NAME", "UPCFAN_CONTROL_QUEUE_NAME")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for var in VARS:
        monkeypatch.delenv(var, raising=False)
    config.settings.cache_clear()
    yield monkeypatch
    config.settings.cache_clear()


def test_defaults_and_the_variable_names_stay_as_they_were(clean_env):
    s = load_settings()
    assert (s.project, s.location, s.item_queue, s.lease_s, s.heartbeat_s, s.default_handler) == (
        "demo-upcfan", "us-central1", "upcfan-items", 60.0, 15.0, None)
    assert config.Settings.variable("lease_s") == "UPCFAN_LEASE_S"
    assert config.Settings.variable("project") == "GOOGLE_CLOUD_PROJECT"
    clean_env.setenv("GCLOUD_PROJECT", "second")
    assert load_settings().project == "second"
    clean_env.setenv("GOOGLE_CLOUD_PROJECT", "first")
    assert load_settings().project == "first"
    clean_env.setenv("UPCFAN_WORKER_URL", " http://w:1/ ")
    clean_env.setenv("UPCFAN_LEASE_S", "")  # empty is unset, as before
    s = load_settings()
    assert s.worker_url == "http://w:1" and s.lease_s == 60.0
    clean_env.setenv("UPCFAN_HEARTBEAT_S", "0")  # heartbeats off: a lease then lapses (the worker stack tests)
    assert load_settings().heartbeat_s == 0


@pytest.mark.parametrize("env,expected", [
    ({"UPCFAN_LEASE_S": "abc"}, "UPCFAN_LEASE_S=abc: Input should be a valid number"),
    ({"UPCFAN_ITEM_QUEUE_SHARDS": "-2"}, "UPCFAN_ITEM_QUEUE_SHARDS=-2: Input should be greater than or equal to 1"),
    ({"UPCFAN_MAX_LINES": "0"}, "UPCFAN_MAX_LINES=0: Input should be greater than or equal to 1"),
    ({"UPCFAN_LEASE_S": "30", "UPCFAN_HEARTBEAT_S": "30"}, "UPCFAN_HEARTBEAT_S (30) must be less than UPCFAN_LEASE_S (30)"),
    ({"UPCFAN_HEARTBEAT_S": "-1"}, "UPCFAN_HEARTBEAT_S=-1: Input should be greater than or equal to 0"),
    ({"UPCFAN_STALL_MINUTES": "20", "UPCFAN_STALL_CRITICAL_MINUTES": "10"},
     "UPCFAN_STALL_CRITICAL_MINUTES (10) must be at least UPCFAN_STALL_MINUTES (20)"),
    ({"UPCFAN_DEFAULT_HANDLER": "live"}, "UPCFAN_DEFAULT_HANDLER=live: unknown handler 'live'; known handlers: dry_run"),
    ({"UPCFAN_SMALL_JOB_MAX_LINES": "-1"}, "UPCFAN_SMALL_JOB_MAX_LINES=-1: Input should be greater than or equal to 0"),
    ({"UPCFAN_SMALL_ITEM_QUEUE_NAME": "upcfan-items-2", "UPCFAN_ITEM_QUEUE_SHARDS": "3"},
     "UPCFAN_SMALL_ITEM_QUEUE_NAME (upcfan-items-2) must name a queue of its own"),
    ({"UPCFAN_SMALL_ITEM_QUEUE_NAME": "upcfan-control"}, "UPCFAN_SMALL_ITEM_QUEUE_NAME (upcfan-control) must name a queue"),
])
def test_a_bad_value_fails_naming_the_variable(clean_env, env, expected):
    for key, value in env.items():
        clean_env.setenv(key, value)
    with pytest.raises(SettingsError) as err:
        config.settings()
    assert expected in err.value.message
    assert err.value.code == "bad_settings"


def test_every_bad_variable_is_named_at_once(clean_env):
    clean_env.setenv("UPCFAN_LEASE_S", "abc")
    clean_env.setenv("UPCFAN_ITEM_QUEUE_SHARDS", "x")
    with pytest.raises(SettingsError) as err:
        load_settings()
    assert "UPCFAN_LEASE_S=abc" in err.value.message and "UPCFAN_ITEM_QUEUE_SHARDS=x" in err.value.message
    assert len(err.value.details["problems"]) == 2


def test_a_secret_value_never_appears_in_a_message_or_the_repr(clean_env):
    clean_env.setenv("UPCFAN_MARKETPLACE_API_KEY", "s3cr3t-token")
    clean_env.setenv("UPCFAN_SLACK_WEBHOOK_URL", "https://hooks.example/T/B/s3cr3t")
    clean_env.setenv("UPCFAN_LEASE_S", "abc")
    with pytest.raises(SettingsError) as err:
        load_settings()
    assert "s3cr3t" not in err.value.message
    clean_env.delenv("UPCFAN_LEASE_S")
    s = load_settings()
    assert s.marketplace_api_key == "s3cr3t-token" and "s3cr3t" not in repr(s)


def test_booleans_as_text_keep_the_one_reading():
    assert [parse_bool(v) for v in ("1", " Yes ", "ON", "true", "0", "", "maybe")] == [True] * 4 + [False] * 3


def test_replace_validates_and_settings_are_frozen(clean_env):
    s = load_settings()
    assert s.replace(stall_minutes=5).stall_minutes == 5
    with pytest.raises(Exception, match="greater than 0"):
        s.replace(lease_s=-1)
    with pytest.raises(Exception):
        s.lease_s = 1  # type: ignore[misc]


@pytest.mark.parametrize("name,mode", [(None, "unset"), ("dry_run", "dry_run"), ("marketplace_draft", "live")])
def test_mode_of_dropped_files(clean_env, name, mode):
    if name:
        clean_env.setenv("UPCFAN_DEFAULT_HANDLER", name)
    assert load_settings().mode == mode


def test_lanes_choose_their_queues_and_the_threshold_its_lane(clean_env):
    """Issue 17, item 3: the small lane is one queue, the bulk lane the item queue's shards."""
    clean_env.setenv("UPCFAN_ITEM_QUEUE_SHARDS", "3")
    s = load_settings()
    assert s.small_job_max_lines == config.SMALL_JOB_MAX_LINES
    assert s.lane_queue_path("small").endswith("/queues/upcfan-items-small")
    assert s.lane_queue_path("bulk", 2).endswith("/queues/upcfan-items-2")
    assert (s.lane_for_lines(config.SMALL_JOB_MAX_LINES), s.lane_for_lines(config.SMALL_JOB_MAX_LINES + 1)) == (
        "small", "bulk")
    assert s.replace(small_job_max_lines=0).lane_for_lines(1) == "bulk"
    with pytest.raises(ValueError, match="unknown item lane 'fast'; known lanes: bulk, small"):
        s.lane_queue_path("fast")
