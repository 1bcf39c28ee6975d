"""A function started as deploy runs it (functions-framework --source functions/<fn>/main.py --target <fn>)
refuses to start without a setting it requires, naming the variable and the function; with the env
deploy sets it starts and serves.

Issue 14, defect 9: ingest and api started without UPCFAN_DEFAULT_HANDLER and quietly ran every
dropped file as a dry run. Issue 14 item 5: any missing setting surfaced only on the first request."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from devstack.procs import free_port, stop_process
from devstack.testing import poll
from tests.unit.deployed_env import EMULATOR_HOSTS, deployed_env

REPO = Path(__file__).resolve().parents[2]
FF = str(Path(sys.executable).with_name("functions-framework"))


def _env(function: str, drop: tuple[str, ...] = (), **overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in EMULATOR_HOSTS and not k.startswith("UPCFAN_")}
    env.update(deployed_env(function))
    env.update(overrides)
    for var in drop:
        env.pop(var, None)
    env["PYTHONPATH"] = str(REPO)
    return env


def _start(function: str, env: dict[str, str], port: int) -> subprocess.Popen:
    return subprocess.Popen([FF, "--source", str(REPO / "functions" / function / "main.py"), "--target", function,
                             "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("function,drop", [
    ("ingest", ("UPCFAN_DEFAULT_HANDLER",)),
    ("api", ("UPCFAN_DEFAULT_HANDLER",)),
    ("worker", ("UPCFAN_WORKER_URL", "UPCFAN_TASK_SERVICE_ACCOUNT")),
    ("worker", ("UPCFAN_MARKETPLACE_API_KEY",)),
    ("sweeper", ("UPCFAN_SLACK_WEBHOOK_URL",)),
])
def test_a_missing_required_setting_stops_the_start_naming_it(function, drop):
    proc = _start(function, _env(function, drop), free_port())
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        stop_process(proc)  # a no-op once it exited
    assert proc.returncode != 0
    assert f"{function} cannot start: missing" in err
    for var in drop:
        assert var in err
    assert "settings_missing" in out  # the structured CRITICAL line Cloud Logging shows


def test_a_bad_value_stops_the_start_naming_it():
    proc = _start("worker", _env("worker", UPCFAN_LEASE_S="abc"), free_port())
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "worker cannot start: invalid settings: UPCFAN_LEASE_S=abc" in err


def test_the_env_deploy_sets_starts_the_function():
    port = free_port()
    proc = _start("ingest", _env("ingest"), port)

    def answers():
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else "exited"
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
        except urllib.error.HTTPError as exc:
            return exc.code  # 405: GET is refused by the function itself
        except OSError:
            return None
        return 200

    try:
        assert poll(answers, timeout_s=60, what="ingest to answer") == 405
    finally:
        stop_process(proc)
