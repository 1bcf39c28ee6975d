"""Operator re-drive's store parts on the real Firestore emulator: the job's re-drive number and its
event in one transaction, the item write guarded on the item being unchanged (Firestore's update time),
and `redrive_job` over real item documents (Cloud Tasks through a recording fake client, as in
test_operations_firestore.py). Issue 15, item 5."""

from __future__ import annotations

import datetime as dt
import json
import uuid

import pytest
from google.api_core import exceptions as gexc

from shared import operations, tasks
from shared.clients import firestore_client, reset_clients
from shared.exceptions import ConflictError
from shared.item_state import Update
from shared.naming import redrive_task_name_for, task_name_for
from shared.store.firestore import FirestoreStore

NOW = dt.datetime(2026, 1, 2, 12, 0, 0, tzinfo=dt.timezone.utc)


class TasksFake:
    """get_task / create_task with the service's semantics: created names stay taken (tombstones)."""

    def __init__(self):
        self.live: dict[str, dict] = {}
        self.taken: set[str] = set()

    def get_task(self, name=None, request=None):
        name = name or request.name
        if name not in self.live:
            raise gexc.NotFound(f"Task {name} does not exist")
        return self.live[name]

    def create_task(self, parent, task):
        if task.name in self.taken:
            raise gexc.AlreadyExists(f"task {task.name} exists")
        self.taken.add(task.name)
        self.live[task.name] = {"payload": json.loads(task.http_request.body)}
        return task

    def end(self, task_id: str) -> None:
        self.live.pop(f"{tasks.item_queue_for(task_id)}/tasks/{task_id}", None)


@pytest.fixture
def env(firestore_emulator, monkeypatch):
    monkeypatch.setenv("UPCFAN_WORKER_URL", "http://127.0.0.1:9/worker")
    reset_clients()
    fake = TasksFake()
    monkeypatch.setattr(tasks, "tasks_client", lambda: fake)
    yield FirestoreStore(), fake
    reset_clients()


def gtin(n: int) -> str:
    body = f"{n:013d}"
    total = sum(int(d) * (3 if i % 2 == 0 else 1) for i, d in enumerate(body))
    return body + str((10 - total % 10) % 10)


def seed(status: str = "running", items: dict[int, tuple[str, float | None]] | None = None) -> str:
    """A job and its items {n: (status, lease seconds from NOW or None)}, written as documents."""
    db = firestore_client()
    job_id = f"r-{uuid.uuid4().hex[:12]}"
    ref = db.collection("jobs").document(job_id)
    ref.set({"job_id": job_id, "status": status, "round": 1, "gcs_path": f"gs://b/{job_id}.txt",
             "totals": {"items": len(items or {})}, "fanout_done_at": NOW - dt.timedelta(minutes=30),
             "created_at": NOW - dt.timedelta(hours=1), "updated_at": NOW - dt.timedelta(hours=1)})
    for n, (item_status, lease_s) in (items or {}).items():
        g = gtin(n)
        ref.collection("items").document(g).set({
            "job_id": job_id, "gtin": g, "upc": g[1:], "line": n, "status": item_status, "attempt": 1, "round": 1,
            "lease_owner": "t:0:x" if item_status == "processing" else None,
            "lease_expires_at": NOW + dt.timedelta(seconds=lease_s) if lease_s is not None else None,
            "task_name": task_name_for(job_id, g, 1), "history": [], "created_at": NOW, "updated_at": NOW})
    return job_id


def doc(job_id: str, g: str | None = None) -> dict:
    ref = firestore_client().collection("jobs").document(job_id)
    return (ref.collection("items").document(g) if g else ref).get().to_dict()


def events(job_id: str, type_: str) -> list[dict]:
    ref = firestore_client().collection("jobs").document(job_id).collection("events")
    return [e.to_dict() for e in ref.stream() if e.to_dict()["type"] == type_]


def test_begin_redrive_numbers_in_a_transaction_with_its_event(env):
    store, _ = env
    job_id = seed()
    assert [store.begin_redrive(job_id, "ops@x", NOW, items=k).n for k in (3, 1)] == [1, 2]
    assert doc(job_id)["redrive"] == {"n": 2, "actor": "ops@x", "at": NOW, "items": 1}
    evs = sorted(events(job_id, "redrive"), key=lambda e: e["details"]["n"])
    assert [(e["actor"], e["details"]["n"], e["details"]["items"]) for e in evs] == [("ops@x", 1, 3), ("ops@x", 2, 1)]
    done = seed(status="completed")
    with pytest.raises(ConflictError):
        store.begin_redrive(done, "ops@x", NOW, items=1)
    assert "redrive" not in doc(done) and events(done, "redrive") == []


def test_item_writes_apply_only_to_unchanged_items(env):
    store, _ = env
    job_id = seed(items={1: ("queued", None), 2: ("queued", None), 3: ("queued", None)})
    read = {i.gtin: i for i in store.page_items(job_id, limit=10)}
    # a delivery claims item 2 after it was read
    firestore_client().collection("jobs").document(job_id).collection("items").document(gtin(2)).update(
        {"status": "processing"})
    writes = [(item, Update({"task_name": f"new-{g}"})) for g, item in read.items()]
    written = store.write_items_if_unchanged(job_id, writes)
    assert sorted(i.gtin for i in written) == [gtin(1), gtin(3)]
    assert doc(job_id, gtin(1))["task_name"] == f"new-{gtin(1)}"
    assert doc(job_id, gtin(2))["task_name"] == task_name_for(job_id, gtin(2), 1)
    assert doc(job_id, gtin(2))["status"] == "processing"


def test_redrive_over_item_documents(env):
    store, fake = env
    job_id = seed(items={1: ("queued", None), 2: ("processing", -120), 3: ("processing", 600),
                         4: ("succeeded", None), 5: ("failed", None), 6: ("queued", None)})
    live = task_name_for(job_id, gtin(6), 1)
    fake.live[f"{tasks.item_queue_for(live)}/tasks/{live}"] = {}
    finals_before = {n: doc(job_id, gtin(n)) for n in (3, 4, 5, 6)}

    dry = operations.redrive_job(job_id, "ops@x", dry_run=True, now=NOW)
    assert [(r["gtin"], r["status"]) for r in dry["items"]] == [(gtin(1), "queued"), (gtin(2), "processing")]
    assert dry["examined"] == 3 and "redrive" not in doc(job_id) and fake.taken == set()

    out = operations.redrive_job(job_id, "ops@x", dry_run=False, now=NOW)
    assert out["redrive"] == 1 and out["tasks_created"] == 2
    for n in (1, 2):
        assert doc(job_id, gtin(n))["task_name"] == redrive_task_name_for(job_id, gtin(n), 1, 1)
    assert {n: doc(job_id, gtin(n)) for n in (3, 4, 5, 6)} == finals_before
    assert [e["details"]["items"] for e in events(job_id, "redrive")] == [2]

    again = operations.redrive_job(job_id, "ops@x", dry_run=False, now=NOW)
    assert again["redrive"] is None and again["items"] == [] and doc(job_id)["redrive"]["n"] == 1

    fake.end(redrive_task_name_for(job_id, gtin(1), 1, 1))
    third = operations.redrive_job(job_id, "ops@x", dry_run=False, now=NOW)
    assert [r["gtin"] for r in third["items"]] == [gtin(1)] and third["redrive"] == 2
    assert doc(job_id, gtin(1))["task_name"] == redrive_task_name_for(job_id, gtin(1), 1, 2)
