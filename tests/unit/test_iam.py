"""devstack/iam.py (the local IAM policy from the production model) and its enforcement in the Cloud
Tasks emulator: each test names the defect of issue 14 it would have caught."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp.test_utils import TestClient, TestServer

from devstack import iam, identity
from devstack.cloudtasks.emulator import Emulator
from devstack.cloudtasks.server import make_app
from infra import model

LOCATION = "us-central1"


@pytest.fixture(scope="module")
def policy() -> iam.Policy:
    return iam.local_policy(LOCATION, env={})


def sa(policy, account: str) -> str:
    return policy.desired.sa_email(account)


def queue(policy) -> str:
    """The first item queue."""
    return policy.desired.target_resources("item_queue:0")[0]


def test_ingest_may_enqueue_item_tasks_but_not_read_them(policy):
    """Issue 15: ingest decides duplicates from item documents, not by reading tasks (GetTask), so it
    holds only the enqueuer role on the item queues, which lacks cloudtasks.tasks.get."""
    assert policy.check(sa(policy, "ingest"), "cloudtasks.CreateTask", queue(policy)).allowed
    d = policy.check(sa(policy, "ingest"), "cloudtasks.GetTask(FULL)", queue(policy))
    assert not d.allowed and d.missing == ("cloudtasks.tasks.get",)


def test_without_the_viewer_grant_api_is_denied_tasks_get(policy):
    """Defect 1: the enqueuer role alone lacks cloudtasks.tasks.get."""
    dropped = iam.parse_dropped("api:roles/cloudtasks.viewer:item_queues")
    p = iam.Policy(policy.desired, dropped=dropped)
    d = p.check(sa(p, "api"), "cloudtasks.GetTask(FULL)", queue(p))
    assert not d.allowed and d.missing == ("cloudtasks.tasks.get",)
    assert p.check(sa(p, "api"), "cloudtasks.CreateTask", queue(p)).allowed
    assert p.dropped == ("api:roles/cloudtasks.viewer:item_queues",)
    assert policy.check(sa(policy, "api"), "cloudtasks.GetTask(FULL)", queue(policy)).role == (
        "roles/cloudtasks.enqueuer+roles/cloudtasks.viewer")


def test_api_may_read_the_bucket_only_with_its_grant(policy):
    """Defect 2 (POST /api/batch/process cannot read the bucket)."""
    bucket = policy.desired.bucket_path()
    assert policy.check(sa(policy, "api"), "storage.objects.get", bucket).role == "roles/storage.objectViewer"
    p = iam.Policy(policy.desired, dropped=iam.parse_dropped("api:roles/storage.objectViewer:bucket"))
    assert p.check(sa(p, "api"), "storage.objects.get", bucket).missing == ("storage.objects.get",)


def test_health_get_queue_only_on_the_first_item_queue(policy):
    """Defect 3 (/health always 503): GetQueue needs queues.get on the first item queue."""
    d = policy.desired
    first, control = d.target_resources("item_queue:0")[0], d.target_resources("control_queue")[0]
    assert policy.check(sa(policy, "api"), "cloudtasks.GetQueue", first).allowed
    assert not policy.check(sa(policy, "api"), "cloudtasks.GetQueue", control).allowed
    assert not policy.check(sa(policy, "worker"), "cloudtasks.GetQueue", first).allowed
    # /health also checks the small-jobs lane (issue 17, item 3); the api's viewer grant covers it.
    small = d.target_resources("small_item_queue")[0]
    assert small.endswith("/queues/upcfan-items-small")
    assert policy.check(sa(policy, "api"), "cloudtasks.GetQueue", small).allowed


def test_api_may_read_item_tasks_in_every_shard_for_redrive(policy):
    """Issue 15 (re-drive): the api checks with GetTask (BASIC) whether an open item's task still exists,
    in whichever item queue shard the task's name hashes to; it may still not read the control queue."""
    d = policy.desired
    for q in d.target_resources("item_queues"):
        decision = policy.check(sa(policy, "api"), "cloudtasks.GetTask", q)
        assert decision.allowed and decision.role == "roles/cloudtasks.viewer", q
        assert policy.check(sa(policy, "api"), "cloudtasks.CreateTask", q).allowed
    assert not policy.check(sa(policy, "api"), "cloudtasks.GetTask", d.target_resources("control_queue")[0]).allowed
    p = iam.Policy(d, dropped=iam.parse_dropped("api:roles/cloudtasks.viewer:item_queues"))
    assert p.check(sa(p, "api"), "cloudtasks.GetTask", queue(p)).missing == ("cloudtasks.tasks.get",)


def test_act_as_the_tasks_invoker(policy):
    """CreateTask with an OIDC token needs iam.serviceAccounts.actAs on that account (Cloud Tasks docs)."""
    invoker = policy.desired.sa_path("tasks_invoker")
    assert policy.check(sa(policy, "worker"), "iam.actAs(oidc_token)", invoker).role == "roles/iam.serviceAccountUser"
    assert not policy.check(sa(policy, "sweeper"), "iam.actAs(oidc_token)", invoker).allowed
    other = policy.desired.sa_path("scheduler_invoker")
    assert not policy.check(sa(policy, "worker"), "iam.actAs(oidc_token)", other).allowed


def test_project_grants_are_inherited_by_every_resource(policy):
    """IAM inheritance: a project-level grant covers resources the model never names."""
    p = iam.Policy(policy.desired, grants=(*model.GRANTS, model.Grant("sweeper", "roles/cloudtasks.viewer",
                                                                      "project", "test")))
    assert p.check(sa(p, "sweeper"), "cloudtasks.GetQueue", queue(p)).role == "roles/cloudtasks.viewer"
    elsewhere = f"{p.desired.location_path}/queues/made-by-a-test"
    assert p.check(sa(p, "sweeper"), "cloudtasks.ListTasks", elsewhere).allowed
    assert not policy.check(sa(policy, "sweeper"), "cloudtasks.ListTasks", elsewhere).allowed


def test_operator_holds_every_permission_and_strangers_none(policy):
    for method in ("cloudtasks.CreateQueue", "cloudtasks.PurgeQueue", "storage.buckets.create"):
        d = policy.check(identity.OPERATOR_EMAIL, method, "projects/anything")
        assert d.allowed and d.role == iam.OPERATOR_ROLE
    assert not policy.check("someone@example.com", "cloudtasks.GetQueue", queue(policy)).allowed
    assert policy.account(identity.OPERATOR_EMAIL) == "operator" and policy.account(sa(policy, "api")) == "api"


def test_unknown_grant_or_method_is_a_clear_error(policy):
    with pytest.raises(ValueError, match="not a grant of infra.model.GRANTS"):
        iam.parse_dropped("ingest:roles/owner:project")
    with pytest.raises(KeyError, match="METHOD_PERMISSIONS"):
        policy.check(identity.OPERATOR_EMAIL, "cloudtasks.Teleport", "x")


def test_token_cache_parses_each_token_once():
    clock = [0.0]
    cache = iam.TokenCache(ttl_s=60, clock=lambda: clock[0])
    tok = identity.mint("a@b.c")
    for _ in range(1000):
        assert cache.principal(f"Bearer {tok}").email == "a@b.c"
    assert cache.parses == 1
    clock[0] = 61
    cache.principal(f"Bearer {tok}")
    assert cache.parses == 2
    for bad in (None, "Basic x", "Bearer not-a-jwt"):
        with pytest.raises(identity.TokenError):
            cache.principal(bad)
    expired = identity.mint("a@b.c", ttl_s=-10)
    with pytest.raises(identity.TokenError, match="expired"):
        cache.principal(f"Bearer {expired}")


def test_call_log_counts_per_kind_and_flushes_new_kinds_at_once(tmp_path, policy):
    clock = [100.0]
    log = iam.CallLog(tmp_path, "unit", policy, flush_interval_s=1.0, clock=lambda: clock[0])
    allow = iam.Decision(True, "roles/cloudtasks.enqueuer")
    for _ in range(5000):
        log.record("w@x", "cloudtasks.CreateTask", "q", allow)
    assert json.loads(log.path.read_text())["count"] == 1  # written once, at the first call
    log.record("w@x", "cloudtasks.GetQueue", "q", iam.Decision(False, "", ("cloudtasks.queues.get",)))
    lines = [json.loads(s) for s in log.path.read_text().splitlines()]
    assert {(line["method"], line["count"], line["allowed"]) for line in lines} == {
        ("cloudtasks.CreateTask", 5000, True), ("cloudtasks.GetQueue", 1, False)}
    log.close()
    assert sum(line["count"] for line in iam.read_call_log(tmp_path)) == 5001


# ---------------------------------------------------------------- the emulator, enforced


async def _emulator_call(policy, tmp_path, method: str, path: str, token: str | None, body=None):
    emu = Emulator()
    enforcer = iam.Enforcer(policy, iam.CallLog(tmp_path, "cloudtasks", policy))
    app = make_app(emu, enforcer)
    async with TestClient(TestServer(app)) as client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        op = {"Authorization": f"Bearer {identity.mint(identity.OPERATOR_EMAIL)}"}
        parent = policy.desired.location_path
        for q in policy.desired.queue_specs():
            r = await client.post(f"/v2/{parent}/queues", json={"name": f"{parent}/queues/{q.name}"}, headers=op)
            assert r.status == 200, await r.text()
        resp = await client.request(method, f"/v2/{path}", json=body, headers=headers)
        return resp.status, await resp.json()


def run(coro):
    return asyncio.run(coro)


def test_emulator_refuses_a_call_without_a_token_with_401(policy, tmp_path):
    status, body = run(_emulator_call(policy, tmp_path, "GET", queue(policy), None))
    assert status == 401 and body["error"]["status"] == "UNAUTHENTICATED"
    status, body = run(_emulator_call(policy, tmp_path, "GET", queue(policy), "garbage"))
    assert status == 401 and "invalid authentication credentials" in body["error"]["message"]


def test_emulator_denies_get_task_without_tasks_get_as_google_does(policy, tmp_path):
    """Defect 1: GetTask by the api without the viewer grant (and by ingest, which has none) -> 403
    with Google's message."""
    p = iam.Policy(policy.desired, dropped=iam.parse_dropped("api:roles/cloudtasks.viewer:item_queues"))
    q = queue(p)
    status, body = run(_emulator_call(p, tmp_path, "GET", f"{q}/tasks/t1", identity.mint(sa(p, "api"))))
    assert status == 403 and body["error"]["status"] == "PERMISSION_DENIED"
    assert body["error"]["message"] == (f'The principal (user or service account) lacks IAM permission '
                                        f'"cloudtasks.tasks.get" for the resource "{q}" (or the resource may not exist).')
    status, _ = run(_emulator_call(policy, tmp_path, "GET", f"{q}/tasks/t1?responseView=FULL",
                                   identity.mint(sa(policy, "ingest"))))
    assert status == 403
    # with the model's grants the api's call passes the gate (and finds no such task)
    status, body = run(_emulator_call(policy, tmp_path, "GET", f"{q}/tasks/t1", identity.mint(sa(policy, "api"))))
    assert status == 404
    denied = [line for line in iam.read_call_log(tmp_path) if not line["allowed"]]
    assert {(line["account"], line["method"]) for line in denied} >= {("api", "cloudtasks.GetTask"),
                                                                     ("ingest", "cloudtasks.GetTask(FULL)")}


def test_emulator_create_task_with_oidc_needs_act_as(policy, tmp_path):
    task = {"task": {"name": "", "httpRequest": {"url": "http://127.0.0.1:9/x", "httpMethod": "POST",
                                                 "oidcToken": {"serviceAccountEmail": sa(policy, "tasks_invoker")}}}}
    control = policy.desired.target_resources("control_queue")[0]
    status, _ = run(_emulator_call(policy, tmp_path, "POST", f"{control}/tasks", identity.mint(sa(policy, "worker")), task))
    assert status == 200
    p = iam.Policy(policy.desired, dropped=iam.parse_dropped(
        "worker:roles/iam.serviceAccountUser:sa:tasks_invoker"))
    status, body = run(_emulator_call(p, tmp_path, "POST", f"{control}/tasks", identity.mint(sa(p, "worker")), task))
    assert status == 403 and '"iam.serviceAccounts.actAs"' in body["error"]["message"]
    assert p.desired.sa_path("tasks_invoker") in body["error"]["message"]


def test_emulator_health_get_queue_by_api(policy, tmp_path):
    """Defect 3: /health's GetQueue as upcfan-api on the first item queue."""
    status, _ = run(_emulator_call(policy, tmp_path, "GET", queue(policy), identity.mint(sa(policy, "api"))))
    assert status == 200
    p = iam.Policy(policy.desired, dropped=iam.parse_dropped("api:roles/cloudtasks.viewer:item_queues"))
    status, body = run(_emulator_call(p, tmp_path, "GET", queue(p), identity.mint(sa(p, "api"))))
    assert status == 403 and '"cloudtasks.queues.get"' in body["error"]["message"]


def test_standalone_emulator_is_open():
    async def go():
        async with TestClient(TestServer(make_app(Emulator()))) as client:
            r = await client.get("/v2/projects/p/locations/l/queues")
            return r.status
    assert run(go()) == 200


# ---------------------------------------------------------------- the GCS gate

from devstack import gcs_gate  # noqa: E402


@pytest.mark.parametrize("method,path,expected", [
    ("GET", "/storage/v1/b/upcfan-uploads/o/a%2Fb.csv", [("storage.objects.get", "projects/_/buckets/upcfan-uploads")]),
    ("GET", "/download/storage/v1/b/bk/o/a%2Fb.csv", [("storage.objects.get", "projects/_/buckets/bk")]),
    ("GET", "/storage/v1/b/bk/o", [("storage.objects.list", "projects/_/buckets/bk")]),
    ("POST", "/upload/storage/v1/b/bk/o", [("storage.objects.create", "projects/_/buckets/bk")]),
    ("DELETE", "/storage/v1/b/bk/o/x", [("storage.objects.delete", "projects/_/buckets/bk")]),
    ("PATCH", "/storage/v1/b/bk/o/x", [("storage.objects.update", "projects/_/buckets/bk")]),
    ("POST", "/storage/v1/b", [("storage.buckets.create", "projects/demo-upcfan")]),
    ("GET", "/storage/v1/b/bk", [("storage.buckets.get", "projects/_/buckets/bk")]),
    ("POST", "/storage/v1/b/src/o/x/rewriteTo/b/dst/o/y", [("storage.objects.get", "projects/_/buckets/src"),
                                                           ("storage.objects.create", "projects/_/buckets/dst")]),
])
def test_gate_classifies_json_api_calls(method, path, expected):
    assert gcs_gate.classify(method, path, {}, "demo-upcfan") == expected


def test_gate_resumable_upload_needs_a_known_session():
    assert gcs_gate.upload_id("http://h/upload/storage/v1/b/bk/o?uploadType=resumable&upload_id=abc") == "abc"
    assert gcs_gate.upload_id("http://h/upload/resumable/xyz") == "xyz"
    assert gcs_gate.classify("PUT", "/upload/resumable/xyz", {}, "p", {"xyz": "bk"}) == [
        ("storage.objects.create", "projects/_/buckets/bk")]
    with pytest.raises(gcs_gate.Unclassified):
        gcs_gate.classify("PUT", "/upload/resumable/nope", {}, "p", {})
    with pytest.raises(gcs_gate.Unclassified):
        gcs_gate.classify("POST", "/batch/storage/v1", {}, "p")


async def _through_gate(policy, tmp_path, method, path, token, data=b""):
    from aiohttp import web

    seen = []

    async def upstream(request):
        seen.append((request.method, request.raw_path, await request.read(), request.headers.get("Authorization")))
        return web.Response(body=b"x" * 300_000, headers={"X-Upstream": "1"})

    up_app = web.Application()
    up_app.router.add_route("*", "/{tail:.*}", upstream)
    async with TestServer(up_app) as up_server:
        enforcer = iam.Enforcer(policy, iam.CallLog(tmp_path, "gcs_gate", policy))
        async with TestClient(TestServer(gcs_gate.make_app(str(up_server.make_url("/")), enforcer))) as client:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            resp = await client.request(method, path, data=data, headers=headers)
            body = await resp.read()
            return resp.status, body, resp.headers, seen


def test_gate_proxies_an_allowed_call_and_streams_the_body(policy, tmp_path):
    """Defect 2 (the api reading the bucket): allowed with the model's storage.objectViewer grant."""
    path = f"/storage/v1/b/{policy.desired.bucket}/o/in%2Ffile.txt?alt=media"
    status, body, headers, seen = run(_through_gate(policy, tmp_path, "GET", path, identity.mint(sa(policy, "api"))))
    assert status == 200 and len(body) == 300_000 and headers["X-Upstream"] == "1"
    assert seen[0][1] == path  # the encoded path reaches fake-gcs-server unchanged
    status, _, _, seen = run(_through_gate(policy, tmp_path, "POST", "/upload/storage/v1/b/x/o?uploadType=media",
                                           identity.mint(identity.OPERATOR_EMAIL), data=b"a" * 70_000))
    assert status == 200 and len(seen[0][2]) == 70_000


def test_gate_denies_as_cloud_storage_does(policy, tmp_path):
    """Defect 2: without storage.objectViewer the api gets Cloud Storage's 403 body."""
    p = iam.Policy(policy.desired, dropped=iam.parse_dropped("api:roles/storage.objectViewer:bucket"))
    path = f"/storage/v1/b/{p.desired.bucket}/o/f.txt"
    status, body, _, seen = run(_through_gate(p, tmp_path, "GET", path, identity.mint(sa(p, "api"))))
    err = json.loads(body)["error"]
    assert status == 403 and not seen
    assert err["message"] == (f"{sa(p, 'api')} does not have storage.objects.get access to the Google Cloud Storage "
                              "object. Permission 'storage.objects.get' denied on resource (or it may not exist).")
    assert err["errors"][0]["reason"] == "forbidden"
    # the worker has no storage grant at all; writes are nobody's but the operator's
    assert run(_through_gate(policy, tmp_path, "GET", path, identity.mint(sa(policy, "worker"))))[0] == 403
    assert run(_through_gate(policy, tmp_path, "DELETE", path, identity.mint(sa(policy, "ingest"))))[0] == 403
    status, body, _, _ = run(_through_gate(policy, tmp_path, "GET", path, None))
    assert status == 401 and json.loads(body)["error"]["message"].startswith("Anonymous caller does not have")
    assert run(_through_gate(policy, tmp_path, "GET", path, "junk"))[0] == 401
    assert run(_through_gate(policy, tmp_path, "POST", "/batch/storage/v1", identity.mint(sa(policy, "api"))))[0] == 403
