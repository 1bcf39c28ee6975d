"""Eventarc trigger: GCS object finalize on the watched bucket -> the ingest function (POST /).

The trigger lives in the bucket's region (use a regional bucket in --region) and runs as a
dedicated service account that holds run.invoker on the ingest service only.
"""

from __future__ import annotations

from google.api_core import exceptions as gexc

from infra.resources.base import CREATE, Change, Resource


class FinalizeTrigger(Resource):
    kind = "eventarc.trigger"
    client_name = "eventarc"
    after_deploy = True  # the destination service must exist

    def __init__(self, location_path: str, trigger_id: str, bucket: str, event_type: str, service: str,
                 region: str, service_account: str, labels: dict, path: str = "/"):
        self.location_path = location_path
        self.trigger_id = trigger_id
        self.bucket = bucket
        self.event_type = event_type
        self.service = service
        self.region = region
        self.service_account = service_account
        self.labels = dict(labels)
        self.path = path

    @property
    def name(self) -> str:
        return f"{self.location_path}/triggers/{self.trigger_id}"

    def desired(self) -> dict:
        return {
            "event_filters": sorted([f"type={self.event_type}", f"bucket={self.bucket}"]),
            "destination": {"cloud_run": {"service": self.service, "region": self.region, "path": self.path}},
            "service_account": self.service_account,
            "event_data_content_type": "application/json",
            "labels": dict(sorted(self.labels.items())),
        }

    def read(self, client) -> dict | None:
        from google.cloud import eventarc_v1

        try:
            t = client.get_trigger(request=eventarc_v1.GetTriggerRequest(name=self.name))
        except gexc.NotFound:
            return None
        cr = t.destination.cloud_run
        return {
            "event_filters": sorted(f"{f.attribute}={f.value}" for f in t.event_filters),
            "destination": {"cloud_run": {"service": cr.service, "region": cr.region, "path": cr.path}},
            "service_account": t.service_account,
            "event_data_content_type": t.event_data_content_type,
            "labels": {k: t.labels.get(k) for k in sorted(self.labels)},
        }

    def to_proto(self):
        from google.cloud import eventarc_v1

        return eventarc_v1.Trigger(
            name=self.name,
            event_filters=[
                eventarc_v1.EventFilter(attribute="type", value=self.event_type),
                eventarc_v1.EventFilter(attribute="bucket", value=self.bucket),
            ],
            destination=eventarc_v1.Destination(
                cloud_run=eventarc_v1.CloudRun(service=self.service, region=self.region, path=self.path)
            ),
            service_account=self.service_account,
            event_data_content_type="application/json",
            labels=self.labels,
        )

    def apply(self, client, change: Change) -> None:
        from google.cloud import eventarc_v1
        from google.protobuf import field_mask_pb2

        if change.action == CREATE:
            op = client.create_trigger(
                request=eventarc_v1.CreateTriggerRequest(
                    parent=self.location_path, trigger=self.to_proto(), trigger_id=self.trigger_id
                )
            )
        else:
            paths = sorted({p.split(".", 1)[0] for p in change.fields})
            op = client.update_trigger(
                request=eventarc_v1.UpdateTriggerRequest(
                    trigger=self.to_proto(), update_mask=field_mask_pb2.FieldMask(paths=paths)
                )
            )
        if hasattr(op, "result"):
            op.result(timeout=600)
