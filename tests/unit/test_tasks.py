"""Every task is built with its kind's dispatch deadline and an OIDC audience that is the target
service's URL, never the route under it (issue 14, defects 7 and 8)."""

from __future__ import annotations

import pytest

from shared import config
from shared.config import CONTROL_QUEUE, ITEM_QUEUE, PROGRESS_DISPATCH_DEADLINE_S
from shared.tasks import CHUNK_TASK, ITEM_TASK, PLAN_TASK, PROGRESS_TASK, TASK_KINDS, TaskSpec, _build_task

SA = "upcfan-tasks-invoker@demo-prod.iam.gserviceaccount.com"
QUEUE = "projects/demo-prod/locations/us-central1/queues/upcfan-items"


@pytest.fixture
def prod_settings(monkeypatch):
    """Settings as deploy sets them: gen2 function URLs (with the function's path) and the invoker SA."""
    base = "https://us-central1-demo-prod.cloudfunctions.net"
    monkeypatch.setenv("UPCFAN_WORKER_URL", f"{base}/worker")
    monkeypatch.setenv("UPCFAN_INGEST_URL", f"{base}/ingest/")
    monkeypatch.setenv("UPCFAN_TASK_SERVICE_ACCOUNT", SA)
    config.settings.cache_clear()
    yield base
    config.settings.cache_clear()


@pytest.mark.parametrize(
    "kind, route, service, deadline",
    [
        (ITEM_TASK, "", "worker", ITEM_QUEUE.dispatch_deadline_s),
        (CHUNK_TASK, "/fanout", "ingest", CONTROL_QUEUE.dispatch_deadline_s),
        (PROGRESS_TASK, "/progress", "worker", PROGRESS_DISPATCH_DEADLINE_S),
    ],
)
def test_built_task_has_kind_deadline_and_service_audience(prod_settings, kind, route, service, deadline):
    task = _build_task(QUEUE, TaskSpec(task_id="t-1", kind=kind, payload={"job_id": "j"}))
    service_url = f"{prod_settings}/{service}"
    assert task.http_request.url == service_url + route
    token = task.http_request.oidc_token
    assert token.service_account_email == SA
    assert token.audience == service_url  # not …/fanout or …/progress: Cloud Run checks the service URL
    assert task.dispatch_deadline.total_seconds() == deadline


def test_audience_of_a_run_app_url_and_an_explicit_url_with_query():
    spec = TaskSpec(task_id="t", kind=PROGRESS_TASK, payload={}, url="https://worker-abc-uc.a.run.app/progress?x=1")
    assert spec.audience() == "https://worker-abc-uc.a.run.app"
    spec = TaskSpec(task_id="t", kind=ITEM_TASK, payload={}, url="https://worker-abc-uc.a.run.app/")
    assert spec.audience() == "https://worker-abc-uc.a.run.app"


def test_no_service_account_no_token_but_still_a_deadline(monkeypatch):
    monkeypatch.setenv("UPCFAN_WORKER_URL", "http://127.0.0.1:9")
    monkeypatch.delenv("UPCFAN_TASK_SERVICE_ACCOUNT", raising=False)
    config.settings.cache_clear()
    try:
        task = _build_task(QUEUE, TaskSpec(task_id="t", kind=ITEM_TASK, payload={}))
    finally:
        config.settings.cache_clear()
    assert "oidc_token" not in task.http_request
    assert task.dispatch_deadline.total_seconds() == ITEM_QUEUE.dispatch_deadline_s


def test_a_task_cannot_be_specified_without_its_kind():
    with pytest.raises(TypeError):
        TaskSpec(task_id="t", url="http://127.0.0.1:9", payload={})  # type: ignore[call-arg]


def test_each_kind_takes_its_deadline_from_its_queue_unless_it_calls_another_function():
    assert ITEM_TASK.queue is ITEM_QUEUE and ITEM_TASK.dispatch_deadline_s == ITEM_QUEUE.dispatch_deadline_s
    assert CHUNK_TASK.queue is CONTROL_QUEUE and CHUNK_TASK.dispatch_deadline_s == CONTROL_QUEUE.dispatch_deadline_s
    assert PLAN_TASK.queue is CONTROL_QUEUE and PLAN_TASK.dispatch_deadline_s == CONTROL_QUEUE.dispatch_deadline_s
    # progress checks ride the control queue to the worker: their deadline fits the worker's timeout
    assert PROGRESS_TASK.queue is CONTROL_QUEUE and PROGRESS_TASK.dispatch_deadline_s <= ITEM_QUEUE.dispatch_deadline_s
    assert {k.name for k in TASK_KINDS} == {"item", "plan", "chunk", "progress", "results"}


def _proto_plus_task(queue_path: str, spec: TaskSpec, sa: str):
    """The task built the documented proto-plus way, field by field: what `_build_task` must equal."""
    import datetime as dt
    import json

    from google.cloud import tasks_v2
    from google.protobuf import duration_pb2, timestamp_pb2

    http_request = tasks_v2.HttpRequest(url=spec.url, http_method=tasks_v2.HttpMethod.POST,
                                        headers={"Content-Type": "application/json"},
                                        body=json.dumps(spec.payload, separators=(",", ":")).encode())
    if sa:
        http_request.oidc_token = tasks_v2.OidcToken(service_account_email=sa, audience=spec.audience())
    task = tasks_v2.Task(name=f"{queue_path}/tasks/{spec.task_id}", http_request=http_request)
    if spec.schedule_time is not None:
        ts = timestamp_pb2.Timestamp()
        ts.FromDatetime(spec.schedule_time.astimezone(dt.timezone.utc).replace(tzinfo=None))
        task.schedule_time = ts
    task.dispatch_deadline = duration_pb2.Duration(seconds=spec.kind.dispatch_deadline_s)
    return task


@pytest.mark.parametrize("kind", TASK_KINDS, ids=lambda k: k.name)
@pytest.mark.parametrize("when", [None, "2026-11-30T16:40:05.250+00:00", "2026-11-30T11:40:05-05:00"])
def test_the_built_task_equals_the_proto_plus_construction(prod_settings, kind, when):
    import datetime as dt

    from google.cloud import tasks_v2

    schedule = dt.datetime.fromisoformat(when) if when else None
    spec = TaskSpec(task_id="job-1-t-00012345678905-r1", kind=kind, schedule_time=schedule,
                    payload={"job_id": "job-1", "gtin": "00012345678905", "line": 7, "note": "é"})
    built = _build_task(QUEUE, spec)
    assert isinstance(built, tasks_v2.Task)
    assert tasks_v2.Task.pb(built) == tasks_v2.Task.pb(_proto_plus_task(QUEUE, spec, SA))
