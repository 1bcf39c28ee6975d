"""Firestore composite indexes and field overrides (single-field indexes, exemptions, TTL), all
from firestore.indexes.json.

Composite indexes are immutable: a missing one is created, an existing one (any state) is left
alone, and indexes not in the file are never deleted (one a query no longer needs is removed by
hand, after the code that used it is gone: docs/operations.md). Index creation returns a
long-running operation that is not awaited (builds take minutes); `plan` then reports it as
existing. A field override is changed only where it differs from the file (`plan` lists the
drift: that is the audit), and its update is awaited.
"""

from __future__ import annotations

import concurrent.futures
import json
from pathlib import Path

from google.api_core import exceptions as gexc

from infra.resources.base import CREATE, UPDATE, Change, Resource

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


# Firestore's default single-field indexes of a field without an override (what `read` reports as
# "inherited"): ascending, descending and array-contains, collection scope.
INHERITED = "inherited"
# Changing a field's indexes is a long-running operation (index entries are added or removed); apply
# waits for each before the next, so a failure or a slow change names its field and the next `plan`
# sees finished states only.
FIELD_UPDATE_TIMEOUT_S = 900.0


class FieldOverride(Resource):
    """One `fieldOverrides` entry: the field's single-field indexes (exactly those listed; none =
    exempt) and, when the entry says `ttl: true`, its TTL policy. Only the parts the file declares
    are managed: a TTL the file does not ask for is left as it is, and fields not in the file are
    never read or changed."""

    kind = "firestore.field"
    client_name = "firestore_admin"

    def __init__(self, project: str, collection_group: str, field_path: str, indexes: list[tuple[str, str]],
                 ttl: bool = False):
        self.project = project
        self.collection_group = collection_group
        self.field_path = field_path
        self.indexes = sorted({(m.upper(), s.upper()) for m, s in indexes})  # (ASCENDING|DESCENDING|CONTAINS, scope)
        self.ttl = ttl

    @property
    def name(self) -> str:
        return f"{_db_path(self.project)}/collectionGroups/{self.collection_group}/fields/{self.field_path}"

    def desired(self) -> dict:
        want: dict = {"indexes": sorted(f"{m}:{s}" for m, s in self.indexes)}
        if self.ttl:
            want["ttl_config"] = "enabled"
        return want

    def read(self, client) -> dict | None:
        from google.cloud import firestore_admin_v1

        try:
            f = client.get_field(request=firestore_admin_v1.GetFieldRequest(name=self.name))
        except gexc.NotFound:
            f = None
        got: dict = {"indexes": INHERITED}
        if f is not None and "index_config" in f and not f.index_config.uses_ancestor_config:
            got["indexes"] = sorted(f"{_field_mode(ix.fields[0])}:{firestore_admin_v1.Index.QueryScope(ix.query_scope).name}"
                                    for ix in f.index_config.indexes if ix.fields)
        if self.ttl:
            # ttl_config present (CREATING / ACTIVE / NEEDS_REPAIR) means the policy exists.
            got["ttl_config"] = "enabled" if f is not None and "ttl_config" in f else "disabled"
        return got

    def diff(self, actual):
        change = super().diff(actual)
        # The API always answers for a field (its inherited config when it has no override): an
        # override that differs is an update of the field, never a create.
        if change.action == CREATE:
            change.action = UPDATE
        return change

    def apply(self, client, change: Change) -> None:
        from google.cloud import firestore_admin_v1
        from google.protobuf import field_mask_pb2

        Field, Index = firestore_admin_v1.Field, firestore_admin_v1.Index
        field = Field(name=self.name)
        paths = []
        if "indexes" in change.fields:
            indexes = []
            for mode, scope in self.indexes:
                ix_field = (Index.IndexField(field_path=self.field_path, array_config=Index.IndexField.ArrayConfig.CONTAINS)
                            if mode == "CONTAINS" else
                            Index.IndexField(field_path=self.field_path, order=Index.IndexField.Order[mode]))
                indexes.append(Index(query_scope=Index.QueryScope[scope], fields=[ix_field]))
            field.index_config = Field.IndexConfig(indexes=indexes)
            paths.append("index_config")
        if "ttl_config" in change.fields:
            field.ttl_config = Field.TtlConfig()
            paths.append("ttl_config")
        if not paths:
            return
        op = client.update_field(request=firestore_admin_v1.UpdateFieldRequest(
            field=field, update_mask=field_mask_pb2.FieldMask(paths=paths)))
        try:
            op.result(timeout=FIELD_UPDATE_TIMEOUT_S)
        except concurrent.futures.TimeoutError as exc:
            raise RuntimeError(
                f"field override {self.name} ({', '.join(paths)}) still in progress after "
                f"{FIELD_UPDATE_TIMEOUT_S:.0f} s (a large collection's index entries are being changed); "
                "run apply again once `plan` shows it done") from exc


def load_index_file(path: Path, project: str) -> tuple[list[CompositeIndex], list[FieldOverride]]:
    """Composite indexes and field overrides (single-field indexes, exemptions, TTL) from a
    firestore.indexes.json (Firebase CLI format)."""
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
    overrides = []
    for fo in data.get("fieldOverrides", []):
        where = f"{path}: field override {fo.get('collectionGroup')}.{fo.get('fieldPath')}"
        if "indexes" not in fo:
            raise ValueError(f"{where} has no \"indexes\" list (an empty list exempts the field)")
        modes = []
        for ix in fo["indexes"]:
            mode = ix.get("order") or ("CONTAINS" if ix.get("arrayConfig") == "CONTAINS" else None)
            if mode not in ("ASCENDING", "DESCENDING", "CONTAINS"):
                raise ValueError(f"{where}: index {ix} needs order ASCENDING|DESCENDING or arrayConfig CONTAINS")
            modes.append((mode, ix.get("queryScope", "COLLECTION")))
        override = FieldOverride(project, fo["collectionGroup"], fo["fieldPath"], modes, ttl=bool(fo.get("ttl")))
        if override.name in seen:
            raise ValueError(f"{where} is declared twice")
        seen.add(override.name)
        overrides.append(override)
    return indexes, overrides
