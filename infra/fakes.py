"""Recording fakes of the official clients, for tests of services that have no emulator.

Each fake keeps "actual state" in memory, answers reads from it, applies creates/updates
(honouring field masks), and records every mutating call as (method, typed request). The
requests are the official clients' own request types, so a recorded call serialises with
`type(req).to_json(req)` (proto-plus) or `json_format.MessageToJson` (raw protobuf).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from google.api_core import exceptions as gexc


def request_json(req: Any) -> Any:
    """A request as plain JSON data: proto-plus `to_json`, protobuf json_format, or a dataclass."""
    if hasattr(type(req), "to_json"):
        return json.loads(type(req).to_json(req))
    if hasattr(req, "DESCRIPTOR"):
        from google.protobuf import json_format

        return json.loads(json_format.MessageToJson(req))
    if dataclasses.is_dataclass(req):
        return dataclasses.asdict(req)
    return req


def _pb(msg):
    return type(msg).pb(msg) if hasattr(type(msg), "pb") else msg


def _merge(stored, new, paths):
    from google.protobuf import field_mask_pb2

    field_mask_pb2.FieldMask(paths=list(paths)).MergeMessage(
        _pb(new), _pb(stored), replace_message_field=True, replace_repeated_field=True
    )


class Recorder:
    def __init__(self):
        self.calls: list[tuple[str, Any]] = []

    def _record(self, method: str, request: Any) -> None:
        self.calls.append((method, request))

    def recorded(self) -> list[dict]:
        return [{"method": m, "type": type(r).__name__, "request": request_json(r)} for m, r in self.calls]


class IamHolder(Recorder):
    """get/set_iam_policy on resources in `self.policy_resources` (others raise NotFound)."""

    def __init__(self, policy_resources=()):
        super().__init__()
        from google.iam.v1 import policy_pb2

        self._policies: dict[str, Any] = {}
        self._versions: dict[str, int] = {}
        self.policy_resources = set(policy_resources)
        self._Policy = policy_pb2.Policy

    def _has_policy(self, resource: str) -> bool:
        return resource in self.policy_resources

    def get_iam_policy(self, request):
        if not self._has_policy(request.resource):
            raise gexc.NotFound(request.resource)
        pol = self._Policy()
        if request.resource in self._policies:
            pol.CopyFrom(self._policies[request.resource])
        pol.etag = f"etag-{self._versions.get(request.resource, 0)}".encode()
        return pol

    def set_iam_policy(self, request):
        if not self._has_policy(request.resource):
            raise gexc.NotFound(request.resource)
        current = f"etag-{self._versions.get(request.resource, 0)}".encode()
        if request.policy.etag and request.policy.etag != current:
            raise gexc.Aborted("etag mismatch")
        self._record("set_iam_policy", request)
        pol = self._Policy()
        pol.CopyFrom(request.policy)
        self._policies[request.resource] = pol
        self._versions[request.resource] = self._versions.get(request.resource, 0) + 1
        return pol

    def members(self, resource: str, role: str) -> list[str]:
        pol = self._policies.get(resource)
        return sorted(m for b in (pol.bindings if pol else []) if b.role == role for m in b.members)


class _Op:
    def __init__(self, value):
        self._value = value

    def result(self, timeout=None):
        return self._value


class FakeTasks(IamHolder):
    def __init__(self):
        super().__init__()
        self.queues: dict[str, Any] = {}

    def _has_policy(self, resource):
        return resource in self.queues

    def get_queue(self, request):
        if request.name not in self.queues:
            raise gexc.NotFound(request.name)
        return self._copy(request.name)

    def _copy(self, name):
        q = self.queues[name]
        return type(q).deserialize(type(q).serialize(q))

    def create_queue(self, request):
        self._record("create_queue", request)
        if request.queue.name in self.queues:
            raise gexc.AlreadyExists(request.queue.name)
        from google.cloud import tasks_v2

        q = type(request.queue).deserialize(type(request.queue).serialize(request.queue))
        q.state = tasks_v2.Queue.State.RUNNING
        self.queues[q.name] = q
        return q

    def update_queue(self, request):
        self._record("update_queue", request)
        _merge(self.queues[request.queue.name], request.queue, request.update_mask.paths)
        return self._copy(request.queue.name)


class FakeScheduler(Recorder):
    def __init__(self):
        super().__init__()
        self.jobs: dict[str, Any] = {}

    def get_job(self, request):
        if request.name not in self.jobs:
            raise gexc.NotFound(request.name)
        j = self.jobs[request.name]
        return type(j).deserialize(type(j).serialize(j))

    def create_job(self, request):
        self._record("create_job", request)
        self.jobs[request.job.name] = type(request.job).deserialize(type(request.job).serialize(request.job))
        return request.job

    def update_job(self, request):
        self._record("update_job", request)
        _merge(self.jobs[request.job.name], request.job, request.update_mask.paths)
        return self.jobs[request.job.name]


class FakeEventarc(Recorder):
    def __init__(self):
        super().__init__()
        self.triggers: dict[str, Any] = {}

    def get_trigger(self, request):
        if request.name not in self.triggers:
            raise gexc.NotFound(request.name)
        t = self.triggers[request.name]
        return type(t).deserialize(type(t).serialize(t))

    def create_trigger(self, request):
        self._record("create_trigger", request)
        t = type(request.trigger).deserialize(type(request.trigger).serialize(request.trigger))
        t.name = f"{request.parent}/triggers/{request.trigger_id}"
        self.triggers[t.name] = t
        return _Op(t)

    def update_trigger(self, request):
        self._record("update_trigger", request)
        _merge(self.triggers[request.trigger.name], request.trigger, request.update_mask.paths)
        return _Op(self.triggers[request.trigger.name])


class FakeSecrets(IamHolder):
    def __init__(self):
        super().__init__()
        self.secrets: dict[str, Any] = {}
        self.values: dict[str, list[bytes]] = {}  # secret name -> enabled version payloads

    def _has_policy(self, resource):
        return resource in self.secrets

    def get_secret(self, request):
        if request.name not in self.secrets:
            raise gexc.NotFound(request.name)
        s = self.secrets[request.name]
        return type(s).deserialize(type(s).serialize(s))

    def create_secret(self, request):
        self._record("create_secret", request)
        s = type(request.secret).deserialize(type(request.secret).serialize(request.secret))
        s.name = f"{request.parent}/secrets/{request.secret_id}"
        self.secrets[s.name] = s
        return s

    def update_secret(self, request):
        self._record("update_secret", request)
        _merge(self.secrets[request.secret.name], request.secret, request.update_mask.paths)
        return self.secrets[request.secret.name]

    def list_secret_versions(self, request):
        if request.parent not in self.secrets:
            raise gexc.NotFound(request.parent)
        assert request.filter == "state:ENABLED"
        return [f"{request.parent}/versions/{i + 1}" for i in range(len(self.values.get(request.parent, [])))]

    def add_secret_version(self, request):
        """Only `python -m infra secrets --secret-file` adds a value (never `apply`). The value is kept
        (tests check it) but never recorded: recorded requests end up in fixtures."""
        if request.parent not in self.secrets:
            raise gexc.NotFound(request.parent)
        self._record("add_secret_version", {"parent": request.parent})
        self.values.setdefault(request.parent, []).append(bytes(request.payload.data))


class FakeFirestoreAdmin(Recorder):
    def __init__(self):
        super().__init__()
        self.indexes: dict[str, list] = {}
        self.fields: dict[str, Any] = {}

    def list_indexes(self, request):
        return list(self.indexes.get(request.parent, []))

    def create_index(self, request):
        from google.cloud import firestore_admin_v1

        self._record("create_index", request)
        ix = type(request.index).deserialize(type(request.index).serialize(request.index))
        n = len(self.indexes.get(request.parent, []))
        ix.name = f"{request.parent}/indexes/ix{n}"
        ix.state = firestore_admin_v1.Index.State.CREATING
        # The server appends __name__ with the direction of the last field.
        last = ix.fields[-1]
        ix.fields.append(firestore_admin_v1.Index.IndexField(field_path="__name__", order=last.order or 1))
        self.indexes.setdefault(request.parent, []).append(ix)
        return _Op(ix)

    def get_field(self, request):
        """A field without an override answers like the API: its config inherited from the
        database's default (`uses_ancestor_config`, ascending, descending and array-contains)."""
        from google.cloud import firestore_admin_v1

        f = self.fields.get(request.name)
        if f is not None:
            return type(f).deserialize(type(f).serialize(f))
        Field, Index = firestore_admin_v1.Field, firestore_admin_v1.Index
        path = request.name.rsplit("/", 1)[-1]
        defaults = [Index(query_scope=Index.QueryScope.COLLECTION, fields=[Index.IndexField(field_path=path, order=o)])
                    for o in (Index.IndexField.Order.ASCENDING, Index.IndexField.Order.DESCENDING)]
        defaults.append(Index(query_scope=Index.QueryScope.COLLECTION, fields=[Index.IndexField(
            field_path=path, array_config=Index.IndexField.ArrayConfig.CONTAINS)]))
        ancestor = request.name.rsplit("/collectionGroups/", 1)[0] + "/collectionGroups/__default__/fields/*"
        return Field(name=request.name, index_config=Field.IndexConfig(
            indexes=defaults, uses_ancestor_config=True, ancestor_field=ancestor))

    def update_field(self, request):
        """Merges the masked parts into the field's stored override (a TTL set earlier stays when
        only the indexes change, as in the API)."""
        from google.cloud import firestore_admin_v1

        self._record("update_field", request)
        f = self.fields.get(request.field.name) or firestore_admin_v1.Field(name=request.field.name)
        _merge(f, request.field, request.update_mask.paths)
        if "ttl_config" in request.update_mask.paths:
            f.ttl_config.state = firestore_admin_v1.Field.TtlConfig.State.CREATING
        if "index_config" in request.update_mask.paths:
            f.index_config.uses_ancestor_config = False
        self.fields[request.field.name] = f
        return _Op(f)


class FakeProjects(IamHolder):
    def _has_policy(self, resource):
        return resource.startswith("projects/")


class FakeBucketIam(IamHolder):
    pass


class FakeRun(IamHolder):
    """Cloud Run services' IAM; a service exists once `deploy(name)` was called."""

    def deploy(self, service_path: str) -> None:
        self.policy_resources.add(service_path)


class FakeIamAdmin(IamHolder):
    def __init__(self):
        super().__init__()
        self.accounts: dict[str, dict] = {}

    def _has_policy(self, resource):
        return resource in self.accounts

    def get_service_account(self, name):
        if name not in self.accounts:
            raise gexc.NotFound(name)
        return dict(self.accounts[name])

    def create_service_account(self, spec):
        self._record("create_service_account", spec)
        self.accounts[spec.name] = {"email": spec.email, "displayName": spec.display_name,
                                    "description": spec.description}
        return dict(self.accounts[spec.name])

    def patch_service_account(self, spec, update_mask):
        self._record("patch_service_account", {"spec": dataclasses.asdict(spec), "update_mask": update_mask})
        self.accounts[spec.name].update({"displayName": spec.display_name, "description": spec.description})
        return dict(self.accounts[spec.name])


class FakeLogMetrics(Recorder):
    """Cloud Logging's MetricsServiceV2: log-based metrics by `projects/P/metrics/ID`."""

    def __init__(self):
        super().__init__()
        self.metrics: dict[str, Any] = {}

    def get_log_metric(self, request):
        if request.metric_name not in self.metrics:
            raise gexc.NotFound(request.metric_name)
        m = self.metrics[request.metric_name]
        return type(m).deserialize(type(m).serialize(m))

    def create_log_metric(self, request):
        self._record("create_log_metric", request)
        name = f"{request.parent}/metrics/{request.metric.name}"
        if name in self.metrics:
            raise gexc.AlreadyExists(name)
        self.metrics[name] = type(request.metric).deserialize(type(request.metric).serialize(request.metric))
        return request.metric

    def update_log_metric(self, request):
        self._record("update_log_metric", request)
        if request.metric_name not in self.metrics:
            raise gexc.NotFound(request.metric_name)
        self.metrics[request.metric_name] = type(request.metric).deserialize(type(request.metric).serialize(request.metric))
        return request.metric


class FakeAlertPolicies(Recorder):
    """Cloud Monitoring's AlertPolicyService: policies get a server-assigned id, found by display name."""

    def __init__(self):
        super().__init__()
        self.policies: dict[str, Any] = {}

    def list_alert_policies(self, request):
        want = request.filter.partition("display_name=")[2].strip('"') if request.filter else None
        return [type(p).deserialize(type(p).serialize(p)) for p in self.policies.values()
                if p.name.startswith(request.name + "/") and (want is None or p.display_name == want)]

    def create_alert_policy(self, request):
        self._record("create_alert_policy", request)
        policy = type(request.alert_policy).deserialize(type(request.alert_policy).serialize(request.alert_policy))
        policy.name = f"{request.name}/alertPolicies/{len(self.policies) + 1}"
        self.policies[policy.name] = policy
        return policy

    def update_alert_policy(self, request):
        self._record("update_alert_policy", request)
        if request.alert_policy.name not in self.policies:
            raise gexc.NotFound(request.alert_policy.name)
        _merge(self.policies[request.alert_policy.name], request.alert_policy, request.update_mask.paths)
        return self.policies[request.alert_policy.name]


def fake_clients(bucket: str = "") -> dict[str, Any]:
    """One fake per client name used by infra.stack (pass as Clients(overrides=...))."""
    buckets = FakeBucketIam({f"projects/_/buckets/{bucket}"} if bucket else ())
    return {
        "tasks": FakeTasks(),
        "scheduler": FakeScheduler(),
        "eventarc": FakeEventarc(),
        "secrets": FakeSecrets(),
        "firestore_admin": FakeFirestoreAdmin(),
        "projects": FakeProjects(),
        "iam": FakeIamAdmin(),
        "run": FakeRun(),
        "storage_iam": buckets,
        "logging_metrics": FakeLogMetrics(),
        "alert_policies": FakeAlertPolicies(),
    }
