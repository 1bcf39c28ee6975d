"""An in-memory `Store` for unit tests: the same transitions as Firestore, atomic under one lock.

It keeps documents as plain dicts (copies in and out, so a caller never shares state with the
store) and a version counter per document for guarded writes. It is a fake: integration and
functional tests run on the Firestore emulator.
"""

from __future__ import annotations

import copy
import itertools
import threading
from typing import Any

from shared.item_state import Create, ItemWrite, Update
from shared.events import Event
from shared.model import ItemStatus, Item, Job
from shared.naming import line_doc_id
from shared.store.base import TXN_COUNTER, ItemTransition, JobTransition, Store


class MemoryStore(Store):
    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._versions = itertools.count(1)
        self.jobs: dict[str, dict] = {}
        self.items: dict[str, dict[str, tuple[int, dict]]] = {}  # job → gtin → (version, doc)
        self.lines: dict[str, dict[str, dict]] = {}
        self.chunks: dict[str, dict[int, dict]] = {}
        self.events: dict[str, list[tuple[str, dict]]] = {}
        self._event_ids = itertools.count(1)

    # ------------------------------------------------------------------------- transactions

    def transact_item(self, name: str, job_id: str, gtin: str, transition: ItemTransition, *,
                      must_commit: bool = False) -> Any:
        with self._lock:
            TXN_COUNTER.add(name)
            result, write = transition(self.get_item(job_id, gtin))
            if write is not None:
                self._apply_item_write(job_id, gtin, write)
            return result

    def transact_job(self, name: str, job_id: str, transition: JobTransition, *, with_chunks: bool = False) -> Any:
        with self._lock:
            TXN_COUNTER.add(name)
            job = self.get_job(job_id)
            if with_chunks:
                chunks = [copy.deepcopy(c) for _, c in sorted(self.chunks.get(job_id, {}).items())]
                result, write = transition(job, chunks)
            else:
                result, write = transition(job)
            if write is not None:
                self.jobs[job_id].update(copy.deepcopy(write.fields))
                for event in write.events:
                    self.record_event(job_id, event)
            return result

    def _apply_item_write(self, job_id: str, gtin: str, write: ItemWrite) -> None:
        items = self.items.setdefault(job_id, {})
        if isinstance(write, Create):
            if gtin in items:
                raise AssertionError(f"create of an existing item {job_id}/{gtin}")
            items[gtin] = (next(self._versions), copy.deepcopy(write.doc))
        elif isinstance(write, Update):
            if gtin not in items:
                raise AssertionError(f"update of a missing item {job_id}/{gtin}")
            doc = {**items[gtin][1], **copy.deepcopy(write.fields)}
            items[gtin] = (next(self._versions), doc)

    # ------------------------------------------------------------------------- jobs

    def get_job(self, job_id: str) -> Job | None:
        with self._lock:
            doc = self.jobs.get(job_id)
            return Job.from_doc(copy.deepcopy(doc), job_id) if doc is not None else None

    def create_job(self, doc: dict[str, Any], created: Event) -> bool:
        with self._lock:
            if doc["job_id"] in self.jobs:
                return False
            self.jobs[doc["job_id"]] = copy.deepcopy(doc)
            self.record_event(doc["job_id"], created)
            return True

    def update_job(self, job_id: str, fields: dict[str, Any]) -> None:
        with self._lock:
            if job_id not in self.jobs:
                raise KeyError(f"update of a missing job {job_id}")
            self.jobs[job_id].update(copy.deepcopy(fields))

    def list_jobs(self, *, limit: int, status: str | None = None, gcs_path: str | None = None,
                  after_job_id: str | None = None) -> list[Job] | None:
        with self._lock:
            if after_job_id and after_job_id not in self.jobs:
                return None
            rows = [(d.get("created_at"), job_id) for job_id, d in self.jobs.items()
                    if (not status or d.get("status") == status) and (not gcs_path or d.get("gcs_path") == gcs_path)]
            rows.sort(key=lambda r: (r[0], r[1]), reverse=True)
            ids = [job_id for _, job_id in rows]
            if after_job_id:
                after = (self.jobs[after_job_id].get("created_at"), after_job_id)
                ids = [job_id for created, job_id in rows if (created, job_id) < after]
            return [self.get_job(job_id) for job_id in ids[:limit]]

    def record_event(self, job_id: str, event: Event) -> None:
        with self._lock:
            events = self.events.setdefault(job_id, [])
            if event.event_id and any(eid == event.event_id for eid, _ in events):
                events[:] = [(eid, d) for eid, d in events if eid != event.event_id]
            events.append((event.event_id or f"auto-{next(self._event_ids):012d}", event.to_doc()))

    def page_events(self, job_id: str, *, limit: int, after_id: str | None = None) -> list[tuple[str, dict]] | None:
        with self._lock:
            rows = sorted(((eid, copy.deepcopy(d)) for eid, d in self.events.get(job_id, [])),
                          key=lambda r: (r[1]["at"], r[0]))
            if after_id is not None:
                keys = [(d["at"], eid) for eid, d in rows if eid == after_id]
                if not keys:
                    return None
                rows = [r for r in rows if (r[1]["at"], r[0]) > keys[0]]
            return rows[:limit]

    # ------------------------------------------------------------------------- items

    def get_item(self, job_id: str, gtin: str) -> Item | None:
        with self._lock:
            hit = self.items.get(job_id, {}).get(gtin)
            return Item.from_doc(copy.deepcopy(hit[1]), gtin, hit[0]) if hit else None

    def create_item(self, job_id: str, gtin: str, doc: dict[str, Any]) -> Item | None:
        with self._lock:
            if gtin in self.items.get(job_id, {}):
                return self.get_item(job_id, gtin)
            self._apply_item_write(job_id, gtin, Create(doc))
            return None

    def create_items(self, job_id: str, docs: dict[str, dict[str, Any]]) -> dict[str, Item | None]:
        return {gtin: self.create_item(job_id, gtin, doc) for gtin, doc in docs.items()}

    def count_never_claimed(self, job_id: str) -> int:
        with self._lock:
            return sum(1 for _, doc in self.items.get(job_id, {}).values()
                       if doc.get("status") == ItemStatus.QUEUED.value and int(doc.get("attempt") or 0) == 0)

    def count_items_by_status(self, job_id: str) -> dict[str, int]:
        with self._lock:
            docs = [doc for _, doc in self.items.get(job_id, {}).values()]
            return {s.value: sum(1 for d in docs if d.get("status") == s.value) for s in ItemStatus}

    def page_items(self, job_id: str, *, limit: int, status: str | None = None, round_: int | None = None,
                   after_gtin: str | None = None) -> list[Item]:
        with self._lock:
            gtins = sorted(g for g, (_, d) in self.items.get(job_id, {}).items()
                           if (not status or d.get("status") == status)
                           and (round_ is None or d.get("round") == round_)
                           and (after_gtin is None or g > after_gtin))
            return [self.get_item(job_id, g) for g in gtins[:limit]]

    def page_items_by_line(self, job_id: str, *, limit: int, after_line: int | None = None) -> list[Item]:
        with self._lock:
            rows = sorted((int(d.get("line") or 0), g) for g, (_, d) in self.items.get(job_id, {}).items()
                          if after_line is None or int(d.get("line") or 0) > after_line)
            return [self.get_item(job_id, g) for _, g in rows[:limit]]

    def write_items_guarded(self, job_id: str, writes: list[tuple[Item, ItemWrite]]) -> bool:
        with self._lock:
            items = self.items.get(job_id, {})
            if any(item.gtin not in items or items[item.gtin][0] != item.version for item, _ in writes):
                return False
            for item, write in writes:
                self._apply_item_write(job_id, item.gtin, write)
            return True

    # ------------------------------------------------------------------------- lines and chunks

    def page_lines(self, job_id: str, *, limit: int, outcome: str | None = None,
                   after_id: str | None = None) -> list[tuple[str, dict]]:
        with self._lock:
            rows = sorted((i, copy.deepcopy(d)) for i, d in self.lines.get(job_id, {}).items()
                          if (not outcome or d.get("outcome") == outcome) and (after_id is None or i > after_id))
            return rows[:limit]

    def write_line_records(self, job_id: str, records: list[dict]) -> None:
        with self._lock:
            lines = self.lines.setdefault(job_id, {})
            for rec in records:
                lines[line_doc_id(rec["line"])] = copy.deepcopy(rec)

    def get_chunk(self, job_id: str, start: int) -> dict | None:
        with self._lock:
            doc = self.chunks.get(job_id, {}).get(start)
            return copy.deepcopy(doc) if doc is not None else None

    def put_chunk(self, job_id: str, start: int, doc: dict[str, Any]) -> None:
        with self._lock:
            self.chunks.setdefault(job_id, {})[start] = copy.deepcopy(doc)

    def count_done_chunks(self, job_id: str) -> int:
        with self._lock:
            return sum(1 for d in self.chunks.get(job_id, {}).values() if d.get("status") == "done")

    def ping(self, timeout_s: float) -> None:
        return None
