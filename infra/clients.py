"""Lazily created, injectable API clients.

`Clients(project, overrides={...})` hands each resource the client named by its
`client_name`. Nothing is created at import or construction; the first `get(name)` builds
the official client with production default credentials. Tests pass fakes in `overrides`
(and the queue test passes an official Cloud Tasks client pointed at the emulator).

Service accounts, their IAM policies and Cloud Run service IAM have no official Python
client among the project's pinned dependencies (google-cloud-iam / google-cloud-run are not
installed), so two small REST adapters below speak the same typed request/response
messages (`google.iam.v1` protobufs) as the gapic clients' get_iam_policy / set_iam_policy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


def _tasks():
    from google.cloud import tasks_v2

    return tasks_v2.CloudTasksClient()


def _scheduler():
    from google.cloud import scheduler_v1

    return scheduler_v1.CloudSchedulerClient()


def _eventarc():
    from google.cloud import eventarc_v1

    return eventarc_v1.EventarcClient()


def _secrets():
    from google.cloud import secretmanager_v1

    return secretmanager_v1.SecretManagerServiceClient()


def _firestore_admin():
    from google.cloud import firestore_admin_v1

    return firestore_admin_v1.FirestoreAdminClient()


def _projects():
    from google.cloud import resourcemanager_v3

    return resourcemanager_v3.ProjectsClient()


def _logging_metrics():
    from google.cloud import logging_v2

    return logging_v2.services.metrics_service_v2.MetricsServiceV2Client()


def _alert_policies():
    from google.cloud import monitoring_v3

    return monitoring_v3.AlertPolicyServiceClient()


FACTORIES: dict[str, Callable[[], Any]] = {
    "tasks": _tasks,
    "scheduler": _scheduler,
    "eventarc": _eventarc,
    "secrets": _secrets,
    "firestore_admin": _firestore_admin,
    "projects": _projects,
    "logging_metrics": _logging_metrics,
    "alert_policies": _alert_policies,
    "iam": lambda: IamAdminRest(),
    "run": lambda: RunServicesRest(),
    "storage_iam": lambda: BucketIam(),
}


class Clients:
    def __init__(self, overrides: dict[str, Any] | None = None, factories: dict[str, Callable[[], Any]] | None = None):
        self._made: dict[str, Any] = dict(overrides or {})
        self._factories = dict(FACTORIES, **(factories or {}))

    def get(self, name: str):
        if name not in self._made:
            self._made[name] = self._factories[name]()
        return self._made[name]


# ---- REST adapters (production only; tests inject fakes) -------------------------------

def _policy_from_json(data: dict):
    from google.iam.v1 import policy_pb2
    from google.protobuf import json_format

    return json_format.ParseDict(data, policy_pb2.Policy(), ignore_unknown_fields=True)


def _policy_to_json(policy) -> dict:
    from google.protobuf import json_format

    return json_format.MessageToDict(policy)


def _raise_for(resp) -> None:
    from google.api_core import exceptions as gexc

    if resp.status_code >= 400:
        raise gexc.from_http_status(resp.status_code, resp.text[:500])


class _Rest:
    base = ""

    def __init__(self, session=None):
        self._session = session

    @property
    def session(self):
        if self._session is None:
            import google.auth
            from google.auth.transport.requests import AuthorizedSession

            creds, _ = google.auth.default(scopes=["https://www.googleapis.com/auth/cloud-platform"])
            self._session = AuthorizedSession(creds)
        return self._session

    def _call(self, method: str, path: str, body: dict | None = None, params: dict | None = None) -> dict:
        resp = self.session.request(method, f"{self.base}/{path}", json=body, params=params, timeout=60)
        _raise_for(resp)
        return resp.json() if resp.content else {}


@dataclass
class ServiceAccountSpec:
    """A service account as this tool manages it (IAM admin v1 `ServiceAccount` subset)."""

    project: str
    account_id: str
    display_name: str
    description: str = ""

    @property
    def email(self) -> str:
        return f"{self.account_id}@{self.project}.iam.gserviceaccount.com"

    @property
    def name(self) -> str:
        return f"projects/{self.project}/serviceAccounts/{self.email}"


class IamAdminRest(_Rest):
    """iam.googleapis.com v1: service accounts and their IAM policies."""

    base = "https://iam.googleapis.com/v1"

    def get_service_account(self, name: str) -> dict:
        return self._call("GET", name)

    def create_service_account(self, spec: ServiceAccountSpec) -> dict:
        return self._call(
            "POST",
            f"projects/{spec.project}/serviceAccounts",
            {"accountId": spec.account_id,
             "serviceAccount": {"displayName": spec.display_name, "description": spec.description}},
        )

    def patch_service_account(self, spec: ServiceAccountSpec, update_mask: list[str]) -> dict:
        return self._call(
            "PATCH",
            spec.name,
            {"serviceAccount": {"displayName": spec.display_name, "description": spec.description},
             "updateMask": ",".join(update_mask)},
        )

    def get_iam_policy(self, request):
        # POST with an empty body: the requested policy version is a query parameter
        # (`options.requestedPolicyVersion`), as for Cloud Run below, not a body field.
        return _policy_from_json(
            self._call("POST", f"{request.resource}:getIamPolicy", params={"options.requestedPolicyVersion": 3})
        )

    def set_iam_policy(self, request):
        return _policy_from_json(
            self._call("POST", f"{request.resource}:setIamPolicy", {"policy": _policy_to_json(request.policy)})
        )


class RunServicesRest(_Rest):
    """run.googleapis.com v2: IAM policy of the Cloud Run service behind a gen2 function."""

    base = "https://run.googleapis.com/v2"

    def get_iam_policy(self, request):
        return _policy_from_json(
            self._call("GET", f"{request.resource}:getIamPolicy", params={"options.requestedPolicyVersion": 3})
        )

    def set_iam_policy(self, request):
        return _policy_from_json(
            self._call("POST", f"{request.resource}:setIamPolicy", {"policy": _policy_to_json(request.policy)})
        )


class BucketIam:
    """Bucket IAM through the official storage client, exposed with the typed IAM messages.

    Resource names are `projects/_/buckets/{bucket}`.
    """

    def __init__(self, client=None):
        self._client = client

    @property
    def client(self):
        if self._client is None:
            from google.cloud import storage

            self._client = storage.Client()
        return self._client

    @staticmethod
    def _bucket_name(resource: str) -> str:
        return resource.rsplit("/", 1)[-1]

    def get_iam_policy(self, request):
        from google.iam.v1 import policy_pb2

        bucket = self.client.bucket(self._bucket_name(request.resource))
        pol = bucket.get_iam_policy(requested_policy_version=3)
        out = policy_pb2.Policy(version=pol.version or 1, etag=(pol.etag or "").encode())
        for b in pol.bindings:
            out.bindings.add(role=b["role"], members=sorted(b["members"]))
        return out

    def set_iam_policy(self, request):
        bucket = self.client.bucket(self._bucket_name(request.resource))
        pol = bucket.get_iam_policy(requested_policy_version=3)
        if request.policy.etag and pol.etag and request.policy.etag.decode() != pol.etag:
            from google.api_core import exceptions as gexc

            raise gexc.Aborted("bucket IAM policy changed concurrently; re-run apply")
        pol.bindings = [
            {"role": b.role, "members": set(b.members)} for b in request.policy.bindings if not b.HasField("condition")
        ] + [b for b in pol.bindings if b.get("condition")]
        bucket.set_iam_policy(pol)
        return request.policy
