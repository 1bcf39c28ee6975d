"""An in-memory SweepStore for unit tests: documents by path, Firestore-like filters, atomic groups with preconditions."""

from __future__ import annotations

import datetime as dt
import itertools
import operator
import uuid
from typing import Any

from shared.config import Settings
from shared.events import event_doc
from shared.model import ALERT_STATE, EVENTS, JOBS, STALL_EVENTS
from shared.sweeper.rules.base import Query
from shared.sweeper.store import (AddJobEvent, AddStallEvent, MergeAlertState, SetStallFlag, StoredDoc, SweepStore,
                                  Write)

_OPS = {"==": operator.eq, "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
        "in": lambda value, options: value in options}
_MISSING = object()


class InMemorySweepStore(SweepStore):
    """`docs` maps a document path ("jobs/j1", "jobs/j1/items/g") to its data; `versions` is each
    document's update time (a counter), checked by `SetStallFlag` like Firestore's precondition."""

    def __init__(self) -> None:
        super().__init__()
        self.docs: dict[str, dict] = {}
        self.versions: dict[str, int] = {}
        self._clock = itertools.count(1)

    def put(self, path: str, data: dict) -> None:
        """Test setup (and a worker moving a job underneath the sweep): set a whole document."""
        self.docs[path] = dict(data)
        self.versions[path] = next(self._clock)

    def collection(self, name: str) -> dict[str, dict]:
        """The documents directly in collection `name`, by id."""
        return {p.rsplit("/", 1)[1]: d for p, d in self.docs.items() if p.rsplit("/", 1)[0] == name}

    # reads

    def _query(self, query: Query, now: dt.datetime, cfg: Settings) -> list[StoredDoc]:
        out = []
        for path in sorted(self.docs):
            collection, doc_id = path.rsplit("/", 1)
            in_scope = (collection.rsplit("/", 1)[-1] == query.collection if query.collection_group
                        else collection == query.collection)
            if in_scope and all(_matches(self.docs[path], w.field, w.op, w.value(now, cfg)) for w in query.filters):
                out.append(self._stored(path))
        return out[:query.limit] if query.limit else out

    def _get_many(self, collection: str, ids: list[str]) -> list[StoredDoc]:
        return [self._stored(f"{collection}/{i}") for i in ids if f"{collection}/{i}" in self.docs]

    def _count(self, query: Query, now: dt.datetime, cfg: Settings) -> int:
        return len(self._query(query, now, cfg))

    def new_stall_event_id(self) -> str:
        return uuid.uuid4().hex[:20]

    def is_unavailable(self, exc: BaseException) -> bool:
        return isinstance(exc, ConnectionError)

    def _stored(self, path: str) -> StoredDoc:
        parts = path.split("/")
        job_id = parts[1] if len(parts) >= 4 and parts[0] == JOBS else None
        return StoredDoc(parts[-1], dict(self.docs[path]), self.versions[path], job_id)

    # writes

    def write_job_groups(self, groups: list[list[Write]]) -> set[int]:
        moved = set()
        for i, group in enumerate(groups):
            if all(self._unchanged(w) for w in group if isinstance(w, SetStallFlag)):
                self._write_all(group)
            else:
                moved |= {i}
        return moved

    def write_together(self, writes: list[Write]) -> None:
        self._write_all(writes)

    def write_notify_outcomes(self, outcomes: list[tuple[str, dict]], records: dict[str, dict] | None = None) -> None:
        for event_id, fields in outcomes:
            path = f"{STALL_EVENTS}/{event_id}"
            if path in self.docs:
                self.put(path, self.docs[path] | fields)

    def _unchanged(self, w: SetStallFlag) -> bool:
        path = f"{JOBS}/{w.job_id}"
        return path in self.docs and (w.update_time is None or self.versions[path] == w.update_time)

    def _write_all(self, writes: list[Write]) -> None:
        for w in writes:
            if isinstance(w, SetStallFlag):
                path = f"{JOBS}/{w.job_id}"
                self.put(path, self.docs[path] | {"stall": w.stall})
            elif isinstance(w, AddJobEvent):
                self.put(f"{JOBS}/{w.job_id}/{EVENTS}/{uuid.uuid4().hex[:20]}",
                         event_doc(w.event_type, "sweeper", w.at, w.details))
            elif isinstance(w, AddStallEvent):
                self.put(f"{STALL_EVENTS}/{w.event_id}", w.record)
            elif isinstance(w, MergeAlertState):
                path = f"{ALERT_STATE}/{w.key}"
                self.put(path, self.docs.get(path, {}) | w.fields)


def _matches(doc: dict, field: str, op: str, value: Any) -> bool:
    """Firestore semantics that matter here: a missing field or a value of another type never matches."""
    current: Any = doc
    for part in field.split("."):
        current = current.get(part, _MISSING) if isinstance(current, dict) else _MISSING
    if current is _MISSING or current is None:
        return False
    try:
        return bool(_OPS[op](current, value))
    except TypeError:
        return False
