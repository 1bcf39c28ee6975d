"""Additive IAM bindings on one policy holder (project, bucket, secret, queue, service account,
Cloud Run service). Only the (role, member) pairs listed here are managed: missing ones are
added with a read-modify-write guarded by the policy etag; nothing is ever removed.
"""

from __future__ import annotations

from google.api_core import exceptions as gexc

from infra.resources.base import Change, NotReady, Resource


class IamBindings(Resource):
    kind = "iam.bindings"

    def __init__(self, resource: str, client_name: str, bindings: list[tuple[str, str]],
                 after_deploy: bool = False, missing_hint: str = ""):
        self.resource = resource
        self.client_name = client_name
        self.bindings = sorted(set(bindings))
        self.after_deploy = after_deploy
        self.missing_hint = missing_hint

    @property
    def name(self) -> str:
        return self.resource

    @staticmethod
    def _key(role: str, member: str) -> str:
        return f"{role} -> {member}"

    def desired(self) -> dict:
        return {"bindings": {self._key(r, m): "granted" for r, m in self.bindings}}

    def _get(self, client):
        from google.iam.v1 import iam_policy_pb2, options_pb2

        try:
            return client.get_iam_policy(
                request=iam_policy_pb2.GetIamPolicyRequest(
                    resource=self.resource, options=options_pb2.GetPolicyOptions(requested_policy_version=3)
                )
            )
        except gexc.NotFound as exc:
            raise NotReady(self.missing_hint or f"{self.resource} does not exist yet; apply creates it first") from exc

    def read(self, client) -> dict | None:
        policy = self._get(client)
        have = {(b.role, m) for b in policy.bindings if not b.HasField("condition") for m in b.members}
        return {"bindings": {self._key(r, m): "granted" for r, m in self.bindings if (r, m) in have}}

    def diff(self, actual):
        change = super().diff(actual)
        if change.action == "create":  # a policy always exists; missing bindings are an update
            change.action = "update"
        return change

    # A just-created service account can take some seconds to be accepted as a member, and a
    # concurrent edit makes the etag stale: both are retried (fresh read each time) until this.
    retry_deadline_s = 120.0
    sleep = staticmethod(__import__("time").sleep)  # injectable backoff (tests pass a no-op)

    def apply(self, client, change: Change) -> None:
        import time

        deadline = time.monotonic() + self.retry_deadline_s
        delay = 1.0
        while True:
            try:
                return self._apply_once(client)
            except (gexc.Aborted, gexc.BadRequest) as exc:  # BadRequest covers InvalidArgument
                if time.monotonic() + delay > deadline or (
                        isinstance(exc, gexc.BadRequest) and "does not exist" not in str(exc)):
                    raise
                self.sleep(delay)
                delay = min(delay * 2, 10.0)

    def _apply_once(self, client) -> None:
        from google.iam.v1 import iam_policy_pb2, policy_pb2

        policy = self._get(client)
        new = policy_pb2.Policy()
        new.CopyFrom(policy)
        missing = [(r, m) for r, m in self.bindings
                   if not any(b.role == r and m in b.members and not b.HasField("condition") for b in new.bindings)]
        for role, member in missing:
            target = next((b for b in new.bindings if b.role == role and not b.HasField("condition")), None)
            if target is None:
                target = new.bindings.add(role=role)
            target.members.append(member)
            target.members.sort()
        if missing:
            client.set_iam_policy(request=iam_policy_pb2.SetIamPolicyRequest(resource=self.resource, policy=new))
