"""infra queue resources for real: the official Cloud Tasks client against the project's local
Cloud Tasks emulator (devstack/cloudtasks), started here on a free 127.0.0.1 port.

Acceptance: apply, then plan twice shows no change; a changed retry setting in the desired
state plans exactly that one update, and apply converges again.
"""

from __future__ import annotations

import dataclasses
import io
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("devstack.cloudtasks.server", reason="Cloud Tasks emulator not in this checkout yet")

from devstack.procs import stop_process  # noqa: E402
from infra import cli, model, runner, stack  # noqa: E402
from infra.clients import Clients  # noqa: E402
from infra.resources.base import CREATE, NOOP, UPDATE  # noqa: E402
from shared.clients import make_tasks_client  # noqa: E402
from shared.config import ITEM_QUEUE  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
PROJECT, REGION = "demo-infra", "us-central1"


@pytest.fixture(scope="module")
def emulator_host():
    proc = subprocess.Popen(
        [sys.executable, "-m", "devstack.cloudtasks", "--host", "127.0.0.1", "--port", "0", "--log-level", "WARNING"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(l) for l in proc.stdout], daemon=True).start()
    deadline = time.monotonic() + 30
    host = None
    seen = []
    while host is None:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or proc.poll() is not None:
            proc.kill()
            pytest.fail(f"emulator did not become ready: {''.join(seen)[-2000:]}")
        try:
            line = lines.get(timeout=min(remaining, 1.0))
        except queue.Empty:
            continue
        seen.append(line)
        if line.startswith("CLOUDTASKS_EMULATOR_READY"):
            host = line.split()[1].removeprefix("http://")
    yield host
    stop_process(proc)


@pytest.fixture()
def clients(emulator_host):
    return Clients(overrides={"tasks": make_tasks_client(emulator_host)})


def _desired(project: str, **kw) -> model.Desired:
    return model.Desired(project=project, region=REGION, **kw)


def _non_noop(changes):
    return [c.render() for c in changes if c.action != NOOP]


def test_apply_then_plan_twice_is_a_no_op(clients):
    d = _desired(PROJECT + "-a", item_queue_shards=3)
    first = runner.apply(stack.queues(d), clients)
    assert [c.action for c in first] == [CREATE] * 5  # 3 item shards, the small-jobs queue, control
    for _ in range(2):
        assert _non_noop(runner.plan(stack.queues(d), clients)) == []
    # what the emulator holds is what config says
    from google.cloud import tasks_v2

    q = clients.get("tasks").get_queue(request=tasks_v2.GetQueueRequest(name=f"{d.location_path}/queues/upcfan-items-2"))
    assert q.retry_config.max_attempts == ITEM_QUEUE.retry.max_attempts
    assert q.rate_limits.max_dispatches_per_second == ITEM_QUEUE.rate.max_dispatches_per_second
    assert q.rate_limits.max_concurrent_dispatches == ITEM_QUEUE.rate.max_concurrent_dispatches


def test_changed_retry_setting_plans_exactly_that_update(clients):
    d = _desired(PROJECT + "-b")
    runner.apply(stack.queues(d), clients)
    spec = dataclasses.replace(ITEM_QUEUE, retry=dataclasses.replace(ITEM_QUEUE.retry, max_backoff_s=90.0))
    d2 = d.with_changes(item_queue=spec)
    plan = runner.plan(stack.queues(d2), clients)
    moved = [c for c in plan if c.action != NOOP]
    assert len(moved) == 1 and moved[0].action == UPDATE
    assert moved[0].resource.name.endswith("/queues/upcfan-items")
    assert moved[0].fields == {"retry_config.max_backoff": (ITEM_QUEUE.retry.max_backoff_s, 90.0)}
    runner.apply(stack.queues(d2), clients)
    assert _non_noop(runner.plan(stack.queues(d2), clients)) == []
    # the other retry fields were not touched by the masked update
    from google.cloud import tasks_v2

    q = clients.get("tasks").get_queue(request=tasks_v2.GetQueueRequest(name=f"{d.location_path}/queues/upcfan-items"))
    assert q.retry_config.max_attempts == ITEM_QUEUE.retry.max_attempts
    assert q.retry_config.max_backoff.total_seconds() == 90.0


def test_cli_apply_and_plan_queues_only(clients):
    argv = ["--project", PROJECT + "-c", "--region", REGION, "--item-queue-shards", "2", "--only", "cloudtasks.queue"]
    out = io.StringIO()
    cli.main(["apply", *argv], clients=clients, out=out)
    assert "Applied: 4 to create, 0 to update, 0 unchanged" in out.getvalue()
    for _ in range(2):
        out = io.StringIO()
        cli.main(["plan", *argv], clients=clients, out=out)
        assert out.getvalue().strip().splitlines()[-1] == "Plan: 0 to create, 0 to update, 4 unchanged"


def test_paused_queue_stays_paused(clients):
    from google.cloud import tasks_v2

    d = _desired(PROJECT + "-d")
    runner.apply(stack.queues(d), clients)
    name = f"{d.location_path}/queues/upcfan-control"
    clients.get("tasks").pause_queue(request=tasks_v2.PauseQueueRequest(name=name))
    changes = runner.apply(stack.queues(d), clients)
    assert _non_noop(changes) == []
    assert any("PAUSED" in c.note for c in changes)
    q = clients.get("tasks").get_queue(request=tasks_v2.GetQueueRequest(name=name))
    assert q.state == tasks_v2.Queue.State.PAUSED
