"""infra/: desired state, diff, plan/apply idempotence against recording fakes of the official
clients, and the recorded requests compared with fixtures under tests/unit/fixtures/infra/.

Regenerate fixtures after an intended change with UPCFAN_UPDATE_FIXTURES=1.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from pathlib import Path

import pytest

from infra import cli, model, runner, stack
from infra.clients import Clients
from infra.fakes import fake_clients
from infra.resources.base import BLOCKED, CREATE, NOOP, UPDATE
from infra.sharding import shard_for, shard_queue_name
from shared.config import ITEM_QUEUE

FIXTURES = Path(__file__).parent / "fixtures" / "infra"
PROJECT, REGION, BUCKET = "demo-prod", "us-central1", "upcfan-drop"


def desired(**kw) -> model.Desired:
    return model.Desired(project=PROJECT, region=REGION, bucket=BUCKET, **kw)


def deployed_fakes():
    fakes = fake_clients(BUCKET)
    d = desired()
    for fn in model.FUNCTIONS:
        fakes["run"].deploy(d.run_service_path(fn))
    return fakes


def changes_by_action(changes):
    out = {}
    for c in changes:
        out.setdefault(c.action, []).append(c)
    return out


# ---- sharding ---------------------------------------------------------------------------

def test_shard_for_is_stable_in_range_and_spreads():
    names = [f"{i:04x}-job-0001234567890{i % 10}-r1" for i in range(4000)]
    counts = [0] * 4
    for n in names:
        s = shard_for(n, 4)
        assert 0 <= s < 4 and s == shard_for(n, 4)
        counts[s] += 1
    assert min(counts) > 800  # ~1000 each
    assert shard_for("anything", 1) == 0
    with pytest.raises(ValueError):
        shard_for("x", 0)
    assert [shard_queue_name("upcfan-items", i) for i in range(3)] == ["upcfan-items", "upcfan-items-1", "upcfan-items-2"]


def test_shard_for_agrees_with_the_copy_vendored_into_functions():
    tasks = pytest.importorskip("shared.tasks")
    for i in range(500):
        name = f"{i:04x}-job-{i}-r1"
        for n in (1, 2, 3, 4, 7):
            assert shard_for(name, n) == tasks.shard_for(name, n)


def test_shard_queue_names_match_settings_paths():
    from shared.config import load_settings

    s = load_settings()
    d = desired(item_queue_shards=3)
    names = [q.name for q in d.queue_specs()]
    assert names == ["upcfan-items", "upcfan-items-1", "upcfan-items-2", "upcfan-items-small", "upcfan-control"]
    assert [s.item_queue_path(i).rsplit("/", 1)[1] for i in range(3)] == names[:3]


# ---- desired state ----------------------------------------------------------------------

def test_queue_desired_state_comes_from_config():
    qs = stack.queues(desired(item_queue_shards=2))
    item = qs[0].desired()
    # Unlimited attempts, unlimited duration: the item's retry window in Firestore decides (issue 15).
    assert item["retry_config"] == {"max_attempts": -1, "min_backoff": 1.0,
                                    "max_backoff": 300.0, "max_doublings": 6, "max_retry_duration": 0.0}
    assert item["rate_limits"] == {"max_dispatches_per_second": 500.0, "max_concurrent_dispatches": 1000}
    assert qs[1].name.endswith("/queues/upcfan-items-1") and qs[3].name.endswith("/queues/upcfan-control")
    # The small-jobs lane: the item queue's retry config, its own rate and concurrency (issue 17, item 3).
    small = qs[2].desired()
    assert qs[2].name.endswith("/queues/upcfan-items-small") and small["retry_config"] == item["retry_config"]
    assert small["rate_limits"] == {"max_dispatches_per_second": 100.0, "max_concurrent_dispatches": 200}


def test_from_settings_reads_shards_and_bucket_from_env(monkeypatch):
    monkeypatch.setenv("UPCFAN_ITEM_QUEUE_SHARDS", "4")
    monkeypatch.setenv("UPCFAN_BUCKET", "env-bucket")
    d = model.from_settings("p", "europe-west1")
    assert d.item_queue_shards == 4 and d.bucket == "env-bucket"
    assert model.from_settings("p", "r", bucket="b", item_queue_shards=2).item_queue_shards == 2


def test_no_client_is_created_until_used():
    made = []
    c = Clients(factories={"tasks": lambda: made.append("tasks") or object()})
    assert made == []
    c.get("tasks")
    c.get("tasks")
    assert made == ["tasks"]


# ---- plan / apply -----------------------------------------------------------------------

def test_apply_then_plan_twice_shows_no_change():
    clients = Clients(overrides=deployed_fakes())
    resources = stack.build(desired())
    first = runner.apply(resources, clients)
    assert all(c.action in (CREATE, UPDATE) for c in first), [c.render() for c in first if not c.changed]
    for _ in range(2):
        again = runner.plan(stack.build(desired()), clients)
        assert [c.render() for c in again if c.action != NOOP] == []


def test_changed_retry_setting_plans_exactly_that_update():
    fakes = deployed_fakes()
    clients = Clients(overrides=fakes)
    runner.apply(stack.build(desired()), clients)
    n_calls = len(fakes["tasks"].calls)
    changed_spec = dataclasses.replace(ITEM_QUEUE, retry=dataclasses.replace(ITEM_QUEUE.retry, max_attempts=5))
    d2 = desired(item_queue=changed_spec)
    plan = runner.plan(stack.build(d2), clients)
    moved = [c for c in plan if c.action != NOOP]
    assert len(moved) == 1
    (c,) = moved
    assert c.action == UPDATE and c.resource.name.endswith("/queues/upcfan-items")
    assert c.fields == {"retry_config.max_attempts": (-1, 5)}
    assert "~ retry_config.max_attempts: -1 -> 5" in c.render()
    runner.apply(stack.build(d2), clients)
    method, req = fakes["tasks"].calls[n_calls]
    assert method == "update_queue" and list(req.update_mask.paths) == ["retry_config.max_attempts"]
    assert [c for c in runner.plan(stack.build(d2), clients) if c.action != NOOP] == []


def test_after_deploy_resources_are_blocked_until_functions_exist():
    fakes = fake_clients(BUCKET)
    clients = Clients(overrides=fakes)
    changes = runner.apply(stack.build(desired()), clients)
    blocked = [c.resource.name for c in changes if c.action == BLOCKED]
    assert blocked == [desired().run_service_path(f) for f in ("worker", "ingest", "sweeper")]
    for fn in model.FUNCTIONS:
        fakes["run"].deploy(desired().run_service_path(fn))
    changes = runner.apply(stack.build(desired()), clients)
    assert {c.resource.name for c in changes if c.changed} == set(blocked)


def test_cli_before_deploy_skips_invokers_scheduler_and_eventarc():
    out = io.StringIO()
    cli.main(["plan", "--project", PROJECT, "--region", REGION, "--bucket", BUCKET, "--before-deploy"],
             clients=Clients(overrides=fake_clients(BUCKET)), out=out)
    text = out.getvalue()
    assert "cloudscheduler.job" not in text and "eventarc.trigger" not in text and "/services/" not in text
    assert "cloudtasks.queue" in text
    # On an empty project, policies of things apply creates first are reported as blocked.
    for line in text.splitlines():
        if line.startswith("blocked"):
            assert "does not exist yet" in line


def test_iam_is_additive_and_keeps_foreign_bindings():
    from google.iam.v1 import iam_policy_pb2, policy_pb2

    fakes = deployed_fakes()
    pol = policy_pb2.Policy()
    pol.bindings.add(role="roles/owner", members=["user:alice@example.com"])
    pol.bindings.add(role="roles/datastore.user", members=["user:bob@example.com"])
    fakes["projects"].set_iam_policy(request=iam_policy_pb2.SetIamPolicyRequest(resource=f"projects/{PROJECT}", policy=pol))
    fakes["projects"].calls.clear()
    runner.apply(stack.build(desired()), Clients(overrides=fakes))
    assert fakes["projects"].members(f"projects/{PROJECT}", "roles/owner") == ["user:alice@example.com"]
    ds = fakes["projects"].members(f"projects/{PROJECT}", "roles/datastore.user")
    assert "user:bob@example.com" in ds and len(ds) == 5


def test_least_privilege_bindings():
    fakes = deployed_fakes()
    runner.apply(stack.build(desired(item_queue_shards=2)), Clients(overrides=fakes))
    d = desired(item_queue_shards=2)
    sa = lambda r: f"serviceAccount:{d.sa_email(r)}"  # noqa: E731
    run = fakes["run"]
    assert run.members(d.run_service_path("worker"), "roles/run.invoker") == [sa("tasks_invoker")]
    assert run.members(d.run_service_path("ingest"), "roles/run.invoker") == sorted([sa("tasks_invoker"), sa("eventarc_invoker")])
    assert run.members(d.run_service_path("sweeper"), "roles/run.invoker") == [sa("scheduler_invoker")]
    assert run.members(d.run_service_path("api"), "roles/run.invoker") == []
    tasks = fakes["tasks"]
    for q in ("upcfan-items", "upcfan-items-1"):
        assert tasks.members(f"{d.location_path}/queues/{q}", "roles/cloudtasks.enqueuer") == sorted([sa("ingest"), sa("api")])
    assert sa("worker") in tasks.members(f"{d.location_path}/queues/upcfan-control", "roles/cloudtasks.enqueuer")
    # GetTask (api, re-drive in the item's shard) and GetQueue (api /health) need the viewer role, on
    # every item queue; ingest reads no task (duplicates are decided from item documents).
    for q in ("upcfan-items", "upcfan-items-1"):
        viewers = tasks.members(f"{d.location_path}/queues/{q}", "roles/cloudtasks.viewer")
        assert viewers == [sa("api")]
    assert tasks.members(f"{d.location_path}/queues/upcfan-control", "roles/cloudtasks.viewer") == []
    sec = fakes["secrets"]
    # Every function sends job notes to Slack; only the worker talks to the marketplace.
    assert sec.members(d.secret_path(model.SLACK_SECRET), "roles/secretmanager.secretAccessor") == sorted(
        sa(fn) for fn in model.FUNCTIONS)
    assert sec.members(d.secret_path(model.MARKETPLACE_SECRET), "roles/secretmanager.secretAccessor") == [sa("worker")]
    assert fakes["storage_iam"].members(f"projects/_/buckets/{BUCKET}", "roles/storage.objectViewer") == sorted(
        [sa("ingest"), sa("api")])
    tasks_sa = f"projects/{PROJECT}/serviceAccounts/{d.sa_email('tasks_invoker')}"
    assert sa("ingest") in fakes["iam"].members(tasks_sa, "roles/iam.serviceAccountUser")
    roles = {b.role for b in fakes["projects"]._policies[f"projects/{PROJECT}"].bindings}
    assert roles == {"roles/datastore.user", "roles/eventarc.eventReceiver"}  # nothing broader


def test_scheduler_uses_oidc_with_sweeper_url_audience_and_secret_has_no_value():
    fakes = deployed_fakes()
    runner.apply(stack.build(desired()), Clients(overrides=fakes))
    (job,) = fakes["scheduler"].jobs.values()
    url = desired().function_url("sweeper")
    assert job.http_target.uri == url and job.http_target.oidc_token.audience == url
    assert job.http_target.oidc_token.service_account_email == desired().sa_email("scheduler_invoker")
    assert [m for m, _ in fakes["secrets"].calls if "version" in m] == []
    (trigger,) = fakes["eventarc"].triggers.values()
    assert {(f.attribute, f.value) for f in trigger.event_filters} == {
        ("type", "google.cloud.storage.object.v1.finalized"), ("bucket", BUCKET)}
    assert trigger.destination.cloud_run.service == "ingest"
    assert trigger.service_account == desired().sa_email("eventarc_invoker")


def test_index_file_has_the_indexes_the_architecture_implies():
    data = json.loads((stack.REPO_ROOT / "firestore.indexes.json").read_text())
    got = {(i["collectionGroup"], i["queryScope"], tuple((f["fieldPath"], f["order"]) for f in i["fields"]))
           for i in data["indexes"]}
    A, D = "ASCENDING", "DESCENDING"
    for want in [
        ("jobs", "COLLECTION", (("status", A), ("last_progress_at", A))),
        ("jobs", "COLLECTION", (("status", A), ("created_at", A))),
        ("jobs", "COLLECTION", (("gcs_path", A), ("created_at", D))),
        ("jobs", "COLLECTION", (("status", A), ("created_at", D))),
        ("items", "COLLECTION_GROUP", (("status", A), ("lease_shard", A), ("lease_expires_at", A))),
        ("stall_events", "COLLECTION", (("job_id", A), ("detected_at", A))),
        # queries in the code: api job list with both filters, sweeper's un-notified alert retry
        ("jobs", "COLLECTION", (("status", A), ("gcs_path", A), ("created_at", D))),
        ("stall_events", "COLLECTION", (("notify_state", A), ("detected_at", A))),
    ]:
        assert want in got
    ttl = {(f["collectionGroup"], f["fieldPath"]) for f in data["fieldOverrides"] if f.get("ttl")}
    assert ttl >= {("events", "expire_at"), ("stall_events", "expire_at")}


def test_index_file_has_no_duplicates_and_duplicates_are_rejected(tmp_path):
    from infra.resources.firestore import load_index_file

    indexes, overrides = load_index_file(stack.INDEX_FILE, PROJECT)
    assert len({i.name for i in indexes}) == len(indexes) and len({o.name for o in overrides}) == len(overrides)
    assert sum(o.ttl for o in overrides) == 2
    data = json.loads(stack.INDEX_FILE.read_text())
    data["indexes"].append(data["indexes"][0])
    dup = tmp_path / "firestore.indexes.json"
    dup.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="declared twice"):
        load_index_file(dup, PROJECT)


# ---- Firestore field overrides (exemptions, single-field indexes, TTL) -------------------

def _override_file(tmp_path, overrides) -> Path:
    path = tmp_path / "firestore.indexes.json"
    path.write_text(json.dumps({"indexes": [], "fieldOverrides": overrides}))
    return path


def _field_changes(changes):
    return [c for c in changes if c.resource.kind == "firestore.field"]


def test_field_overrides_apply_exactly_the_file_and_then_plan_clean():
    from google.cloud import firestore_admin_v1

    fakes = deployed_fakes()
    clients = Clients(overrides=fakes)
    resources = stack.build(desired())
    first = _field_changes(runner.plan(resources, clients))
    data = json.loads(stack.INDEX_FILE.read_text())
    assert len(first) == len(data["fieldOverrides"]) and all(c.action == UPDATE for c in first)
    runner.apply(resources, clients)
    admin = fakes["firestore_admin"]
    base = f"projects/{PROJECT}/databases/(default)/collectionGroups"
    field = lambda group, name: admin.fields[f"{base}/{group}/fields/{name}"]  # noqa: E731
    created = field("items", "created_at")
    assert not created.index_config.uses_ancestor_config and list(created.index_config.indexes) == []
    line = field("items", "line")
    (ix,) = line.index_config.indexes
    assert ix.query_scope == firestore_admin_v1.Index.QueryScope.COLLECTION
    assert ix.fields[0].order == firestore_admin_v1.Index.IndexField.Order.ASCENDING
    ttl = field("events", "expire_at")
    assert "ttl_config" in ttl and list(ttl.index_config.indexes) == []
    # idempotent: a second plan changes nothing, a second apply makes no call
    assert [c.render() for c in _field_changes(runner.plan(resources, clients)) if c.action != NOOP] == []
    calls = len(admin.calls)
    runner.apply(resources, clients)
    assert len(admin.calls) == calls


def test_field_override_drift_is_reported_and_only_the_drifted_part_is_sent(tmp_path):
    fakes = deployed_fakes()
    clients = Clients(overrides=fakes)
    path = _override_file(tmp_path, [
        {"collectionGroup": "items", "fieldPath": "updated_at", "indexes": []},
        {"collectionGroup": "events", "fieldPath": "expire_at", "ttl": True, "indexes": []},
    ])
    resources = [r for r in stack.build(desired(), index_file=path) if r.kind == "firestore.field"]
    runner.apply(resources, clients)
    admin = fakes["firestore_admin"]
    # someone re-enables the automatic indexes on updated_at by hand (console: "revert to default")
    from google.cloud import firestore_admin_v1

    name = resources[0].name
    admin.fields.pop(name)
    changes = runner.plan(resources, clients)
    drift = [c for c in changes if c.action != NOOP]
    assert [c.resource.name for c in drift] == [name]
    assert drift[0].fields["indexes"] == ("inherited", [])
    assert "inherited" in drift[0].render()
    before = len(admin.calls)
    runner.apply(resources, clients)
    (method, request), = admin.calls[before:]
    assert method == "update_field" and list(request.update_mask.paths) == ["index_config"]
    assert isinstance(request, firestore_admin_v1.UpdateFieldRequest)
    # the TTL field kept its policy when only its indexes were written, and nothing else was touched
    assert "ttl_config" in admin.fields[resources[1].name]


def test_field_overrides_leave_fields_not_in_the_file_alone(tmp_path):
    fakes = deployed_fakes()
    clients = Clients(overrides=fakes)
    path = _override_file(tmp_path, [{"collectionGroup": "items", "fieldPath": "heartbeat_at", "indexes": []}])
    runner.apply(stack.build(desired(), index_file=path), clients)
    admin = fakes["firestore_admin"]
    touched = {r.field.name for m, r in admin.calls if m == "update_field"}
    assert touched == {f"projects/{PROJECT}/databases/(default)/collectionGroups/items/fields/heartbeat_at"}


def test_field_override_still_in_progress_stops_apply_with_a_specific_message(tmp_path):
    import concurrent.futures

    fakes = deployed_fakes()

    class Slow:
        def result(self, timeout=None):
            raise concurrent.futures.TimeoutError()

    admin = fakes["firestore_admin"]
    real = admin.update_field
    admin.update_field = lambda request: (real(request), Slow())[1]
    path = _override_file(tmp_path, [{"collectionGroup": "items", "fieldPath": "heartbeat_at", "indexes": []}])
    resources = [r for r in stack.build(desired(), index_file=path) if r.kind == "firestore.field"]
    with pytest.raises(RuntimeError, match="items/fields/heartbeat_at .index_config. still in progress after 900 s"):
        runner.apply(resources, Clients(overrides=fakes))


@pytest.mark.parametrize("override, message", [
    ({"collectionGroup": "items", "fieldPath": "x"}, "no \"indexes\" list"),
    ({"collectionGroup": "items", "fieldPath": "x", "indexes": [{"queryScope": "COLLECTION"}]}, "needs order"),
])
def test_bad_field_override_is_refused_with_a_specific_error(tmp_path, override, message):
    from infra.resources.firestore import load_index_file

    with pytest.raises(ValueError, match=message):
        load_index_file(_override_file(tmp_path, [override]), PROJECT)


def test_operations_doc_states_the_shard_arithmetic():
    text = (stack.REPO_ROOT / "docs" / "operations.md").read_text()
    per_queue = int(ITEM_QUEUE.rate.max_dispatches_per_second)
    needed = -(-1_000_000 // 600)
    assert per_queue == 500 and needed == 1667 and -(-needed // per_queue) == 4
    for phrase in ("500 tasks/s per queue", "1,667 dispatches/s", "4 item queues", "computed from the code's operation counts"):
        assert phrase in text


def test_firestore_rules_deny_all():
    text = (stack.REPO_ROOT / "firestore.rules").read_text()
    assert "rules_version = '2'" in text
    assert "match /{document=**}" in text and "allow read, write: if false;" in text
    assert "if true" not in text


# ---- recorded request fixtures ----------------------------------------------------------

def _recorded_apply() -> dict[str, list]:
    fakes = deployed_fakes()
    runner.apply(stack.build(desired(item_queue_shards=2)), Clients(overrides=fakes))
    return {name: fake.recorded() for name, fake in sorted(fakes.items())}


@pytest.mark.parametrize("client_name", ["tasks", "scheduler", "eventarc", "secrets", "firestore_admin",
                                         "projects", "iam", "run", "storage_iam"])
def test_apply_requests_match_fixtures(client_name):
    recorded = _recorded_apply()[client_name]
    path = FIXTURES / f"apply_{client_name}.json"
    if os.environ.get("UPCFAN_UPDATE_FIXTURES") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(recorded, indent=2, sort_keys=True) + "\n")
    assert recorded == json.loads(path.read_text())


def test_fixture_requests_parse_back_into_official_request_types():
    from google.cloud import eventarc_v1, firestore_admin_v1, scheduler_v1, secretmanager_v1, tasks_v2
    from google.iam.v1 import iam_policy_pb2
    from google.protobuf import json_format

    types = {
        "CreateQueueRequest": tasks_v2.CreateQueueRequest,
        "CreateJobRequest": scheduler_v1.CreateJobRequest,
        "CreateTriggerRequest": eventarc_v1.CreateTriggerRequest,
        "CreateSecretRequest": secretmanager_v1.CreateSecretRequest,
        "CreateIndexRequest": firestore_admin_v1.CreateIndexRequest,
        "UpdateFieldRequest": firestore_admin_v1.UpdateFieldRequest,
    }
    seen = set()
    for path in sorted(FIXTURES.glob("apply_*.json")):
        for call in json.loads(path.read_text()):
            t = call["type"]
            if t in types:
                types[t].from_json(json.dumps(call["request"]))
                seen.add(t)
            elif t == "SetIamPolicyRequest":
                json_format.ParseDict(call["request"], iam_policy_pb2.SetIamPolicyRequest())
                seen.add(t)
    assert seen == set(types) | {"SetIamPolicyRequest"}


def test_iam_apply_retries_a_member_that_does_not_exist_yet_then_succeeds():
    from google.api_core import exceptions as gexc

    from infra.fakes import FakeProjects
    from infra.resources.iam import IamBindings

    class Flaky(FakeProjects):
        failures = 1

        def set_iam_policy(self, request):
            if self.failures:
                self.failures -= 1
                raise gexc.BadRequest("Service account x does not exist.")
            return super().set_iam_policy(request)

    fake = Flaky()
    res = IamBindings("projects/p", "projects", [("roles/datastore.user", "serviceAccount:x@p.iam.gserviceaccount.com")])
    res.retry_deadline_s = 5.0
    res.sleep = lambda s: None
    res.apply(fake, res.plan(fake))
    assert fake.members("projects/p", "roles/datastore.user") == ["serviceAccount:x@p.iam.gserviceaccount.com"]
    other = IamBindings("projects/q", "projects", [("roles/x", "user:y@example.com")])

    class Broken(FakeProjects):
        def set_iam_policy(self, request):
            raise gexc.BadRequest("Role roles/x is not supported")

    with pytest.raises(gexc.BadRequest):
        other.apply(Broken(), other.plan(Broken()))


# ---- permissions: every call each function makes is covered by what the model grants ---------

from infra import permissions  # noqa: E402
from infra.model import GRANTS, Grant  # noqa: E402


def test_role_facts_as_google_documents_them():
    # The enqueuer role can create tasks (and see their full view) but not read tasks or queues.
    enq, viewer = permissions.ROLE_PERMISSIONS["roles/cloudtasks.enqueuer"], permissions.ROLE_PERMISSIONS["roles/cloudtasks.viewer"]
    assert enq == {"cloudtasks.tasks.create", "cloudtasks.tasks.fullView"}
    assert {"cloudtasks.tasks.get", "cloudtasks.queues.get"} <= viewer and "cloudtasks.tasks.fullView" not in viewer
    assert permissions.METHOD_PERMISSIONS["cloudtasks.GetTask(FULL)"] == {"cloudtasks.tasks.get", "cloudtasks.tasks.fullView"}
    # every role the model grants has its permissions on record
    assert {g.role for g in GRANTS} <= set(permissions.ROLE_PERMISSIONS)


@pytest.mark.parametrize("shards", [1, 3])
def test_every_call_of_every_function_is_covered_by_its_grants(shards):
    assert permissions.gaps(desired(item_queue_shards=shards)) == []


@pytest.mark.parametrize("removed, expect", [
    # defect 1 (now the api's re-drive GetTask; ingest reads no task since issue 15)
    (("api", "roles/cloudtasks.viewer"), "api (upcfan-api@demo-prod.iam.gserviceaccount.com): "
                                         "cloudtasks.GetTask on projects/demo-prod/locations/us-central1/"
                                         "queues/upcfan-items needs ['cloudtasks.tasks.get']"),
    # defect 3: the api's /health GetQueue
    (("api", "roles/cloudtasks.viewer"), "cloudtasks.GetQueue on projects/demo-prod/locations/us-central1/queues/"
                                         "upcfan-items needs ['cloudtasks.queues.get']"),
    # defect 2: the api plans the file itself
    (("api", "roles/storage.objectViewer"), "storage.objects.get on projects/_/buckets/upcfan-drop"),
    # defect 5: job notes from the worker
    (("worker", "roles/secretmanager.secretAccessor"), "secret:upcfan-slack-webhook"),
])
def test_removing_a_grant_shows_the_gap_it_closed(removed, expect):
    kept = tuple(g for g in GRANTS if (g.account, g.role) != removed)
    found = "\n".join(permissions.gaps(desired(item_queue_shards=2), grants=kept))
    assert expect in found or expect.replace("secret:", "projects/demo-prod/secrets/") in found, found


def test_the_old_enqueuer_only_model_had_the_gaps():
    old = tuple(g for g in GRANTS if g.role != "roles/cloudtasks.viewer"
                and not (g.account == "api" and g.role == "roles/storage.objectViewer"))
    found = permissions.gaps(desired(), grants=old)
    assert any(f.startswith("api ") and "GetTask" in f for f in found)
    assert any(f.startswith("api ") and "GetQueue" in f for f in found)
    assert any(f.startswith("api ") and "storage.objects.get" in f for f in found)


def test_project_grants_cover_every_resource_in_the_project():
    d = desired()
    grants = (Grant("api", "roles/cloudtasks.viewer", "project", "test"),)
    assert permissions.granted_roles(d, "api", d.target_resources("item_queue:0")[0], grants) == {"roles/cloudtasks.viewer"}
    assert permissions.granted_roles(d, "ingest", d.target_resources("item_queue:0")[0], grants) == set()


def test_calls_table_points_at_code_that_exists():
    for fn, calls in permissions.FUNCTION_CALLS.items():
        assert fn in model.FUNCTIONS
        for call in calls:
            assert call.method in permissions.METHOD_PERMISSIONS
            path, _, names = call.where.partition("::")
            src = stack.REPO_ROOT / path.split(" ")[0]
            assert src.exists(), call.where
            for name in names.split(" ")[0:1]:
                if name:
                    assert f"def {name.split('.')[-1]}" in src.read_text(), call.where


def test_every_cloud_tasks_and_storage_method_the_code_calls_is_in_the_table():
    """A new client method in shared/ (e.g. delete_task) fails here until its permission is on record."""
    import re

    known = {"create_task": "cloudtasks.CreateTask", "get_task": "cloudtasks.GetTask(FULL)",
             "get_queue": "cloudtasks.GetQueue", "get_blob": "storage.objects.get",
             "download_as_bytes": "storage.objects.get", "exists": "storage.objects.get",
             "open": "storage.objects.create"}
    seen = set()
    for src in (stack.REPO_ROOT / "shared").rglob("*.py"):
        text = src.read_text()
        seen |= set(re.findall(r"tasks_client\(\)\.(\w+)\(", text))
        if "storage_client()" in text:
            seen |= set(re.findall(r"\b(?:blob|bucket)\.(\w+)\(", text)) | set(re.findall(r"\)\.(get_blob)\(", text))
    seen -= {"blob", "bucket"}  # references, no call
    assert seen - set(known) == set(), f"add these methods to infra/permissions.py: {sorted(seen - set(known))}"
    assert set(known.values()) <= set(permissions.METHOD_PERMISSIONS)


def test_every_function_that_sends_job_notes_mounts_and_may_read_the_slack_secret():
    for fn in model.FUNCTIONS:
        assert (model.SLACK_ENV, model.SLACK_SECRET) in model.FUNCTION_SECRETS[fn]
        assert any(g.account == fn and g.role == "roles/secretmanager.secretAccessor"
                   and g.target == f"secret:{model.SLACK_SECRET}" for g in GRANTS), fn


def test_operations_doc_has_the_generated_table_per_service_account():
    text = (stack.REPO_ROOT / "docs" / "operations.md").read_text()
    assert permissions.docs_tables() in text, "regenerate with: python -c 'from infra.permissions import docs_tables; print(docs_tables())'"
    for sa_id in model.SA_IDS.values():
        assert f"#### `{sa_id}`" in text


# ---- the service-account IAM read (defect 12) ----------------------------------------------

def test_service_account_iam_read_sends_the_policy_version_as_a_query_parameter():
    from google.iam.v1 import iam_policy_pb2

    from infra.clients import IamAdminRest

    class Resp:
        status_code, content, text = 200, b"{}", "{}"

        def json(self):
            return {"version": 1, "etag": "BwU=", "bindings": [{"role": "roles/iam.serviceAccountUser",
                                                                "members": ["serviceAccount:a@p.iam.gserviceaccount.com"]}]}

    class Session:
        def __init__(self):
            self.requests = []

        def request(self, method, url, json=None, params=None, timeout=None):
            self.requests.append({"method": method, "url": url, "json": json, "params": params})
            return Resp()

    session = Session()
    resource = "projects/p/serviceAccounts/a@p.iam.gserviceaccount.com"
    policy = IamAdminRest(session).get_iam_policy(iam_policy_pb2.GetIamPolicyRequest(resource=resource))
    assert session.requests == [{"method": "POST", "url": f"https://iam.googleapis.com/v1/{resource}:getIamPolicy",
                                 "json": None, "params": {"options.requestedPolicyVersion": 3}}]
    assert [b.role for b in policy.bindings] == ["roles/iam.serviceAccountUser"]


# ---- secret values before any function deploy (defect 11) -----------------------------------

def _secrets_cli(fakes, *extra):
    out = io.StringIO()
    rc = cli.main(["secrets", "--project", PROJECT, "--region", REGION, *extra],
                  clients=Clients(overrides=fakes), out=out)
    return rc, out.getvalue()


def test_secrets_check_refuses_naming_each_secret_without_a_value(tmp_path):
    fakes = fake_clients(BUCKET)
    rc, text = _secrets_cli(fakes)
    assert rc == 1 and "does not exist: run `python -m infra apply --before-deploy` first" in text
    runner.apply(stack.build(desired()), Clients(overrides=fakes))  # containers, no values
    rc, text = _secrets_cli(fakes)
    assert rc == 1
    for secret in model.SECRETS:
        assert f"missing: secret {secret} has no value" in text and f"gcloud secrets versions add {secret}" in text
    rc, text = _secrets_cli(fakes, "--functions", "sweeper")  # only what the deployed functions mount
    assert rc == 1 and model.SLACK_SECRET in text and model.MARKETPLACE_SECRET not in text


def test_secrets_check_adds_a_first_value_from_a_file_and_never_prints_it(tmp_path):
    fakes = fake_clients(BUCKET)
    runner.apply(stack.build(desired()), Clients(overrides=fakes))
    slack, key = tmp_path / "slack", tmp_path / "key"
    slack.write_text("https://hooks.example.invalid/T0/B0/SEKRIT\n")
    key.write_text("KEYVALUE")
    rc, text = _secrets_cli(fakes, "--secret-file", f"{model.SLACK_SECRET}={slack}",
                            "--secret-file", f"{model.MARKETPLACE_SECRET}={key}")
    assert rc == 0, text
    assert "SEKRIT" not in text and "KEYVALUE" not in text
    d = desired()
    assert fakes["secrets"].values[d.secret_path(model.SLACK_SECRET)] == [b"https://hooks.example.invalid/T0/B0/SEKRIT"]
    assert "SEKRIT" not in json.dumps(fakes["secrets"].recorded())
    # a second run adds nothing (rotation is an explicit `gcloud secrets versions add`)
    rc, text = _secrets_cli(fakes, "--secret-file", f"{model.SLACK_SECRET}={slack}")
    assert rc == 0 and "--secret-file ignored" in text
    assert len(fakes["secrets"].values[d.secret_path(model.SLACK_SECRET)]) == 1
    with pytest.raises(SystemExit, match="SECRET_ID=PATH"):
        _secrets_cli(fakes, "--secret-file", "not-a-secret=/x")
