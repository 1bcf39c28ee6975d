"""shared/config.py: one validated settings object; a bad value fails with the variable's name.

Issue 14 item 5 (validated settings): before, `UPCFAN_LEASE_S=abc` surfaced as a bare ValueError deep
in the worker, and negative counts or a heartbeat slower than the lease were taken as given."""

from __future__ import annotations

import pytest

from shared import config
from shared.config import SettingsError, load_settings, parse_bool

VARS = ("GOOGLE_CLOUD_PROJECT", "GCLOUD_PROJECT", "UPCFAN_LEASE_S", "UPCFAN_HEARTBEAT_S", "UPCFAN_ITEM_QUEUE_SHARDS",
        "UPCFAN_DEFAULT_HANDLER", "UPCFAN_WORKER_URL", "UPCFAN_MARKETPLACE_API_KEY", "UPCFAN_MAX_LINES",
        "UPCFAN_STALL_MINUTES", "UPCFAN_STALL_CRITICAL_MINUTES", "UPCFAN_SLACK_WEBHOOK_URL")


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
