"""shared/required_settings.py: each function's required settings, and that deploy's env meets them.

Issue 14, defect 9: ingest/api started without UPCFAN_DEFAULT_HANDLER and ran dropped files as a dry
run; item 5: a function missing a setting must fail to start, naming it."""

from __future__ import annotations

import pytest

from deployed_env import deployed_env, environment
from infra import model
from shared.config import SettingsError
from shared.required_settings import FUNCTION_SETTINGS, missing, require_settings


@pytest.mark.parametrize("function", model.FUNCTIONS)
@pytest.mark.parametrize("handler", ["dry_run", "marketplace_draft"])
def test_what_deploy_sets_meets_every_requirement(function, handler):
    with environment(deployed_env(function, default_handler=handler)):
        assert require_settings(function).default_handler == handler


def test_every_function_has_a_row():
    assert set(FUNCTION_SETTINGS) == set(model.FUNCTIONS)


@pytest.mark.parametrize("function", ["ingest", "api"])
def test_ingest_and_api_refuse_to_start_without_the_mode(function):
    env = deployed_env(function)
    del env["UPCFAN_DEFAULT_HANDLER"]
    with environment(env, drop=("UPCFAN_DEFAULT_HANDLER",)), pytest.raises(SettingsError) as err:
        require_settings(function)
    assert err.value.message.startswith(f"{function} cannot start: missing UPCFAN_DEFAULT_HANDLER (the mode of")
    assert err.value.details == {"function": function, "missing": ["UPCFAN_DEFAULT_HANDLER"]}


def test_the_task_service_account_is_required_only_without_the_emulator():
    env = deployed_env("worker")
    del env["UPCFAN_TASK_SERVICE_ACCOUNT"]
    with environment(env, drop=("UPCFAN_TASK_SERVICE_ACCOUNT",)):
        with pytest.raises(SettingsError, match="missing UPCFAN_TASK_SERVICE_ACCOUNT"):
            require_settings("worker")
    with environment({**env, "CLOUD_TASKS_EMULATOR_HOST": "127.0.0.1:1"}, drop=("UPCFAN_TASK_SERVICE_ACCOUNT",)):
        require_settings("worker")


def test_the_marketplace_is_required_of_the_worker_only_when_the_default_is_live():
    from shared.config import load_settings

    env = deployed_env("worker", default_handler="dry_run")
    for var in ("UPCFAN_MARKETPLACE_URL", "UPCFAN_MARKETPLACE_API_KEY"):
        env.pop(var, None)
    drop = ("UPCFAN_MARKETPLACE_URL", "UPCFAN_MARKETPLACE_API_KEY")
    with environment(env, drop=drop):
        require_settings("worker")
    with environment({**env, "UPCFAN_DEFAULT_HANDLER": "marketplace_draft"}, drop=drop):
        gaps = missing(FUNCTION_SETTINGS["worker"], load_settings())
        assert [r.variable for r in gaps] == ["UPCFAN_MARKETPLACE_URL", "UPCFAN_MARKETPLACE_API_KEY"]


def test_a_bad_value_names_the_function_and_the_variable():
    with environment({**deployed_env("sweeper"), "UPCFAN_STALL_MINUTES": "-5"}):
        with pytest.raises(SettingsError, match=r"^sweeper cannot start: invalid settings: UPCFAN_STALL_MINUTES=-5"):
            require_settings("sweeper")
