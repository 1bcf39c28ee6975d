"""Fan-out on the in-memory store (issue 15): items are born `queued` at fan-out, and that record,
not Cloud Tasks' task-name tombstones, decides duplicate-in-file; a generation gone mid-ingest fails
the job; a cancel during ingest leaves no item unaccounted.

Cloud Tasks is a fake here (`FakeTasks`: live names, tombstones, and `expire()` for "more than an
hour later"); the worker side runs the real claim/complete transitions and `process_item_delivery`.
"""

from __future__ import annotations

import datetime as dt
import itertools
import threading

import pytest
from google.api_core import exceptions as gexc

from shared import ingest, operations
from shared.events import Event
from shared.exceptions import SourceObjectNotFoundError
from shared.gcs import GcsObject
from shared.item_state import HandlerOutcome
from shared.payloads import ChunkTask, ItemTask
from shared.progress import check_job_progress, job_counts
from shared.store.memory import MemoryStore
from shared.worker import job_cache, process_item_delivery

JOB_ID = "f-abc123"
BUCKET, OBJECT, GENERATION = "upcfan-uploads", "dir/f.txt", 17
T0 = dt.datetime(2026, 11, 30, 9, 0, tzinfo=dt.timezone.utc)


def upc(n: int) -> str:
    body = f"{n:011d}"
    total = sum(int(d) * (3 if i % 2 == 0 else 1) for i, d in enumerate(body))
    return body + str((10 - total % 10) % 10)


class FakeTasks:
    """Named tasks as Cloud Tasks keeps them: a live or tombstoned name refuses a second create;
    `expire()` forgets the tombstones (Cloud Tasks keeps them about an hour)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.live: dict[str, dict] = {}
        self.tombstones: set[str] = set()
        self.created: list[str] = []
        self.queues: dict[str, str] = {}  # task id -> the queue it was created in
        self.fail_once: set[str] = set()  # task ids whose next create raises a transient fault

    def create(self, queue_path, spec) -> bool:
        with self.lock:
            if spec.task_id in self.fail_once:
                self.fail_once.discard(spec.task_id)
                raise gexc.ServiceUnavailable("CreateTask: injected outage")
            if spec.task_id in self.live or spec.task_id in self.tombstones:
                return False
            self.live[spec.task_id] = spec.payload
            self.created.append(spec.task_id)
            self.queues[spec.task_id] = queue_path
            return True

    def run_all(self, store: MemoryStore) -> None:
        """Deliver every live item task once through the real claim and complete transitions."""
        for task_id, payload in sorted(self.live.items()):
            task = ItemTask.model_validate(payload)
            claim = store.claim_item(task, task_id, "worker", T0, T0 + dt.timedelta(minutes=5))
            if claim.kind.value == "claimed":
                store.complete_item(task.job_id, task.gtin, "worker", T0, HandlerOutcome(result={"ok": True}))
            self.tombstones.add(task_id)
        self.live.clear()

    def deliver_all(self, store: MemoryStore, handler) -> list:
        """Deliver every live item task through `process_item_delivery` (the worker's whole path)."""
        job_cache.JOB_CACHE.clear()
        out = [process_item_delivery(payload, {"X-CloudTasks-TaskName": task_id}, store=store, handler=handler)
               for task_id, payload in sorted(self.live.items())]
        self.tombstones |= set(self.live)
        self.live.clear()
        return out

    def expire(self) -> None:
        self.tombstones.clear()


class MemFile:
    """The job's object generation in memory; `delete()` makes reads fail as GCS's 404 does."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.gone = False

    def read(self, start: int, end: int) -> bytes:
        return self.read_generation(GcsObject(BUCKET, OBJECT, GENERATION, self.size), start, end)

    def read_generation(self, obj: GcsObject, start: int, end: int) -> bytes:
        if self.gone:
            raise SourceObjectNotFoundError(f"{obj.gcs_path} generation {obj.generation} was deleted or replaced "
                                            "while it was being read", code="object_generation_gone")
        return self.data[start:end] if end > start else b""

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def gcs_path(self) -> str:
        return f"gs://{BUCKET}/{OBJECT}"


class Fanout:
    """One job in a fresh in-memory store, its chunks planned from `text` by the real `plan_file`."""

    def __init__(self, monkeypatch, text: str, chunk_bytes: int) -> None:
        self.file = MemFile(text.encode())
        self.tasks = FakeTasks()
        self.store = MemoryStore()
        monkeypatch.setattr(ingest, "create_task", self.tasks.create)
        monkeypatch.setattr(ingest, "item_queue_for", lambda task_id, lane: f"items:{lane}")
        monkeypatch.setattr(GcsObject, "read", lambda obj, start, end: self.file.read_generation(obj, start, end))
        plan = ingest.plan_file(self.file, chunk_bytes, 10**6)
        self.chunks = [ChunkTask(job_id=JOB_ID, bucket=BUCKET, object=OBJECT, generation=str(GENERATION),
                                 start=c.start, end=c.end, first_line=c.first_line, index=c.index)
                       for c in plan.chunks]
        self.store.create_job({
            "job_id": JOB_ID, "status": "ingesting", "bucket": BUCKET, "object": OBJECT,
            "generation": str(GENERATION), "gcs_path": f"gs://{BUCKET}/{OBJECT}", "options": {"handler": "dry_run"},
            "plan": {"format": plan.format.to_dict()}, "chunks_total": len(plan.chunks), "round": 1,
            "totals": None, "counts": {}, "fanout_done_at": None, "created_at": T0, "updated_at": T0,
        }, Event("created", "test", T0, {}, event_id="created"))

    def run(self, chunk: ChunkTask, **kwargs) -> ingest.ChunkResult:
        return ingest.process_chunk(chunk, store=self.store, **kwargs)

    @property
    def job(self) -> dict:
        return self.store.get_job(JOB_ID).doc

    def items(self) -> dict[str, dict]:
        return {g: doc for g, (_, doc) in self.store.items.get(JOB_ID, {}).items()}

    def lines(self) -> dict[int, dict]:
        return {int(k): v for k, v in self.store.lines.get(JOB_ID, {}).items()}


# Three chunks of 9 UPC lines each (13 bytes a line; chunk_bytes 116 cuts at the end of the 9th):
# chunk 0 lines 1-9, chunk 1 lines 10-18, chunk 2 lines 19-27, and GTINs repeated across them.
def three_chunk_text() -> tuple[str, int]:
    values = ([upc(n) for n in range(1, 10)]             # lines 1-9: items 1..9
              + [upc(n) for n in (1, 2, 10, 11, 12, 3, 13, 14, 10)]   # 10-18: 1, 2, 3 across; 10 within
              + [upc(n) for n in (4, 15, 16, 11, 17, 18, 19, 20, 5)])  # 19-27: 4, 11, 5 across
    return "\n".join(values) + "\n", 116


EXPECTED_TOTALS = {"lines": 27, "items": 20, "invalid": 0, "duplicate": 7, "skipped": 0}


def assert_exact(f: Fanout) -> None:
    check_job_progress(JOB_ID, store=f.store)  # the worker asks for it after its last item
    job = f.job
    items = f.items()
    assert job["totals"] == EXPECTED_TOTALS
    assert len(items) == job["totals"]["items"], "totals.items must equal the items born"
    assert len(f.tasks.created) == len(set(f.tasks.created)) == len(items), "one task per item, ever"
    lines = f.lines()
    assert sum(1 for r in lines.values() if r["outcome"] == "duplicate") == EXPECTED_TOTALS["duplicate"]
    item_lines = {doc["line"] for doc in items.values()}
    assert not item_lines & set(lines)  # every line is an item's or a record's, not both
    for n, rec in lines.items():
        owner = items[rec["gtin"]]
        assert rec["duplicate_of_line"] == owner["line"] != n


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))), ids=lambda o: "-".join(map(str, o)))
def test_duplicates_across_chunks_are_exact_in_any_order_with_tombstones_gone(monkeypatch, order):
    """Each chunk runs, its items are delivered and their task names forgotten before the next chunk
    runs (a control queue paused for hours): duplicates still count exactly and the job completes.
    Before issue 15 the later chunk's CreateTask succeeded on a forgotten name: the duplicate became
    a second task, `totals.items` exceeded the items ever created and the job never completed."""
    text, chunk_bytes = three_chunk_text()
    f = Fanout(monkeypatch, text, chunk_bytes)
    assert len(f.chunks) == 3
    for i in order:
        f.run(f.chunks[i])
        f.tasks.run_all(f.store)
        f.tasks.expire()
    assert_exact(f)
    assert f.job["status"] == "completed"


def test_items_are_born_queued_before_their_task_and_claimed_as_attempt_1(monkeypatch):
    text, chunk_bytes = three_chunk_text()
    f = Fanout(monkeypatch, text, chunk_bytes)
    f.run(f.chunks[0])
    items = f.items()
    assert len(items) == 9 and len(f.tasks.live) == 9
    doc = items[f"00{upc(1)}"]
    assert (doc["status"], doc["attempt"], doc["round"], doc["line"], doc["upc"]) == ("queued", 0, 1, 1, upc(1))
    assert doc["task_name"] in f.tasks.live and doc["finished_at"] is None and doc["lease_owner"] is None
    assert job_counts(JOB_ID, store=f.store)["never_claimed"] == 9
    f.tasks.run_all(f.store)
    doc = f.items()[f"00{upc(1)}"]
    assert (doc["status"], doc["attempt"]) == ("succeeded", 1)
    assert job_counts(JOB_ID, store=f.store)["never_claimed"] == 0


@pytest.mark.parametrize("between", ["nothing", "delivered_and_expired"])
def test_a_retried_chunk_counts_its_own_items_once(monkeypatch, between):
    """The chunk dies after 4 of its creates and Cloud Tasks retries it: at once (its task names are
    live), or hours later after its tasks ran (names forgotten). Either way its own items count
    once and no item gets a second task."""
    text, chunk_bytes = three_chunk_text()
    f = Fanout(monkeypatch, text, chunk_bytes)
    with pytest.raises(RuntimeError, match="injected crash"):
        f.run(f.chunks[1], crash_after_tasks=4)
    if between == "delivered_and_expired":
        f.tasks.run_all(f.store)
        f.tasks.expire()
    retry = f.run(f.chunks[1])
    assert (retry.items, retry.duplicate) == (8, 1)  # runs first: only line 18 (of line 12) is a duplicate
    assert retry.tasks_created == 8 - 4
    for c in (f.chunks[0], f.chunks[2]):
        f.run(c)
    f.tasks.run_all(f.store)
    assert_exact(f)
    assert f.job["status"] == "completed"


def test_an_item_born_without_its_task_gets_it_from_the_retry(monkeypatch):
    """CreateTask fails (after its own retries) for one item already born: the chunk fails, and its
    retry finds the item never claimed and creates the missing task."""
    text, chunk_bytes = three_chunk_text()
    f = Fanout(monkeypatch, text, chunk_bytes)
    from shared.naming import task_name_for

    lost = task_name_for(JOB_ID, f"00{upc(5)}", 1)
    f.tasks.fail_once.add(lost)
    with pytest.raises(gexc.ServiceUnavailable):
        f.run(f.chunks[0])
    assert f.items()[f"00{upc(5)}"]["status"] == "queued" and lost not in f.tasks.live
    assert f.run(f.chunks[0]).tasks_created == 1 and lost in f.tasks.live
    for c in f.chunks[1:]:
        f.run(c)
    f.tasks.run_all(f.store)
    assert_exact(f)


def test_an_operator_cancel_stops_moving_items_when_its_budget_is_spent(monkeypatch):
    """A big job has more queued items than one request can write: the cancel answers after its budget
    and says so; the remaining items are cancelled by their own deliveries."""
    text, chunk_bytes = three_chunk_text()
    f = Fanout(monkeypatch, text, chunk_bytes)
    f.run(f.chunks[0])
    f.store.cancel_job(JOB_ID, "ops", T0)
    monkeypatch.setattr(operations, "_PAGE", 2)
    assert operations._cancel_queued_items(f.store, JOB_ID, T0, budget_s=0.0) == (2, False)
    moved, finished = operations._cancel_queued_items(f.store, JOB_ID, T0)
    assert finished and moved == 7 and f.store.count_items_by_status(JOB_ID)["queued"] == 0


def test_a_job_cancelled_while_ingesting_accounts_for_every_line(monkeypatch):
    """Chunk 0 fans out; the operator cancels (its never-claimed items are cancelled at once); chunk
    1 crashed before the cancel with 3 items born, and runs again after it; chunk 2 runs only after
    the cancel. Every item ends `cancelled`, no handler runs, and the counts add up to the lines."""
    text, chunk_bytes = three_chunk_text()
    f = Fanout(monkeypatch, text, chunk_bytes)
    f.run(f.chunks[0])
    with pytest.raises(RuntimeError):
        f.run(f.chunks[1], crash_after_tasks=5)  # lines 10-14: two duplicates of chunk 0, 3 items born
    f.store.cancel_job(JOB_ID, "ops", T0)
    moved, finished = operations._cancel_queued_items(f.store, JOB_ID, T0)
    assert moved == 9 + 3 and finished  # never claimed, so not started: cancelled by the operator's cancel
    f.run(f.chunks[1])
    f.run(f.chunks[2])
    assert f.job["totals"] == EXPECTED_TOTALS and f.job["status"] == "cancelled"

    class MustNotRun:
        name = "must_not_run"

        def handle(self, ctx):
            raise AssertionError("a cancelled job's item ran its handler")

    answers = f.tasks.deliver_all(f.store, MustNotRun())
    assert answers and all(a.http_status == 200 for a in answers)
    statuses = {doc["status"] for doc in f.items().values()}
    assert statuses == {"cancelled"} and len(f.items()) == EXPECTED_TOTALS["items"]
    counts = job_counts(JOB_ID, store=f.store)
    assert counts["cancelled"] == 20 and counts["never_claimed"] == 0 and counts["unborn"] == 0
    # chunk 2 ran after the cancel: its items were born cancelled, with no task
    assert len(f.tasks.created) == 9 + 3


def test_a_generation_gone_mid_ingest_fails_the_job_and_nothing_else_runs(monkeypatch):
    text, chunk_bytes = three_chunk_text()
    f = Fanout(monkeypatch, text, chunk_bytes)
    f.run(f.chunks[0])
    f.file.gone = True  # deleted or overwritten after the plan, before the other chunks ran
    result = f.run(f.chunks[1])
    assert result.skipped_reason == "object_generation_gone"
    job = f.job
    assert job["status"] == "failed" and job["error"]["code"] == "object_generation_gone"
    assert f"gs://{BUCKET}/{OBJECT}#{GENERATION}" in job["error"]["message"]
    assert [e["type"] for _, e in f.store.events[JOB_ID]] == ["created", "failed"]
    assert f.run(f.chunks[2]).skipped_reason == "job failed"

    class MustNotRun:
        name = "must_not_run"

        def handle(self, ctx):
            raise AssertionError("a failed job's item ran its handler")

    answers = f.tasks.deliver_all(f.store, MustNotRun())
    assert len(answers) == 9 and all(a.http_status == 200 for a in answers)
    assert {doc["status"] for doc in f.items().values()} == {"cancelled"}


def test_the_fanout_route_answers_a_gone_generation_200(monkeypatch):
    """200 so the chunk task ends: a retry cannot bring the generation back (it was retried 20 times)."""
    from deployed_env import create_function_app

    seen = []
    monkeypatch.setattr(ingest, "process_chunk", lambda chunk: seen.append(chunk) or ingest.ChunkResult(
        JOB_ID, 0, skipped_reason="object_generation_gone"))
    resp = create_function_app("ingest").test_client().post("/fanout", json={
        "job_id": JOB_ID, "bucket": BUCKET, "object": OBJECT, "generation": str(GENERATION), "start": 0, "end": 9,
        "first_line": 1, "index": 0})
    assert resp.status_code == 200 and resp.get_json()["skipped_reason"] == "object_generation_gone"
    assert len(seen) == 1


@pytest.mark.parametrize("lane", ["small", "bulk", None])
def test_item_tasks_go_to_the_lane_recorded_on_the_job(monkeypatch, lane):
    """Issue 17, item 3: the lane is read from the job document (absent on older jobs: bulk)."""
    f = Fanout(monkeypatch, "036000291452\n4006381333931\n", 1024)
    if lane is not None:
        f.store.update_job(JOB_ID, {"item_lane": lane})
    for chunk in f.chunks:
        f.run(chunk)
    assert len(f.tasks.created) == 2
    assert set(f.tasks.queues.values()) == {f"items:{lane or 'bulk'}"}
