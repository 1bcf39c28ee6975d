"""Issue 14, defect 12: a job's file is planned by its own task, never inside the request or event that
started it (Eventarc redelivers an event whose push is not acknowledged in time; the API's request
timeout is 60 s). Unit tier: the in-memory store, GCS and Cloud Tasks replaced by recorders."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from shared import ingest
from shared.config import settings
from shared.exceptions import SourceObjectNotFoundError
from shared.naming import job_id_for, plan_task_name_for
from shared.payloads import PlanTask
from shared.store.memory import MemoryStore
from shared.tasks import CHUNK_TASK, PLAN_TASK

DATA = b"036000291452\n4006381333931\n"


@dataclass
class RecordingObject:
    bucket: str = "upcfan-uploads"
    name: str = "in/file.txt"
    generation: int = 7
    data: bytes = DATA
    content_type: str = "text/plain"
    metadata: dict = field(default_factory=dict)
    bytes_read: int = 0

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def gcs_path(self) -> str:
        return f"gs://{self.bucket}/{self.name}"

    def read(self, start: int, end: int) -> bytes:
        out = self.data[start:end]
        self.bytes_read += len(out)
        return out


@pytest.fixture()
def world(monkeypatch):
    store, obj, tasks, existing = MemoryStore(), RecordingObject(), [], set()

    def stat(bucket, name, generation=None):
        if obj.data is None:
            raise SourceObjectNotFoundError(f"gs://{bucket}/{name}#{generation} does not exist")
        return obj

    def create_task(queue_path, spec):
        tasks.append(spec)
        created = spec.task_id not in existing
        existing.add(spec.task_id)
        return created

    monkeypatch.setattr(ingest.GcsObject, "stat", staticmethod(stat))
    monkeypatch.setattr(ingest, "create_task", create_task)
    monkeypatch.setattr(ingest, "default_store", lambda: store)
    monkeypatch.setenv("UPCFAN_BUCKET", obj.bucket)  # the watched bucket: jobs come only from allowed buckets
    monkeypatch.setenv("UPCFAN_DEFAULT_HANDLER", "dry_run")
    settings.cache_clear()
    yield store, obj, tasks
    settings.cache_clear()


def test_submit_creates_the_job_and_its_one_plan_task_and_reads_no_byte(world):
    store, obj, tasks = world
    first = ingest.submit_job("gs://upcfan-uploads/in/file.txt", source="event")
    again = ingest.submit_job("gs://upcfan-uploads/in/file.txt", source="http")  # a redelivered event, a re-sent POST

    job_id = job_id_for(obj.bucket, obj.name, obj.generation)
    assert first.job_id == again.job_id == job_id and first.created and not again.created
    assert first.status == "ingesting" and first.error is None
    assert obj.bytes_read == 0  # nothing of the file is read while the caller waits
    assert [(t.kind, t.task_id, t.payload) for t in tasks] == [(PLAN_TASK, plan_task_name_for(job_id), {"job_id": job_id})] * 2
    assert not store.get_job(job_id).doc.get("planned_at")


def test_the_plan_task_reads_the_generation_named_by_the_job_and_creates_the_chunk_tasks(world):
    store, obj, tasks = world
    job_id = ingest.submit_job("gs://upcfan-uploads/in/file.txt").job_id
    tasks.clear()

    doc = ingest.plan_job(PlanTask(job_id=job_id))
    assert doc["planned_at"] and doc["chunks_total"] == 1 and doc["plan"]["raw_lines"] == 2
    assert obj.bytes_read >= len(DATA)  # the whole file, streamed (the format sniff reads its head again)
    assert [t.kind for t in tasks] == [CHUNK_TASK]
    assert tasks[0].payload["generation"] == "7" and tasks[0].payload["object"] == obj.name

    # planned once: a repeated plan task changes nothing and creates nothing
    ingest.plan_job(PlanTask(job_id=job_id))
    assert [t.kind for t in tasks] == [CHUNK_TASK]


def test_a_generation_gone_before_planning_fails_the_job_instead_of_retrying(world):
    store, obj, tasks = world
    job_id = ingest.submit_job("gs://upcfan-uploads/in/file.txt").job_id
    obj.data = None  # replaced or deleted after the event
    doc = ingest.plan_job(PlanTask(job_id=job_id))
    assert doc["status"] == "failed" and doc["error"]["code"] == "object_generation_gone"


def test_an_unreadable_file_fails_the_job_in_the_plan_task(world):
    store, obj, tasks = world
    obj.data = b"\x1f\x8b\x08\x00binary"
    job_id = ingest.submit_job("gs://upcfan-uploads/in/file.txt").job_id
    doc = ingest.plan_job(PlanTask(job_id=job_id))
    assert doc["status"] == "failed" and doc["error"]["code"] == "compressed_file"
    assert [t.kind for t in tasks] == [PLAN_TASK]


def _plan(store, monkeypatch, max_lines: str | None, recorded: str | None = None) -> dict:
    if max_lines is None:  # the default: the session may carry the local stack's setting (lane off)
        monkeypatch.delenv("UPCFAN_SMALL_JOB_MAX_LINES", raising=False)
    else:
        monkeypatch.setenv("UPCFAN_SMALL_JOB_MAX_LINES", max_lines)
    settings.cache_clear()
    job_id = ingest.submit_job("gs://upcfan-uploads/in/file.txt").job_id
    if recorded:
        store.update_job(job_id, {"item_lane": recorded})  # an earlier attempt of this plan task chose it
    return ingest.plan_job(PlanTask(job_id=job_id))


@pytest.mark.parametrize("max_lines, lane", [(None, "small"), ("2", "small"), ("1", "bulk"), ("0", "bulk")])
def test_the_plan_records_the_jobs_lane_from_its_line_count(world, monkeypatch, max_lines, lane):
    """Issue 17, item 3: at most UPCFAN_SMALL_JOB_MAX_LINES lines (2 here) is the small-jobs lane; 0 = no lane."""
    store, obj, tasks = world
    doc = _plan(store, monkeypatch, max_lines)
    assert doc["item_lane"] == lane and doc["plan"]["raw_lines"] == 2
    planned = [d for _, d in store.events[doc["job_id"]] if d["type"] == "planned"]
    assert planned[0]["details"]["item_lane"] == lane


def test_a_plan_run_again_keeps_the_lane_already_recorded(world, monkeypatch):
    store, obj, tasks = world
    assert _plan(store, monkeypatch, None, recorded="bulk")["item_lane"] == "bulk"
