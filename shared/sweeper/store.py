"""The sweeper's persistence: the `SweepStore` interface and its Firestore implementation.

Guarantee 4 ("stalls are seen, not fixed") lives here: a store's only writes are its `write_*`
methods (and the `_write_*` helpers they apply), and they touch `jobs/{id}.stall` (one field, with
`update()` and an update-time precondition, so a job that moved since we read it is left alone),
`jobs/{id}/events`, `stall_events` and `alert_state` — never an item, a task, or a job's status,
counts or totals (tests/unit/test_sweeper_rules.py checks this on the source).
"""

from __future__ import annotations

import datetime as dt
import math
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterable, Union

from shared.config import Settings
from shared.events import event_doc
from shared.log import log_event
from shared.model import ALERT_STATE, EVENTS, JOBS, STALL_EVENTS
from shared.retry import SWEEP_STORE
from shared.sweeper.report import ReadMeter
from shared.sweeper.rules.base import Query

QUERY_TIMEOUT_S = 10.0
# Flag-phase commits: atomic WriteBatches of whole per-job write groups, ≤ 500 writes each, a few in flight.
MAX_BATCH_OPS = 500
MIN_BATCH_OPS = 100
COMMIT_PARALLEL = 4
WRITE_WORKERS = 16
# Notify outcomes onto stall_events records: at most this many per batch.
MARKS_PER_BATCH = 500


@dataclass(frozen=True)
class StoredDoc:
    id: str
    data: dict
    update_time: Any = None  # the store's version of the document, for a write precondition
    job_id: str | None = None  # for a document under jobs/{id}/…: that job


# The only writes a sweep asks for.

@dataclass(frozen=True)
class SetStallFlag:
    """jobs/{id}.stall only, and only if the job is unchanged since `update_time` (when given)."""

    job_id: str
    stall: dict | None
    update_time: Any


@dataclass(frozen=True)
class AddJobEvent:
    job_id: str
    event_type: str  # stall_flagged | stall_recovered
    at: dt.datetime
    details: dict


@dataclass(frozen=True)
class AddStallEvent:
    event_id: str
    record: dict


@dataclass(frozen=True)
class MergeAlertState:
    key: str  # a job id, or "systemic"
    fields: dict


Write = Union[SetStallFlag, AddJobEvent, AddStallEvent, MergeAlertState]
JOB_EVENT_TYPES = ("stall_flagged", "stall_recovered")


class SweepStore(ABC):
    """Reads are metered here (so every store bills alike); subclasses fetch and write."""

    def __init__(self) -> None:
        self.meter = ReadMeter()

    def query(self, query: Query, now: dt.datetime, cfg: Settings) -> list[StoredDoc]:
        docs = self._query(query, now, cfg)
        self.meter.query(len(docs))
        return docs

    def get_many(self, collection: str, ids: list[str]) -> dict[str, StoredDoc]:
        """The documents of `collection` with these ids that exist, by id."""
        if not ids:
            return {}
        docs = self._get_many(collection, ids)
        self.meter.gets(len(ids))
        return {d.id: d for d in docs}

    def count(self, query: Query, now: dt.datetime, cfg: Settings) -> int:
        n = self._count(query, now, cfg)
        self.meter.aggregation(n)
        return n

    @abstractmethod
    def _query(self, query: Query, now: dt.datetime, cfg: Settings) -> list[StoredDoc]: ...

    @abstractmethod
    def _get_many(self, collection: str, ids: list[str]) -> list[StoredDoc]: ...

    @abstractmethod
    def _count(self, query: Query, now: dt.datetime, cfg: Settings) -> int: ...

    @abstractmethod
    def new_stall_event_id(self) -> str: ...

    @abstractmethod
    def is_unavailable(self, exc: BaseException) -> bool:
        """Whether a fault means the store cannot be reached (the sweep reports it as such)."""

    @abstractmethod
    def write_job_groups(self, groups: list[list[Write]]) -> set[int]:
        """Applies each group atomically; returns the indices of groups not applied because their
        job changed since it was read (a `SetStallFlag` precondition failed)."""

    @abstractmethod
    def write_together(self, writes: list[Write]) -> None:
        """One atomic write of a few records (the systemic alert)."""

    @abstractmethod
    def write_notify_outcomes(self, outcomes: list[tuple[str, dict]], records: dict[str, dict] | None = None) -> None:
        """Fields onto stall_events records by id; a lost outcome costs one extra retry post, never a crash.
        `records`: the records this sweep already holds, by id (its own alerts and the pending ones it read)."""


class FirestoreSweepStore(SweepStore):
    def __init__(self, db) -> None:
        super().__init__()
        self.db = db

    @classmethod
    def for_settings(cls, cfg: Settings) -> FirestoreSweepStore:
        from shared.clients import firestore_client
        from shared.config import settings

        if cfg.project == settings().project:
            return cls(firestore_client())
        from google.cloud import firestore

        return cls(firestore.Client(project=cfg.project))

    def firestore_query(self, query: Query, now: dt.datetime, cfg: Settings):
        """The Firestore query for a declarative one (the bench times each alone)."""
        from google.cloud.firestore_v1.base_query import FieldFilter

        q = self.db.collection_group(query.collection) if query.collection_group else self.db.collection(query.collection)
        for where in query.filters:
            q = q.where(filter=FieldFilter(where.field, where.op, where.value(now, cfg)))
        return q.limit(query.limit) if query.limit else q

    def _query(self, query: Query, now: dt.datetime, cfg: Settings) -> list[StoredDoc]:
        snaps = self.firestore_query(query, now, cfg).stream(retry=_retry(), timeout=QUERY_TIMEOUT_S)
        return [_stored(s) for s in snaps]

    def _get_many(self, collection: str, ids: list[str]) -> list[StoredDoc]:
        refs = [self.db.collection(collection).document(i) for i in ids]
        return [_stored(s) for s in self.db.get_all(refs, retry=_retry(), timeout=QUERY_TIMEOUT_S) if s.exists]

    def _count(self, query: Query, now: dt.datetime, cfg: Settings) -> int:
        agg = self.firestore_query(query, now, cfg).count(alias="n")
        return int(agg.get(retry=_retry(), timeout=QUERY_TIMEOUT_S)[0][0].value)

    def new_stall_event_id(self) -> str:
        return self.db.collection(STALL_EVENTS).document().id  # an id made client-side: no call

    def is_unavailable(self, exc: BaseException) -> bool:
        from google.api_core import exceptions as gexc

        return isinstance(exc, (gexc.ServiceUnavailable, gexc.DeadlineExceeded, gexc.RetryError,
                                gexc.Unauthenticated, gexc.PermissionDenied))

    # ----------------------------------------------------------------------------------------
    # The only writes. Keep this list short: tests/unit/test_sweeper_rules.py fails if anything
    # else in the package calls set/update/create/delete/commit... on a document.

    def write_job_groups(self, groups: list[list[Write]]) -> set[int]:
        """As few atomic batches as fit (≤ MAX_BATCH_OPS writes, a few in parallel); a group's writes
        never straddle two batches. A batch whose precondition fails is halved until the moved
        job(s) stand alone; those are left alone and the next sweep looks again."""
        per_chunk = max(1, math.ceil(sum(len(g) for g in groups) / COMMIT_PARALLEL))
        per_chunk = min(MAX_BATCH_OPS, max(MIN_BATCH_OPS, per_chunk))
        chunks: list[list[int]] = []
        size = 0
        for i, group in enumerate(groups):
            if not group:
                continue
            if not chunks or size + len(group) > per_chunk:
                chunks.append([])
                size = 0
            chunks[-1].append(i)
            size += len(group)
        if not chunks:
            return set()
        with ThreadPoolExecutor(max_workers=min(WRITE_WORKERS, len(chunks))) as pool:
            return {i for moved in pool.map(lambda chunk: self._write_chunk(groups, chunk), chunks) for i in moved}

    def _write_chunk(self, groups: list[list[Write]], chunk: list[int]) -> list[int]:
        from google.api_core import exceptions as gexc

        batch = self.db.batch()
        for i in chunk:
            self._write_all(batch, groups[i])
        try:
            batch.commit(retry=_retry(), timeout=QUERY_TIMEOUT_S)
            return []
        except (gexc.FailedPrecondition, gexc.NotFound):
            # A job changed between our read and this write: it moved, so it is not ours to flag now.
            if len(chunk) == 1:
                return chunk
            mid = len(chunk) // 2
            return self._write_chunk(groups, chunk[:mid]) + self._write_chunk(groups, chunk[mid:])

    def write_together(self, writes: list[Write]) -> None:
        batch = self.db.batch()
        self._write_all(batch, writes)
        batch.commit()

    def write_notify_outcomes(self, outcomes: list[tuple[str, dict]], records: dict[str, dict] | None = None) -> None:
        from google.api_core import exceptions as gexc

        for i in range(0, len(outcomes), MARKS_PER_BATCH):
            batch = self.db.batch()
            for event_id, fields in outcomes[i:i + MARKS_PER_BATCH]:
                ref = self.db.collection(STALL_EVENTS).document(event_id)
                batch.update(ref, fields)
                if fields.get("notified"):  # the job's history says an alert reached people
                    self._write_alert_sent_event(batch, ref, event_id, fields, (records or {}).get(event_id))
            try:
                batch.commit()
            except gexc.GoogleAPICallError as exc:  # a lost mark means one extra retry post, never a crash
                log_event("stall_event_mark_failed", severity="WARNING", logger="upcfan.sweeper",
                          error=type(exc).__name__)

    def _write_alert_sent_event(self, batch, ref, stall_event_id: str, fields: dict, record: dict | None) -> None:
        if record is None:  # not held by this sweep: one read
            record = ref.get().to_dict() or {}
        job_id = record.get("job_id")
        if not job_id or record.get("kind") == "systemic":  # the systemic alert names no one job
            return
        at = fields.get("notified_at") or record.get("detected_at")
        event_ref = self.db.collection(JOBS).document(job_id).collection(EVENTS).document(f"alert-{stall_event_id}")
        batch.set(event_ref, event_doc("alert_sent", "sweeper", at, {
            "stall_event_id": stall_event_id, "kind": record.get("kind"), "severity": record.get("severity"),
            "reason": record.get("reason"), "attempts": fields.get("attempts")}))

    def _write_all(self, batch, writes: Iterable[Write]) -> None:
        for w in writes:
            if isinstance(w, SetStallFlag):
                self._write_job_stall(batch, w)
            elif isinstance(w, AddJobEvent):
                self._write_job_event(batch, w)
            elif isinstance(w, AddStallEvent):
                self._write_stall_event(batch, w)
            else:
                self._write_alert_state(batch, w)

    def _write_job_stall(self, batch, op: SetStallFlag) -> None:
        """jobs/{id}.stall only (never status, counts or totals), only if the job is unchanged since read."""
        ref = self.db.collection(JOBS).document(op.job_id)
        option = self.db.write_option(last_update_time=op.update_time) if op.update_time is not None else None
        batch.update(ref, {"stall": op.stall}, option=option)

    def _write_job_event(self, batch, op: AddJobEvent) -> None:
        assert op.event_type in JOB_EVENT_TYPES
        ref = self.db.collection(JOBS).document(op.job_id).collection(EVENTS).document()
        batch.set(ref, event_doc(op.event_type, "sweeper", op.at, op.details))

    def _write_stall_event(self, batch, op: AddStallEvent) -> None:
        batch.set(self.db.collection(STALL_EVENTS).document(op.event_id), op.record)

    def _write_alert_state(self, batch, op: MergeAlertState) -> None:
        batch.set(self.db.collection(ALERT_STATE).document(op.key), op.fields, merge=True)


def _retry():
    return SWEEP_STORE.api_core_retry(QUERY_TIMEOUT_S)


def _stored(snap) -> StoredDoc:
    parent_job = snap.reference.parent.parent
    return StoredDoc(snap.id, snap.to_dict() or {}, snap.update_time,
                     parent_job.id if parent_job is not None else None)
