"""The Firestore implementation of `Store`: transactions, count aggregations, paged queries."""

from __future__ import annotations

from typing import Any

from google.api_core import exceptions as gexc

from shared.item_state import Create, ItemWrite, Update
from shared.events import Event
from shared.model import CHUNKS, EVENTS, ITEMS, JOBS, LINES, Item, ItemStatus, Job
from shared.naming import chunk_doc_id, line_doc_id
from shared.retry import STORE_BATCH_WRITE, STORE_MUST_COMMIT, STORE_TRANSACTION, RetryPolicy
from shared.store.base import ITEM_CREATE_BATCH, TXN_COUNTER, ItemTransition, JobTransition, Store

# Firestore allows 500 writes per batch; line records go 400 at a time to stay clear of it.
LINE_BATCH = 400
# Guarded batches lose to a concurrent writer with one of these; the caller falls back per item.
_RACE_ERRORS = (gexc.FailedPrecondition, gexc.NotFound, gexc.Aborted)
# google.rpc.Code values of a BatchWrite write's status.
_OK, _ALREADY_EXISTS = 0, 6


class FirestoreStore(Store):
    def __init__(self, db=None):
        self._given_db = db

    @property
    def db(self):
        if self._given_db is not None:
            return self._given_db
        from shared.clients import firestore_client

        return firestore_client()

    # ------------------------------------------------------------------------- references

    def _job_ref(self, job_id: str):
        return self.db.collection(JOBS).document(job_id)

    def _item_ref(self, job_id: str, gtin: str):
        return self._job_ref(job_id).collection(ITEMS).document(gtin)

    def _event_ref(self, job_ref, event: Event):
        events = job_ref.collection(EVENTS)
        return events.document(event.event_id) if event.event_id else events.document()

    # ------------------------------------------------------------------------- transactions

    def _run(self, name: str, body, policy: RetryPolicy) -> Any:
        from google.cloud import firestore

        @firestore.transactional
        def counted(tx):
            TXN_COUNTER.add(name)
            return body(tx)

        # max_attempts=1: the client's own retry would re-run at once, in step with the transaction
        # it lost to; the policy starts over after a jittered pause instead.
        return policy.call(lambda: counted(self.db.transaction(max_attempts=1)))

    def transact_item(self, name: str, job_id: str, gtin: str, transition: ItemTransition, *,
                      must_commit: bool = False) -> Any:
        from shared.store.raw_writes import create_write, update_write

        ref = self._item_ref(job_id, gtin)

        def body(tx):
            snap = ref.get(transaction=tx)
            item = Item.from_doc(_snapshot_data(snap), gtin, snap.update_time) if snap.exists else None
            result, write = transition(item)
            # `tx.create` / `tx.update` with the Writes built on the raw protobuf: the client's proto-plus
            # encoding was the largest part of a delivery's CPU beyond the bare transactions
            # (shared/store/raw_writes.py).
            if isinstance(write, Create):
                tx._add_write_pbs([create_write(ref._document_path, write.doc)])
            elif isinstance(write, Update):
                tx._add_write_pbs([update_write(ref._document_path, write.fields)])
            return result

        return self._run(name, body, STORE_MUST_COMMIT if must_commit else STORE_TRANSACTION)

    def transact_job(self, name: str, job_id: str, transition: JobTransition, *, with_chunks: bool = False) -> Any:
        ref = self._job_ref(job_id)

        def body(tx):
            snap = ref.get(transaction=tx)
            job = Job.from_doc(snap.to_dict() or {}, job_id) if snap.exists else None
            if with_chunks:
                chunks = [c.to_dict() or {} for c in ref.collection(CHUNKS).stream(transaction=tx)]
                result, write = transition(job, chunks)
            else:
                result, write = transition(job)
            if write is not None:
                tx.update(ref, write.fields)
                for event in write.events:
                    tx.set(self._event_ref(ref, event), event.to_doc())
            return result

        return self._run(name, body, STORE_TRANSACTION)

    # ------------------------------------------------------------------------- jobs

    def get_job(self, job_id: str) -> Job | None:
        snap = self._job_ref(job_id).get()
        return Job.from_doc(snap.to_dict() or {}, job_id) if snap.exists else None

    def create_job(self, doc: dict[str, Any], created: Event) -> bool:
        ref = self._job_ref(doc["job_id"])
        try:
            ref.create(doc)
        except gexc.Conflict:  # ALREADY_EXISTS (gRPC raises AlreadyExists, a Conflict too)
            return False
        # Written after the job (not with it): a crash in between loses one audit line, never the job;
        # the fixed id keeps a retried create from writing it twice.
        self._event_ref(ref, created).set(created.to_doc())
        return True

    def update_job(self, job_id: str, fields: dict[str, Any]) -> None:
        self._job_ref(job_id).update(fields)

    def list_jobs(self, *, limit: int, status: str | None = None, gcs_path: str | None = None,
                  after_job_id: str | None = None) -> list[Job] | None:
        from google.cloud import firestore

        query = self.db.collection(JOBS)
        if status:
            query = query.where(filter=firestore.FieldFilter("status", "==", status))
        if gcs_path:
            query = query.where(filter=firestore.FieldFilter("gcs_path", "==", gcs_path))
        query = query.order_by("created_at", direction=firestore.Query.DESCENDING)
        if after_job_id:
            snap = self._job_ref(after_job_id).get()
            if not snap.exists:
                return None
            query = query.start_after(snap)  # the client adds __name__ as the tie-breaker
        return [Job.from_doc(d.to_dict() or {}, d.id) for d in query.limit(limit).stream()]

    def record_event(self, job_id: str, event: Event) -> None:
        ref = self._job_ref(job_id)
        self._event_ref(ref, event).set(event.to_doc())

    def page_events(self, job_id: str, *, limit: int, after_id: str | None = None) -> list[tuple[str, dict]] | None:
        col = self._job_ref(job_id).collection(EVENTS)
        query = col.order_by("at").order_by("__name__")
        if after_id:
            snap = col.document(after_id).get()
            if not snap.exists:
                return None
            query = query.start_after(snap)
        return [(d.id, d.to_dict() or {}) for d in query.limit(limit).stream()]

    # ------------------------------------------------------------------------- items

    def get_item(self, job_id: str, gtin: str) -> Item | None:
        snap = self._item_ref(job_id, gtin).get()
        return Item.from_doc(snap.to_dict() or {}, gtin, snap.update_time) if snap.exists else None

    def create_item(self, job_id: str, gtin: str, doc: dict[str, Any]) -> Item | None:
        ref = self._item_ref(job_id, gtin)
        try:
            ref.create(doc)  # fails with ALREADY_EXISTS if the document exists
            return None
        except gexc.Conflict:  # gRPC raises AlreadyExists, a Conflict too
            pass
        # Items are never deleted, so the document that refused the create is there to read. (A create
        # whose response was lost and then retried by the caller reads its own write: same line, "mine".)
        snap = ref.get()
        return Item.from_doc(snap.to_dict() or {}, gtin, snap.update_time)

    def create_items(self, job_id: str, docs: dict[str, dict[str, Any]]) -> dict[str, Item | None]:
        """One BatchWrite of `create`s (precondition: absent), then one `get_all` of the items that
        already existed. BatchWrite applies each write on its own and answers a status per write
        (https://cloud.google.com/python/docs/reference/firestore/latest/google.cloud.firestore_v1.types.BatchWriteResponse),
        so one existing item does not fail the others as it would in an atomic batch (`WriteBatch`).
        Not `BulkWriter`: its rate limiter starts at 500 writes/s (the 500/50/5 ramp-up) and would pace
        a 20k-item fan-out slower than one create per item did."""
        from shared.store.raw_writes import create_write

        if len(docs) > ITEM_CREATE_BATCH:
            raise ValueError(f"create_items takes at most {ITEM_CREATE_BATCH} items per call, got {len(docs)}")
        results: dict[str, Item | None] = {}
        exists: list[str] = []
        pending = dict(docs)

        def attempt() -> None:
            batch = _bulk_batch(self.db)
            gtins = list(pending)
            # `batch.create` with the Write built on the raw protobuf: the client's proto-plus encoding
            # was most of the fan-out's CPU per item (shared/store/raw_writes.py).
            batch._add_write_pbs([create_write(self._item_ref(job_id, gtin)._document_path, pending[gtin])
                                  for gtin in gtins])
            # retry=None: STORE_BATCH_WRITE is the only loop (the client's default would nest in it).
            response = batch.commit(retry=None)
            if len(response.status) != len(gtins):
                raise gexc.InternalServerError(f"BatchWrite answered {len(response.status)} statuses for "
                                               f"{len(gtins)} writes")
            transient: BaseException | None = None
            for gtin, status in zip(gtins, response.status):
                if status.code in (_OK, _ALREADY_EXISTS):
                    del pending[gtin]
                    if status.code == _OK:
                        results[gtin] = None
                    else:
                        exists.append(gtin)
                    continue
                fault = gexc.from_grpc_status(status.code, f"create item {job_id}/{gtin}: {status.message}")
                if not STORE_BATCH_WRITE.retry_if(fault):
                    raise fault
                transient = fault
            if transient is not None:
                raise transient  # the policy sends the writes still pending again

        if pending:
            STORE_BATCH_WRITE.call(attempt)
        if exists:
            # Items are never deleted, so each document that refused its create is there to read.
            refs = [self._item_ref(job_id, gtin) for gtin in exists]
            for snap in self.db.get_all(refs):
                results[snap.id] = Item.from_doc(snap.to_dict() or {}, snap.id, snap.update_time)
            missing = [gtin for gtin in exists if results.get(gtin) is None]
            if missing:
                raise gexc.InternalServerError(f"items {missing[:5]} of job {job_id} refused their create but "
                                               "could not be read")
        return results

    def count_never_claimed(self, job_id: str) -> int:
        """One `count()` aggregation with two equality filters (served by merging the single-field
        indexes; no composite index needed)."""
        from google.cloud.firestore_v1.base_query import FieldFilter

        query = (self._job_ref(job_id).collection(ITEMS)
                 .where(filter=FieldFilter("status", "==", ItemStatus.QUEUED.value))
                 .where(filter=FieldFilter("attempt", "==", 0)))
        result = query.count(alias="n").get()
        return int(result[0][0].value) if result and result[0] else 0

    def count_items_by_status(self, job_id: str) -> dict[str, int]:
        """One `count()` aggregation per status: an index scan each, no documents read. The counts run
        side by side: a progress check waits for the slowest one instead of their sum (on the
        emulator, whose count scans every stored item, the sum was seconds under load)."""
        from concurrent.futures import ThreadPoolExecutor

        from google.cloud.firestore_v1.base_query import FieldFilter

        items = self._job_ref(job_id).collection(ITEMS)

        def count(status: ItemStatus) -> int:
            result = items.where(filter=FieldFilter("status", "==", status.value)).count(alias="n").get()
            return int(result[0][0].value) if result and result[0] else 0

        statuses = list(ItemStatus)
        with ThreadPoolExecutor(len(statuses), thread_name_prefix="count") as pool:
            return {status.value: n for status, n in zip(statuses, pool.map(count, statuses))}

    def page_items(self, job_id: str, *, limit: int, status: str | None = None, round_: int | None = None,
                   after_gtin: str | None = None) -> list[Item]:
        from google.cloud.firestore_v1.base_query import FieldFilter

        col = self._job_ref(job_id).collection(ITEMS)
        query = col
        if status:
            query = query.where(filter=FieldFilter("status", "==", status))
        if round_ is not None:
            query = query.where(filter=FieldFilter("round", "==", round_))
        query = query.order_by("__name__")
        if after_gtin:
            query = query.start_after({"__name__": col.document(after_gtin)})
        return [Item.from_doc(d.to_dict() or {}, d.id, d.update_time) for d in query.limit(limit).stream()]

    def page_items_by_line(self, job_id: str, *, limit: int, after_line: int | None = None) -> list[Item]:
        col = self._job_ref(job_id).collection(ITEMS)
        query = col.order_by("line")  # single-field index (automatic); one item per line
        if after_line is not None:
            query = query.start_after({"line": after_line})
        return [Item.from_doc(d.to_dict() or {}, d.id, d.update_time) for d in query.limit(limit).stream()]

    def write_items_guarded(self, job_id: str, writes: list[tuple[Item, ItemWrite]]) -> bool:
        db = self.db
        batch = db.batch()
        for item, write in writes:
            if not isinstance(write, Update):
                raise TypeError(f"a guarded batch only updates existing items, got {type(write).__name__}")
            batch.update(self._item_ref(job_id, item.gtin), write.fields,
                         option=db.write_option(last_update_time=item.version))
        try:
            batch.commit()
        except _RACE_ERRORS:
            return False
        return True

    # ------------------------------------------------------------------------- lines and chunks

    def page_lines(self, job_id: str, *, limit: int, outcome: str | None = None,
                   after_id: str | None = None) -> list[tuple[str, dict]]:
        from google.cloud.firestore_v1.base_query import FieldFilter

        col = self._job_ref(job_id).collection(LINES)
        query = col
        if outcome:
            query = query.where(filter=FieldFilter("outcome", "==", outcome))
        query = query.order_by("__name__")
        if after_id:
            query = query.start_after({"__name__": col.document(after_id)})
        return [(d.id, d.to_dict() or {}) for d in query.limit(limit).stream()]

    def write_line_records(self, job_id: str, records: list[dict]) -> None:
        lines = self._job_ref(job_id).collection(LINES)
        for i in range(0, len(records), LINE_BATCH):
            batch = self.db.batch()
            for rec in records[i:i + LINE_BATCH]:
                batch.set(lines.document(line_doc_id(rec["line"])), rec)
            batch.commit()

    def get_chunk(self, job_id: str, start: int) -> dict | None:
        snap = self._job_ref(job_id).collection(CHUNKS).document(chunk_doc_id(start)).get()
        return (snap.to_dict() or {}) if snap.exists else None

    def put_chunk(self, job_id: str, start: int, doc: dict[str, Any]) -> None:
        self._job_ref(job_id).collection(CHUNKS).document(chunk_doc_id(start)).set(doc)

    def count_done_chunks(self, job_id: str) -> int:
        from google.cloud.firestore_v1.base_query import FieldFilter

        done = self._job_ref(job_id).collection(CHUNKS).where(filter=FieldFilter("status", "==", "done")).count().get()
        return int(done[0][0].value)

    def ping(self, timeout_s: float) -> None:
        self._job_ref("_health").get(timeout=timeout_s)


def _snapshot_data(snap) -> dict[str, Any]:
    """The snapshot's fields without `to_dict()`'s deep copy (a tenth of a worker delivery's CPU:
    every value of the item, its history included, copied once more). Safe for a snapshot read inside
    a transaction body and dropped at its end, which nothing else holds; `Item.from_doc` keeps its
    own shallow copy. tests/unit/test_raw_writes.py checks this against `to_dict()`."""
    data = getattr(snap, "_data", None)
    return data if isinstance(data, dict) else (snap.to_dict() or {})


def _bulk_batch(db):
    """A BatchWrite (non-atomic) batch of the client `db`."""
    from google.cloud.firestore_v1.bulk_batch import BulkWriteBatch

    return BulkWriteBatch(db)
