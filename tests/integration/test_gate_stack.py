"""Issue 14, item 3 on the full local stack: every function is private, as deployed (devstack/gate.py);
each local invoker (Cloud Tasks emulator, event bridge = Eventarc, scheduler) sends its own ID token."""

from __future__ import annotations

import json
import uuid

import pytest
import requests

from devstack import identity
from devstack.cloudtasks import client as emu
from devstack.stack import PROJECT
from devstack.testing import operator_headers, poll

pytestmark = pytest.mark.integration
FUNCTION_URLS = ("UPCFAN_API_URL", "UPCFAN_INGEST_URL", "UPCFAN_WORKER_URL", "UPCFAN_SWEEPER_URL")


def sa(account: str) -> str:
    from infra.model import SA_IDS

    return f"{SA_IDS[account]}@{PROJECT}.iam.gserviceaccount.com"


@pytest.mark.parametrize("key", FUNCTION_URLS)
def test_a_request_without_a_token_is_401_at_every_function(stack_env, key):
    for method in ("GET", "POST"):
        r = requests.request(method, stack_env[key] + "/", timeout=30)
        assert r.status_code == 401, (key, method, r.status_code, r.text[:200])


def test_a_caller_without_run_invoker_on_the_service_is_403(stack_env):
    """The Eventarc trigger's account may invoke ingest, not the sweeper."""
    token = identity.mint(sa("eventarc_invoker"), stack_env["UPCFAN_SWEEPER_URL"], ttl_s=600)
    r = requests.post(stack_env["UPCFAN_SWEEPER_URL"] + "/", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert r.status_code == 403, r.text[:200]


def test_the_operator_token_invokes_the_private_api(stack_env):
    r = requests.get(stack_env["UPCFAN_API_URL"] + "/health", headers=operator_headers(stack_env), timeout=30)
    assert r.status_code == 200, r.text


def test_a_task_whose_token_audience_carries_a_path_gets_401_at_the_worker(stack_env, tasks_client):
    """Defect 7: the product set `aud` = task URL (`…/progress`); Cloud Run wants the service URL."""
    from google.cloud import tasks_v2

    queue = stack_env["UPCFAN_CONTROL_QUEUE"]
    task_id = f"gate-aud-path-{uuid.uuid4().hex[:12]}"
    url = stack_env["UPCFAN_WORKER_URL"] + "/progress"
    tasks_client.create_task(parent=queue, task=tasks_v2.Task(
        name=f"{queue}/tasks/{task_id}",
        http_request=tasks_v2.HttpRequest(
            http_method=tasks_v2.HttpMethod.POST, url=url, headers={"Content-Type": "application/json"},
            body=json.dumps({"job_id": f"no-such-job-{task_id}"}).encode(),
            oidc_token=tasks_v2.OidcToken(service_account_email=sa("tasks_invoker"), audience=url))))
    queue_id = queue.rsplit("/", 1)[1]
    try:
        got = poll(lambda: [a for a in emu.attempts(stack_env["CLOUD_TASKS_EMULATOR_HOST"], queue_id, task_id)
                            if isinstance(a.get("status"), int)], 60, 0.2, "the worker's answer to the task")
        assert got[0]["status"] == 401, got[0]
    finally:
        tasks_client.delete_task(name=f"{queue}/tasks/{task_id}")  # it would be retried for an hour


def test_the_product_sets_the_service_url_as_task_audience(stack_env):
    """What shared/tasks.py sets (the service URL without the route) is what the gates accept."""
    from shared.tasks import CHUNK_TASK, ITEM_TASK, PROGRESS_TASK, TaskSpec

    for kind in (ITEM_TASK, CHUNK_TASK, PROGRESS_TASK):
        spec = TaskSpec(task_id="t", kind=kind, payload={})
        assert spec.audience() == stack_env[f"UPCFAN_{kind.function.upper()}_URL"], kind.name


def test_the_event_bridge_reaches_ingest_with_the_eventarc_invokers_token(stack_env, upload, bridge):
    bucket, name, generation = upload(b"036000291452\n", metadata={"upcfan-handler": "dry_run"})
    delivery = poll(lambda: [d for d in bridge.deliveries(name) if d["outcome"] != "pending"], 60, 0.2,
                    "the bridge's delivery")[0]
    assert delivery["outcome"] == "delivered" and 200 <= delivery["attempts"][-1]["status"] < 300, delivery


def test_the_scheduler_runs_the_sweeper_job_with_the_scheduler_invokers_token(stack_env, scheduler):
    job = scheduler.job()
    assert job["uri"] == stack_env["UPCFAN_SWEEPER_URL"] and job["audience"] == job["uri"]
    assert job["invoker"] == sa("scheduler_invoker") and job["schedule"] == "*/5 * * * *"
    assert job["state"] == "PAUSED"  # test stacks: no background sweep perturbs a test
    run = scheduler.run()
    assert run["status"] == 200, run
    assert "findings" in json.loads(run["response"])
    assert scheduler.runs()[-1]["trigger"] == "manual"
