"""Secret Manager secret *containers*. Values (versions) are added by an operator, never by code."""

from __future__ import annotations

from google.api_core import exceptions as gexc

from infra.resources.base import CREATE, Change, Resource


class SecretContainer(Resource):
    kind = "secretmanager.secret"
    client_name = "secrets"

    def __init__(self, project: str, secret_id: str, labels: dict):
        self.project = project
        self.secret_id = secret_id
        self.labels = dict(labels)

    @property
    def name(self) -> str:
        return f"projects/{self.project}/secrets/{self.secret_id}"

    def desired(self) -> dict:
        # Only the labels we own are compared; others' labels are kept on update.
        return {"labels": dict(sorted(self.labels.items()))}

    def read(self, client) -> dict | None:
        from google.cloud import secretmanager_v1

        try:
            secret = client.get_secret(request=secretmanager_v1.GetSecretRequest(name=self.name))
        except gexc.NotFound:
            return None
        have = dict(secret.labels)
        self._actual_labels = have
        return {"labels": {k: have.get(k) for k in sorted(self.labels)}}

    def apply(self, client, change: Change) -> None:
        from google.cloud import secretmanager_v1
        from google.protobuf import field_mask_pb2

        if change.action == CREATE:
            client.create_secret(
                request=secretmanager_v1.CreateSecretRequest(
                    parent=f"projects/{self.project}",
                    secret_id=self.secret_id,
                    secret=secretmanager_v1.Secret(
                        replication=secretmanager_v1.Replication(automatic=secretmanager_v1.Replication.Automatic()),
                        labels=self.labels,
                    ),
                )
            )
            return
        labels = {**getattr(self, "_actual_labels", {}), **self.labels}
        client.update_secret(
            request=secretmanager_v1.UpdateSecretRequest(
                secret=secretmanager_v1.Secret(name=self.name, labels=dict(sorted(labels.items()))),
                update_mask=field_mask_pb2.FieldMask(paths=["labels"]),
            )
        )
