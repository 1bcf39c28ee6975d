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


# ---- values: checked before any function deploy (`python -m infra secrets`) ----------------

ADD_HINT = "printf %s \"$VALUE\" | gcloud secrets versions add {secret} --data-file=- --project {project}"


def has_enabled_version(client, secret_path: str) -> bool:
    """True when the secret has an enabled version (what `--set-secrets …:latest` resolves)."""
    from google.cloud import secretmanager_v1

    versions = client.list_secret_versions(
        request=secretmanager_v1.ListSecretVersionsRequest(parent=secret_path, filter="state:ENABLED", page_size=1))
    return any(True for _ in versions)


def require_values(client, project: str, secret_ids: list[str], files: dict[str, str],
                   echo=lambda s: None) -> list[str]:
    """Check each secret has a value; add one from an operator's file where it has none.

    Returns the problems (empty when every secret can be mounted). A value only ever comes from
    a file the operator names (`--secret-file ID=PATH`), is never printed, and is added only to
    a secret with no enabled version: rotation stays an explicit `gcloud secrets versions add`.
    """
    from google.cloud import secretmanager_v1

    problems = []
    for secret_id in secret_ids:
        path = f"projects/{project}/secrets/{secret_id}"
        try:
            present = has_enabled_version(client, path)
        except gexc.NotFound:
            problems.append(f"secret {secret_id} does not exist: run `python -m infra apply --before-deploy` first")
            continue
        if present:
            if secret_id in files:
                echo(f"secret {secret_id}: has a value; --secret-file ignored (rotate with "
                     f"`gcloud secrets versions add`, docs/operations.md)")
            else:
                echo(f"secret {secret_id}: has a value")
            continue
        if secret_id in files:
            with open(files[secret_id], "rb") as fh:
                data = fh.read().rstrip(b"\r\n")
            if not data:
                problems.append(f"secret {secret_id}: file {files[secret_id]} is empty")
                continue
            client.add_secret_version(request=secretmanager_v1.AddSecretVersionRequest(
                parent=path, payload=secretmanager_v1.SecretPayload(data=data)))
            echo(f"secret {secret_id}: value added from {files[secret_id]}")
            continue
        problems.append(f"secret {secret_id} has no value (no enabled version), and a function mounts it: add one "
                        f"with `{ADD_HINT.format(secret=secret_id, project=project)}` or pass "
                        f"`--secret-file {secret_id}=PATH` to scripts/deploy")
    return problems
