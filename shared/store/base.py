"""The persistence interface for jobs, their items, line records, chunks and events.

Shaped like the persistence layer of AWS Lambda Powertools' idempotency utility: a backend
implements a few small primitives (get, create, a transaction that reads one record and applies a
pure transition to it, paged queries, guarded batch writes); the typed operations the product uses
(`claim_item`, `complete_item`, `cancel_job`, …) are built once, here, on those primitives, from the
pure transitions in `shared/item_state.py` and `shared/job_state.py`. So the state machine is
written once and runs the same on Firestore (`firestore.py`) and in memory (`memory.py`, for unit tests).
"""

from __future__ import annotations

import abc
import collections
import datetime as dt
import threading
from typing import Any, Callable, Iterator, TypeVar

from shared import item_state, job_state
from shared.item_state import ItemWrite
from shared.events import Event
from shared.job_state import JobWrite
from shared.model import Item, Job
from shared.payloads import ItemTask

R = TypeVar("R")
ItemTransition = Callable[[Item | None], "tuple[Any, ItemWrite | None]"]
JobTransition = Callable[..., "tuple[Any, JobWrite | None]"]

# Writes per guarded batch when an operator action moves many items at once.
BATCH_WRITES = 200


# Item creates per `create_items` call: Firestore's BatchWrite takes at most 500 writes per request.
ITEM_CREATE_BATCH = 500


class TransactionCounter:
    """Counts transaction bodies run (retries included), by name: the happy path of an item must
    cost exactly two (claim, complete); tests and the worker bench assert on it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: collections.Counter[str] = collections.Counter()

    def add(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def total(self) -> int:
        with self._lock:
            return sum(self._counts.values())

    def reset(self) -> None:
        with self._lock:
            self._counts.clear()


TXN_COUNTER = TransactionCounter()


def valid_doc_id(value: Any) -> bool:
    """Whether `value` can name a document: Firestore rejects '/', '.', '..', '__x__' and very long
    ids, so such input names nothing and is refused before any request."""
    return (isinstance(value, str) and 0 < len(value) <= 200 and "/" not in value and value not in (".", "..")
            and not (value.startswith("__") and value.endswith("__")) and "\x00" not in value)


class Store(abc.ABC):
    """Jobs (`jobs/{job_id}`), items (`…/items/{gtin}`), line records (`…/lines/{line:09d}`), chunk
    records (`…/chunks/{start:012d}`) and events (`…/events/{id}`)."""

    # ----------------------------------------------------------------------------- primitives

    @abc.abstractmethod
    def transact_item(self, name: str, job_id: str, gtin: str, transition: ItemTransition, *,
                      must_commit: bool = False) -> Any:
        """Read the item, apply `transition(item | None) → (result, write | None)`, write, atomically;
        return the result. Lost races are retried (`shared.retry.STORE_TRANSACTION`, or
        `STORE_MUST_COMMIT` when `must_commit`); counted in TXN_COUNTER under `name`."""

    @abc.abstractmethod
    def transact_job(self, name: str, job_id: str, transition: JobTransition, *, with_chunks: bool = False) -> Any:
        """Read the job (and, with `with_chunks`, its chunk records) and apply
        `transition(job | None[, chunks]) → (result, JobWrite | None)` atomically; return the result."""

    @abc.abstractmethod
    def get_job(self, job_id: str) -> Job | None: ...

    @abc.abstractmethod
    def create_job(self, doc: dict[str, Any], created: Event) -> bool:
        """Create the job document with its `created` event; False when the job already exists."""

    @abc.abstractmethod
    def update_job(self, job_id: str, fields: dict[str, Any]) -> None:
        """Set these fields on the job, unconditionally (plans, the counts snapshot)."""

    @abc.abstractmethod
    def list_jobs(self, *, limit: int, status: str | None = None, gcs_path: str | None = None,
                  after_job_id: str | None = None) -> list[Job] | None:
        """Newest first (by `created_at`), optionally of one status or one gs:// path; None when
        `after_job_id` (the previous page's last job) names no job."""

    @abc.abstractmethod
    def record_event(self, job_id: str, event: Event) -> None: ...

    @abc.abstractmethod
    def page_events(self, job_id: str, *, limit: int, after_id: str | None = None) -> list[tuple[str, dict]] | None:
        """The job's events as (id, document), oldest first (by `at`, then id), after the event
        `after_id` (the previous page's last); None when `after_id` names no event of the job."""

    @abc.abstractmethod
    def get_item(self, job_id: str, gtin: str) -> Item | None: ...

    @abc.abstractmethod
    def create_item(self, job_id: str, gtin: str, doc: dict[str, Any]) -> Item | None:
        """Create the item document if absent (one write, no transaction): None when this call created
        it, else the item that already exists (whoever created it first owns the GTIN)."""

    @abc.abstractmethod
    def create_items(self, job_id: str, docs: dict[str, dict[str, Any]]) -> dict[str, Item | None]:
        """`create_item` for many items at once (gtin -> doc, at most `ITEM_CREATE_BATCH`), each write
        on its own (not all-or-nothing): gtin -> None when this call created it, else the item that
        already exists. A write that fails otherwise is retried or raised; nothing is left unanswered."""

    @abc.abstractmethod
    def count_never_claimed(self, job_id: str) -> int:
        """Items born at fan-out that no delivery has claimed yet (`queued`, attempt 0)."""

    @abc.abstractmethod
    def count_items_by_status(self, job_id: str) -> dict[str, int]:
        """Items per status (every `ItemStatus`, zeros included), without reading the items."""

    @abc.abstractmethod
    def page_items(self, job_id: str, *, limit: int, status: str | None = None, round_: int | None = None,
                   after_gtin: str | None = None) -> list[Item]:
        """Up to `limit` items ordered by gtin (the document id), after `after_gtin`."""

    @abc.abstractmethod
    def page_items_by_line(self, job_id: str, *, limit: int, after_line: int | None = None) -> list[Item]:
        """Up to `limit` items ordered by their file line (unique per item), after `after_line`."""

    @abc.abstractmethod
    def write_items_guarded(self, job_id: str, writes: list[tuple[Item, ItemWrite]]) -> bool:
        """Apply updates to items all-or-nothing, each only if the item is unchanged since it was read
        (`Item.version`); False when any moved (then nothing was written)."""

    @abc.abstractmethod
    def page_lines(self, job_id: str, *, limit: int, outcome: str | None = None,
                   after_id: str | None = None) -> list[tuple[str, dict]]:
        """Invalid / duplicate line records as (id, record), ordered by id."""

    @abc.abstractmethod
    def write_line_records(self, job_id: str, records: list[dict]) -> None: ...

    @abc.abstractmethod
    def get_chunk(self, job_id: str, start: int) -> dict | None: ...

    @abc.abstractmethod
    def put_chunk(self, job_id: str, start: int, doc: dict[str, Any]) -> None: ...

    @abc.abstractmethod
    def count_done_chunks(self, job_id: str) -> int: ...

    @abc.abstractmethod
    def ping(self, timeout_s: float) -> None:
        """One cheap read; raises when the store cannot be reached."""

    # ----------------------------------------------------------------------------- items

    def claim_item(self, task: ItemTask, task_name: str, owner: str, at: dt.datetime,
                   lease_until: dt.datetime) -> item_state.Claim:
        return self.transact_item("claim", task.job_id, task.gtin,
                                  lambda item: item_state.claim(item, task, task_name, owner, at, lease_until))

    def extend_lease(self, job_id: str, gtin: str, owner: str, at: dt.datetime, lease_until: dt.datetime) -> bool:
        return self.transact_item("heartbeat", job_id, gtin,
                                  lambda item: item_state.extend_lease(item, owner, at, lease_until))

    def complete_item(self, job_id: str, gtin: str, owner: str, at: dt.datetime,
                      outcome: item_state.HandlerOutcome) -> item_state.CompleteKind:
        # A finished handler's outcome must not be lost to a passing fault: that costs a second run.
        return self.transact_item("complete", job_id, gtin,
                                  lambda item: item_state.complete(item, owner, at, outcome), must_commit=True)

    def cancel_item_of_cancelled_job(self, task: ItemTask, task_name: str, owner: str,
                                     at: dt.datetime) -> item_state.CancelKind:
        return self.transact_item("cancel", task.job_id, task.gtin,
                                  lambda item: item_state.cancel_for_cancelled_job(item, task, task_name, owner, at))

    def iter_items(self, job_id: str, *, status: str | None = None, round_: int | None = None,
                   page: int = 300) -> Iterator[Item]:
        """Every matching item, in pages ordered by gtin, so writes to earlier pages do not shift it."""
        after: str | None = None
        while True:
            items = self.page_items(job_id, limit=page, status=status, round_=round_, after_gtin=after)
            yield from items
            if len(items) < page:
                return
            after = items[-1].gtin

    def apply_to_items(self, name: str, job_id: str, items: list[Item],
                       transition: ItemTransition) -> list[tuple[Item, Any]]:
        """Apply `transition` to many items: guarded batches of the writes decided on what was read;
        a batch that lost a race (an item moved since) falls back to one transaction per item.
        Returns (item as read, result) for every item whose transition wrote."""
        applied: list[tuple[Item, Any]] = []
        for start in range(0, len(items), BATCH_WRITES):
            decided = [(item, *transition(item)) for item in items[start:start + BATCH_WRITES]]
            writes = [(item, write) for item, _result, write in decided if write is not None]
            if not writes:
                continue
            if self.write_items_guarded(job_id, writes):
                applied.extend((item, result) for item, result, write in decided if write is not None)
                continue
            for item, _result, _write in decided:
                wrote: list[bool] = []

                def tracked(current: Item | None) -> tuple[Any, ItemWrite | None]:
                    result, write = transition(current)
                    wrote[:] = [write is not None]
                    return result, write

                result = self.transact_item(name, job_id, item.gtin, tracked)
                if wrote and wrote[0]:
                    applied.append((item, result))
        return applied

    def write_items_if_unchanged(self, job_id: str, writes: list[tuple[Item, ItemWrite]]) -> list[Item]:
        """Apply each update only if its item is unchanged since it was read (`Item.version`), never
        deciding anew: guarded batches, and per item when a batch lost a race. Returns the items written."""
        written: list[Item] = []
        for start in range(0, len(writes), BATCH_WRITES):
            batch = writes[start:start + BATCH_WRITES]
            if self.write_items_guarded(job_id, batch):
                written += [item for item, _ in batch]
                continue
            written += [item for item, write in batch if self.write_items_guarded(job_id, [(item, write)])]
        return written

    # ----------------------------------------------------------------------------- jobs

    def begin_progress_check(self, job_id: str, at: dt.datetime, until: dt.datetime) -> tuple[Job | None, bool]:
        return self.transact_job("begin_progress_check", job_id,
                                 lambda job: job_state.begin_progress_check(job, at, until))

    def complete_job(self, job_id: str, counts: dict[str, int], at: dt.datetime) -> job_state.Completion:
        return self.transact_job("complete_job", job_id, lambda job: job_state.complete(job, counts, at))

    def fail_job(self, job_id: str, error: dict, at: dt.datetime) -> dict:
        return self.transact_job("fail_job", job_id, lambda job: job_state.fail(job, error, at))

    def finish_fanout(self, job_id: str, at: dt.datetime) -> dict | None:
        return self.transact_job("finish_fanout", job_id,
                                 lambda job, chunks: job_state.finish_fanout(job, chunks, at), with_chunks=True)

    def cancel_job(self, job_id: str, actor: str, at: dt.datetime) -> bool:
        return self.transact_job("cancel_job", job_id, lambda job: job_state.cancel(job, job_id, actor, at))

    def pause_job(self, job_id: str, reason: dict, actor: str, at: dt.datetime,
                  evidence_at: dt.datetime | None = None) -> job_state.PauseResult:
        return self.transact_job("pause_job", job_id,
                                 lambda job: job_state.pause(job, job_id, reason, actor, at, evidence_at))

    def resume_job(self, job_id: str, actor: str, at: dt.datetime) -> job_state.PauseResult:
        return self.transact_job("resume_job", job_id, lambda job: job_state.resume(job, job_id, actor, at))

    def stop_item_for_job(self, job_id: str, gtin: str, owner: str, at: dt.datetime, *, cancelled: bool,
                          side_effects_started: bool = False) -> item_state.StopKind:
        return self.transact_item("stop", job_id, gtin,
                                  lambda item: item_state.stop_for_job(item, owner, at, cancelled=cancelled,
                                                                       side_effects_started=side_effects_started),
                                  must_commit=True)

    def begin_retry_round(self, job_id: str, actor: str, at: dt.datetime, failed: int) -> job_state.RetryRound:
        return self.transact_job("begin_retry", job_id,
                                 lambda job: job_state.begin_retry_round(job, job_id, actor, at, failed))

    def finish_retry_round(self, job_id: str, round_: int, at: dt.datetime, requeued: int, created: int) -> bool:
        return self.transact_job("finish_retry", job_id,
                                 lambda job: job_state.finish_retry_round(job, round_, at, requeued, created))

    def begin_redrive(self, job_id: str, actor: str, at: dt.datetime, items: int) -> job_state.Redrive:
        return self.transact_job("begin_redrive", job_id,
                                 lambda job: job_state.begin_redrive(job, job_id, actor, at, items))
