"""Cloud Tasks queues: retry_config and rate_limits exactly as in shared/config.py.

The queue `state` (RUNNING/PAUSED) is deliberately not managed: an operator who paused a
queue in an emergency must not have `apply` resume it. Dispatch deadlines are per task in
Cloud Tasks v2 (set by the code that creates tasks), not a queue field.
"""

from __future__ import annotations

from google.api_core import exceptions as gexc

from infra.resources.base import Change, CREATE, Resource
from shared.config import QueueSpec


def _dur(seconds: float) -> float:
    return round(float(seconds), 6)


class TaskQueue(Resource):
    kind = "cloudtasks.queue"
    client_name = "tasks"

    def __init__(self, location_path: str, spec: QueueSpec):
        self.location_path = location_path
        self.spec = spec

    @property
    def name(self) -> str:
        return f"{self.location_path}/queues/{self.spec.name}"

    def desired(self) -> dict:
        r, q = self.spec.retry, self.spec.rate
        return {
            "rate_limits": {
                "max_dispatches_per_second": float(q.max_dispatches_per_second),
                "max_concurrent_dispatches": int(q.max_concurrent_dispatches),
            },
            "retry_config": {
                "max_attempts": int(r.max_attempts),
                "min_backoff": _dur(r.min_backoff_s),
                "max_backoff": _dur(r.max_backoff_s),
                "max_doublings": int(r.max_doublings),
                "max_retry_duration": _dur(r.max_retry_duration_s),
            },
        }

    def read(self, client) -> dict | None:
        from google.cloud import tasks_v2

        try:
            q = client.get_queue(request=tasks_v2.GetQueueRequest(name=self.name))
        except gexc.NotFound:
            return None
        rc = q.retry_config
        return {
            "rate_limits": {
                "max_dispatches_per_second": float(q.rate_limits.max_dispatches_per_second),
                "max_concurrent_dispatches": int(q.rate_limits.max_concurrent_dispatches),
            },
            "retry_config": {
                "max_attempts": int(rc.max_attempts),
                "min_backoff": _dur(rc.min_backoff.total_seconds()) if rc.min_backoff else 0.0,
                "max_backoff": _dur(rc.max_backoff.total_seconds()) if rc.max_backoff else 0.0,
                "max_doublings": int(rc.max_doublings),
                "max_retry_duration": _dur(rc.max_retry_duration.total_seconds()) if rc.max_retry_duration else 0.0,
            },
            "state": tasks_v2.Queue.State(q.state).name if q.state else "STATE_UNSPECIFIED",
        }

    def diff(self, actual):
        change = super().diff(actual)
        if actual and actual.get("state") == "PAUSED":
            change.note = "queue is PAUSED; apply leaves it paused"
        return change

    def to_proto(self):
        from google.cloud import tasks_v2
        from google.protobuf import duration_pb2

        d = self.desired()
        rc = d["retry_config"]

        def dur(s: float):
            return duration_pb2.Duration(seconds=int(s), nanos=int(round((s - int(s)) * 1e9)))

        return tasks_v2.Queue(
            name=self.name,
            rate_limits=tasks_v2.RateLimits(**d["rate_limits"]),
            retry_config=tasks_v2.RetryConfig(
                max_attempts=rc["max_attempts"],
                min_backoff=dur(rc["min_backoff"]),
                max_backoff=dur(rc["max_backoff"]),
                max_doublings=rc["max_doublings"],
                max_retry_duration=dur(rc["max_retry_duration"]),
            ),
        )

    def apply(self, client, change: Change) -> None:
        from google.cloud import tasks_v2
        from google.protobuf import field_mask_pb2

        if change.action == CREATE:
            client.create_queue(request=tasks_v2.CreateQueueRequest(parent=self.location_path, queue=self.to_proto()))
            return
        paths = sorted(change.fields)  # e.g. "retry_config.max_attempts"
        client.update_queue(
            request=tasks_v2.UpdateQueueRequest(queue=self.to_proto(), update_mask=field_mask_pb2.FieldMask(paths=paths))
        )
