"""Dedicated service accounts, one per function and one per invoker (tasks, scheduler, eventarc)."""

from __future__ import annotations

from google.api_core import exceptions as gexc

from infra.clients import ServiceAccountSpec
from infra.resources.base import CREATE, Change, Resource


class ServiceAccount(Resource):
    kind = "iam.serviceAccount"
    client_name = "iam"

    def __init__(self, spec: ServiceAccountSpec):
        self.spec = spec

    @property
    def name(self) -> str:
        return self.spec.name

    def desired(self) -> dict:
        return {"display_name": self.spec.display_name, "description": self.spec.description}

    def read(self, client) -> dict | None:
        try:
            sa = client.get_service_account(self.spec.name)
        except gexc.NotFound:
            return None
        return {"display_name": sa.get("displayName", ""), "description": sa.get("description", "")}

    def apply(self, client, change: Change) -> None:
        if change.action == CREATE:
            client.create_service_account(self.spec)
        else:
            mask = {"display_name": "displayName", "description": "description"}
            client.patch_service_account(self.spec, sorted(mask[f] for f in change.fields))
