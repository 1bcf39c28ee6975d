"""Firestore composite indexes (from firestore.indexes.json) and TTL policies.

Indexes are immutable: a missing one is created, an existing one (any state) is left alone,
and indexes not in the file are never deleted. Index creation returns a long-running
operation that is not awaited (builds take minutes); `plan` then reports it as existing.
"""

from __future__ import annotations

import json
from pathlib import Path

from google.api_core import exceptions as gexc

from infra.resources.base import CREATE, Change, Resource

DATABASE = "(default)"


def _db_path(project: str) -> str:
    return f"projects/{project}/databases/{DATABASE}"


class CompositeIndex(Resource):
    kind = "firestore.index"
    client_name = "firestore_admin"

    def __init__(self, project: str, collection_group: str, query_scope: str, fields: list[tuple[str, str]]):
        self.project = project
        self.collection_group = collection_group
        self.query_scope = query_scope  # COLLECTION | COLLECTION_GROUP
        self.fields = [(p, o.upper()) for p, o in fields]

    @property
    def parent(self) -> str:
        return f"{_db_path(self.project)}/collectionGroups/{self.collection_group}"

    @property
    def name(self) -> str:
        short = {"ASCENDING": "asc", "DESCENDING": "desc", "CONTAINS": "contains"}
        spec = ", ".join(f"{p} {short.get(o, o.lower())}" for p, o in self.fields)
        return f"{self.collection_group}({spec}) [{self.query_scope}]"

    def desired(self) -> dict:
        return {"query_scope": self.query_scope, "fields": [f"{p}:{o}" for p, o in self.fields]}

    def read(self, client) -> dict | None:
        from google.cloud import firestore_admin_v1

        want = self.desired()
        for idx in client.list_indexes(request=firestore_admin_v1.ListIndexesRequest(parent=self.parent)):
            got = {
                "query_scope": firestore_admin_v1.Index.QueryScope(idx.query_scope).name,
                "fields": [
                    f"{f.field_path}:{_field_mode(f)}" for f in idx.fields if f.field_path != "__name__"
                ],
            }
            if got == want:
                state = firestore_admin_v1.Index.State(idx.state).name if idx.state else ""
                self._state = state
                return got
        return None

    def diff(self, actual):
        change = super().diff(actual)
        state = getattr(self, "_state", "")
        if actual is not None and state and state != "READY":
            change.note = f"index state {state}"
        return change

    def apply(self, client, change: Change) -> None:
        from google.cloud import firestore_admin_v1

        Index = firestore_admin_v1.Index
        fields = []
        for path, mode in self.fields:
            if mode == "CONTAINS":
                fields.append(Index.IndexField(field_path=path, array_config=Index.IndexField.ArrayConfig.CONTAINS))
            else:
                fields.append(Index.IndexField(field_path=path, order=Index.IndexField.Order[mode]))
        client.create_index(
            request=firestore_admin_v1.CreateIndexRequest(
                parent=self.parent, index=Index(query_scope=Index.QueryScope[self.query_scope], fields=fields)
            )
        )


def _field_mode(f) -> str:
    from google.cloud import firestore_admin_v1

    IF = firestore_admin_v1.Index.IndexField
    if f.order:
        return IF.Order(f.order).name
    if f.array_config:
        return "CONTAINS"
    return "UNSPECIFIED"


class TtlPolicy(Resource):
    kind = "firestore.ttl"
    client_name = "firestore_admin"

    def __init__(self, project: str, collection_group: str, field_path: str):
        self.project = project
        self.collection_group = collection_group
        self.field_path = field_path

    @property
    def name(self) -> str:
        return f"{_db_path(self.project)}/collectionGroups/{self.collection_group}/fields/{self.field_path}"

    def desired(self) -> dict:
        return {"ttl_config": "enabled"}

    def read(self, client) -> dict | None:
        from google.cloud import firestore_admin_v1

        try:
            f = client.get_field(request=firestore_admin_v1.GetFieldRequest(name=self.name))
        except gexc.NotFound:
            return {"ttl_config": "disabled"}
        # ttl_config present (CREATING / ACTIVE / NEEDS_REPAIR) means the policy exists.
        if "ttl_config" in f:
            return {"ttl_config": "enabled"}
        return {"ttl_config": "disabled"}

    def apply(self, client, change: Change) -> None:
        from google.cloud import firestore_admin_v1
        from google.protobuf import field_mask_pb2

        client.update_field(
            request=firestore_admin_v1.UpdateFieldRequest(
                field=firestore_admin_v1.Field(name=self.name, ttl_config=firestore_admin_v1.Field.TtlConfig()),
                update_mask=field_mask_pb2.FieldMask(paths=["ttl_config"]),
            )
        )


def load_index_file(path: Path, project: str) -> tuple[list[CompositeIndex], list[TtlPolicy]]:
    """Composite indexes and TTL field overrides from a firestore.indexes.json (Firebase CLI format)."""
    data = json.loads(Path(path).read_text())
    indexes = [
        CompositeIndex(
            project,
            ix["collectionGroup"],
            ix.get("queryScope", "COLLECTION"),
            [(f["fieldPath"], f.get("order") or ("CONTAINS" if f.get("arrayConfig") else "ASCENDING")) for f in ix["fields"]],
        )
        for ix in data.get("indexes", [])
    ]
    seen: set[str] = set()
    for ix in indexes:
        if ix.name in seen:
            raise ValueError(f"{path}: index {ix.name} is declared twice")
        seen.add(ix.name)
    ttls = [
        TtlPolicy(project, fo["collectionGroup"], fo["fieldPath"])
        for fo in data.get("fieldOverrides", [])
        if fo.get("ttl")
    ]
    return indexes, ttls
