"""Ingest reliability on the full local stack (issue 15): duplicate-in-file decided from the item
documents even after Cloud Tasks has forgotten the task names, and a file deleted mid-ingest failing
its job at once.

Both tests pause the control queue so the order of events is fixed: the job's plan task and its
first chunk task are run by hand (Cloud Tasks' RunTask dispatches a task of a paused queue), the
rest of the file waits in the paused queue until the test resumes it.
"""

from __future__ import annotations

import random

import pytest
from google.cloud import tasks_v2

from devstack.cloudtasks import client as ct
from devstack.testing import fresh_upcs, gtin14, poll, wait_job
from shared.model import CHUNKS, ITEMS, JOBS, LINES
from shared.naming import chunk_doc_id, chunk_task_name_for, plan_task_name_for, task_name_for

pytestmark = pytest.mark.integration

DRY_RUN = {"upcfan-handler": "dry_run"}
# Comment lines (skipped, no task) that push what follows past the first chunk (UPCFAN_CHUNK_BYTES,
# 256 KiB in the stack): the file is two chunks, the second starting inside the padding.
PADDING_LINES = 2200
PADDING = ("# " + "x" * 125 + "\n") * PADDING_LINES  # ~282 KB


def queue_id(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def manual_blob(storage_client, stack_env, text: str):
    """An object outside the watched bucket: no finalize event races the test, it submits the file."""
    bucket = storage_client.bucket(stack_env["UPCFAN_BUCKET"] + "-manual")
    if not bucket.exists():
        bucket.create()
    blob = bucket.blob(f"reliability/{random.randrange(10**9)}.txt")
    blob.metadata = DRY_RUN
    blob.upload_from_string(text)
    return blob


class PausedIngest:
    """A job submitted while the control queue is paused; `run(task_id)` dispatches one of its tasks."""

    def __init__(self, operator, stack_env, firestore_db, tasks_client, blob) -> None:
        self.env, self.db, self.tasks = stack_env, firestore_db, tasks_client
        self.control = stack_env["UPCFAN_CONTROL_QUEUE"]
        r = operator.post(stack_env["UPCFAN_INGEST_URL"], json={"gcs_path": f"gs://{blob.bucket.name}/{blob.name}"},
                          timeout=60)
        assert r.status_code == 202, r.text
        self.job_id = r.json()["job_id"]
        self.generation = r.json()["generation"]

    def run(self, task_id: str) -> None:
        self.tasks.run_task(request=tasks_v2.RunTaskRequest(name=f"{self.control}/tasks/{task_id}"))

    @property
    def job(self) -> dict:
        return self.db.collection(JOBS).document(self.job_id).get().to_dict() or {}

    def plan(self) -> None:
        self.run(plan_task_name_for(self.job_id))
        poll(lambda: self.job.get("planned_at") and self.job.get("chunks_total") == 2, 60, 0.2, "the plan (2 chunks)")

    def first_chunk(self) -> None:
        self.run(chunk_task_name_for(self.job_id, 0))
        ref = self.db.collection(JOBS).document(self.job_id).collection(CHUNKS).document(chunk_doc_id(0))
        poll(lambda: (ref.get().to_dict() or {}).get("status") == "done", 60, 0.2, "the first chunk done")

    def items(self) -> dict[str, dict]:
        col = self.db.collection(JOBS).document(self.job_id).collection(ITEMS)
        return {d.id: d.to_dict() for d in col.stream()}


@pytest.fixture
def paused_control(stack_env, tasks_client):
    tasks_client.pause_queue(name=stack_env["UPCFAN_CONTROL_QUEUE"])
    try:
        yield
    finally:
        tasks_client.resume_queue(name=stack_env["UPCFAN_CONTROL_QUEUE"])


@pytest.fixture
def short_tombstones(stack_env):
    """Cloud Tasks keeps an ended task's name about an hour; here one second."""
    host = stack_env["CLOUD_TASKS_EMULATOR_HOST"]
    before = ct.get_config(host)["tombstone_seconds"]
    ct.set_config(host, tombstone_seconds=1)
    try:
        yield host
    finally:
        ct.set_config(host, tombstone_seconds=before)


def test_duplicates_stay_exact_after_the_task_names_are_forgotten(operator, stack_env, firestore_db, tasks_client,
                                                                  storage_client, short_tombstones, paused_control):
    """The first chunk fans out and its items finish; the control queue stays paused until Cloud Tasks
    has forgotten every task name; then the second chunk, which repeats 10 GTINs of the first, runs.
    Before issue 15 its CreateTasks succeeded on the forgotten names: 10 duplicates counted as new
    items, `totals.items` 60 for 50 items ever created, and the job never completed."""
    host = short_tombstones
    first, second = fresh_upcs(30), fresh_upcs(20)
    repeated = first[:10]
    blob = manual_blob(storage_client, stack_env, "\n".join(first) + "\n" + PADDING + "\n".join(second + repeated) + "\n")
    ingest = PausedIngest(operator, stack_env, firestore_db, tasks_client, blob)
    ingest.plan()
    ingest.first_chunk()
    poll(lambda: sum(1 for d in ingest.items().values() if d["status"] == "succeeded") == 30, 90, 0.3,
         "the first chunk's 30 items to succeed")
    # Every ended task's name is forgotten (the emulator's janitor drops expired tombstones).
    poll(lambda: ct.stats(host)["tombstones"] == 0, 30, 0.5, "every tombstone to expire")

    tasks_client.resume_queue(name=stack_env["UPCFAN_CONTROL_QUEUE"])
    job = wait_job(firestore_db, ingest.job_id, {"completed"}, timeout_s=120)
    assert job["totals"] == {"lines": 60, "items": 50, "invalid": 0, "duplicate": 10, "skipped": PADDING_LINES}
    items = ingest.items()
    assert len(items) == job["totals"]["items"] and {d["status"] for d in items.values()} == {"succeeded"}
    lines = [d.to_dict() for d in firestore_db.collection(JOBS).document(ingest.job_id).collection(LINES).stream()]
    first_line_of = {gtin14(u): i + 1 for i, u in enumerate(first)}
    assert sorted((r["gtin"], r["duplicate_of_line"]) for r in lines) == \
        sorted((gtin14(u), first_line_of[gtin14(u)]) for u in repeated)
    assert all(r["outcome"] == "duplicate" and r["code"] == "duplicate_in_file" for r in lines)
    queue = queue_id(stack_env["UPCFAN_QUEUE"])
    for upc in repeated:  # the repeated GTINs were never given a second task
        attempts = ct.attempts(host, queue, task_name_for(ingest.job_id, gtin14(upc), 1))
        assert [a["status"] for a in attempts] == [200], (upc, attempts)
        assert items[gtin14(upc)]["attempt"] == 1


def test_a_file_deleted_mid_ingest_fails_the_job_at_once(operator, stack_env, firestore_db, tasks_client,
                                                         storage_client, paused_control):
    """Planned, first chunk fanned out (its items held in a paused item queue), then the object is
    deleted before the second chunk runs: the job ends `failed` with `object_generation_gone` naming
    the generation, the chunk task ends at its first attempt, and the enqueued items run no handler.
    Before issue 15 the chunk answered 404 twenty times and the job stayed `ingesting` forever."""
    host = stack_env["CLOUD_TASKS_EMULATOR_HOST"]
    items_queue = stack_env["UPCFAN_QUEUE"]
    text = "\n".join(fresh_upcs(30)) + "\n" + PADDING + "\n".join(fresh_upcs(20)) + "\n"
    blob = manual_blob(storage_client, stack_env, text)
    ingest = PausedIngest(operator, stack_env, firestore_db, tasks_client, blob)
    tasks_client.pause_queue(name=items_queue)
    try:
        ingest.plan()
        ingest.first_chunk()
        assert {d["status"] for d in ingest.items().values()} == {"queued"} and len(ingest.items()) == 30
        blob.delete()
        tasks_client.resume_queue(name=stack_env["UPCFAN_CONTROL_QUEUE"])
        job = wait_job(firestore_db, ingest.job_id, {"failed"}, timeout_s=60)
    finally:
        tasks_client.resume_queue(name=items_queue)
    assert job["error"]["code"] == "object_generation_gone"
    assert f"gs://{blob.bucket.name}/{blob.name}#{ingest.generation}" in job["error"]["message"]
    second = chunk_task_name_for(ingest.job_id, second_chunk_start(text))
    attempts = ct.attempts(host, queue_id(stack_env["UPCFAN_CONTROL_QUEUE"]), second)
    assert [a["status"] for a in attempts] == [200], attempts
    # The items enqueued before the failure end cancelled: no delivery ran their handler.
    poll(lambda: {d["status"] for d in ingest.items().values()} == {"cancelled"}, 60, 0.3,
         "the failed job's items to end cancelled")
    assert all(d["attempt"] == 0 for d in ingest.items().values())


def second_chunk_start(text: str) -> int:
    """Where the plan cuts the file: the first line start past UPCFAN_CHUNK_BYTES (`plan_file`)."""
    from shared.config import settings

    return text.encode().index(b"\n", settings().chunk_bytes) + 1
