"""Cloud Scheduler job that POSTs to the sweeper with an OIDC token (audience = sweeper URL)."""

from __future__ import annotations

from google.api_core import exceptions as gexc

from infra.resources.base import CREATE, Change, Resource


class SweeperJob(Resource):
    kind = "cloudscheduler.job"
    client_name = "scheduler"

    def __init__(self, location_path: str, job_id: str, uri: str, invoker_email: str, schedule: str,
                 time_zone: str = "Etc/UTC", attempt_deadline_s: int = 300):
        self.location_path = location_path
        self.job_id = job_id
        self.uri = uri
        self.invoker_email = invoker_email
        self.schedule = schedule
        self.time_zone = time_zone
        self.attempt_deadline_s = attempt_deadline_s

    @property
    def name(self) -> str:
        return f"{self.location_path}/jobs/{self.job_id}"

    def desired(self) -> dict:
        return {
            "description": "upcfan sweeper: flags stalled jobs (never reruns anything)",
            "schedule": self.schedule,
            "time_zone": self.time_zone,
            "attempt_deadline": float(self.attempt_deadline_s),
            "http_target": {
                "uri": self.uri,
                "http_method": "POST",
                "oidc_token": {"service_account_email": self.invoker_email, "audience": self.uri},
            },
        }

    def read(self, client) -> dict | None:
        from google.cloud import scheduler_v1

        try:
            job = client.get_job(request=scheduler_v1.GetJobRequest(name=self.name))
        except gexc.NotFound:
            return None
        ht = job.http_target
        return {
            "description": job.description,
            "schedule": job.schedule,
            "time_zone": job.time_zone,
            "attempt_deadline": float(job.attempt_deadline.total_seconds()) if job.attempt_deadline else 0.0,
            "http_target": {
                "uri": ht.uri,
                "http_method": scheduler_v1.HttpMethod(ht.http_method).name if ht.http_method else "",
                "oidc_token": {
                    "service_account_email": ht.oidc_token.service_account_email,
                    "audience": ht.oidc_token.audience,
                },
            },
        }

    def to_proto(self):
        from google.cloud import scheduler_v1
        from google.protobuf import duration_pb2

        d = self.desired()
        return scheduler_v1.Job(
            name=self.name,
            description=d["description"],
            schedule=self.schedule,
            time_zone=self.time_zone,
            attempt_deadline=duration_pb2.Duration(seconds=self.attempt_deadline_s),
            http_target=scheduler_v1.HttpTarget(
                uri=self.uri,
                http_method=scheduler_v1.HttpMethod.POST,
                oidc_token=scheduler_v1.OidcToken(service_account_email=self.invoker_email, audience=self.uri),
            ),
        )

    def apply(self, client, change: Change) -> None:
        from google.cloud import scheduler_v1
        from google.protobuf import field_mask_pb2

        if change.action == CREATE:
            client.create_job(request=scheduler_v1.CreateJobRequest(parent=self.location_path, job=self.to_proto()))
            return
        # Replace the whole http_target when any part of it differs (oidc_token is a oneof member).
        paths = sorted({"http_target" if p.startswith("http_target.") else p for p in change.fields})
        client.update_job(
            request=scheduler_v1.UpdateJobRequest(job=self.to_proto(), update_mask=field_mask_pb2.FieldMask(paths=paths))
        )
