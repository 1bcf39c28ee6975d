"""Ingest on the full local stack: real finalize CloudEvents, Firestore, Cloud Tasks emulator, functions."""

from __future__ import annotations

import json
import random

import pytest
import requests

from google.cloud.firestore_v1.base_query import FieldFilter

from devstack.cloudtasks import client as ct
from devstack.testing import fresh_upcs, gtin14, poll, wait_job
from shared import ingest
from shared.clients import reset_clients
from shared.model import CHUNKS, ITEMS, JOBS, LINES
from shared.naming import job_id_for, task_name_for

pytestmark = pytest.mark.integration


def queue_id(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def cloudevent_headers(bucket: str, name: str, event_id: str) -> dict:
    return {"ce-id": event_id, "ce-source": f"//storage.googleapis.com/projects/_/buckets/{bucket}",
            "ce-specversion": "1.0", "ce-type": "google.cloud.storage.object.v1.finalized",
            "ce-subject": f"objects/{name}", "ce-time": "2026-11-23T00:00:00Z", "content-type": "application/json"}


def test_repeated_events_and_http_trigger_make_one_job_and_one_task_per_upc(operator, stack_env, firestore_db, upload, bridge):
    upcs = fresh_upcs(40)
    bucket, name, generation = upload("\n".join(upcs) + "\n", metadata={"upcfan-test-mode": "true"})
    job_id = job_id_for(bucket, name, generation)
    # Delivered (answered), not only sent: the duplicates below must find the job, not race to create it.
    first = poll(lambda: [d for d in bridge.deliveries(name) if d.get("outcome") == "delivered"], 30, 0.2,
                 "the bridge to deliver the finalize event")
    assert len(first) == 1 and first[0]["generation"] == generation

    # The same finalize event three more times, then the HTTP trigger for the same object.
    body = json.dumps({"bucket": bucket, "name": name, "generation": generation}).encode()
    answers = [operator.post(stack_env["UPCFAN_INGEST_URL"], data=body,
                             headers=cloudevent_headers(bucket, name, "dup-1"), timeout=60) for _ in range(3)]
    answers.append(operator.post(stack_env["UPCFAN_INGEST_URL"], json={"gcs_path": f"gs://{bucket}/{name}"},
                                 timeout=60))
    assert all(a.status_code == 202 and a.json()["job_id"] == job_id for a in answers), [a.text for a in answers]
    assert all(a.json()["created"] is False for a in answers)

    job = wait_job(firestore_db, job_id, {"completed"})
    assert job["totals"] == {"lines": 40, "items": 40, "invalid": 0, "duplicate": 0, "skipped": 0}
    assert job["options"] == {"handler": "dry_run"}  # from the deprecated upcfan-test-mode metadata
    jobs_for_object = list(firestore_db.collection(JOBS).where(filter=FieldFilter("gcs_path", "==", f"gs://{bucket}/{name}")).stream())
    assert [j.id for j in jobs_for_object] == [job_id]
    host, queue = stack_env["CLOUD_TASKS_EMULATOR_HOST"], queue_id(stack_env["UPCFAN_QUEUE"])
    for upc in upcs:
        attempts = ct.attempts(host, queue, task_name_for(job_id, gtin14(upc), 1))
        assert len(attempts) == 1 and attempts[0]["status"] == 200, attempts
        item = firestore_db.collection(JOBS).document(job_id).collection(ITEMS).document(gtin14(upc)).get().to_dict()
        assert item["status"] == "succeeded" and item["attempt"] == 1
    assert len(list(firestore_db.collection(JOBS).document(job_id).collection(ITEMS).stream())) == 40


def test_reupload_is_a_new_generation_and_a_new_job(stack_env, firestore_db, upload):
    name = f"reupload/{random.randrange(10**9)}.txt"
    b1, n1, g1 = upload("036000291452\n", name=name, metadata={"upcfan-test-mode": "true"})
    job1 = wait_job(firestore_db, job_id_for(b1, n1, g1), {"completed"})
    b2, n2, g2 = upload("036000291452\n4006381333931\n", name=name, metadata={"upcfan-test-mode": "true"})
    assert g1 != g2
    job2 = wait_job(firestore_db, job_id_for(b2, n2, g2), {"completed"})
    assert job1["totals"]["items"] == 1 and job2["totals"]["items"] == 2
    assert job1["generation"] == g1 and job2["generation"] == g2


def test_bad_lines_are_counted_with_line_numbers_and_reasons(stack_env, firestore_db, upload):
    text = ("\ufeff036000291452\r\n"          # 1 BOM + CRLF, valid
            "\r\n"                            # 2 blank (skipped)
            "# supplier list\r\n"             # 3 comment (skipped)
            "036000291453\r\n"                # 4 bad check digit
            "  4006381333931  \r\n"           # 5 valid, whitespace trimmed
            "36000291452\r\n"                 # 6 leading zero lost
            "036000291452\r\n"                # 7 duplicate of 1
            "7.2E+11\r\n"                     # 8 scientific notation
            "96385074")                       # 9 EAN-8, no final newline
    bucket, name, generation = upload(text.encode("utf-8"), metadata={"upcfan-test-mode": "true"})
    job_id = job_id_for(bucket, name, generation)
    job = wait_job(firestore_db, job_id, {"completed"})
    assert job["totals"] == {"lines": 7, "items": 3, "invalid": 3, "duplicate": 1, "skipped": 2}
    lines = {int(d.id): d.to_dict() for d in firestore_db.collection(JOBS).document(job_id).collection(LINES).stream()}
    assert {n: (r["outcome"], r["code"]) for n, r in lines.items()} == {
        4: ("invalid", "bad_check_digit"), 6: ("invalid", "bad_length"), 7: ("duplicate", "duplicate_in_file"),
        8: ("invalid", "scientific_notation")}
    assert "expected 2" in lines[4]["reason"] and lines[7]["duplicate_of_line"] == 1
    items = {d.id for d in firestore_db.collection(JOBS).document(job_id).collection(ITEMS).stream()}
    assert items == {"00036000291452", "04006381333931", "00000096385074"}


def test_binary_file_fails_the_job_with_a_reason_and_enqueues_nothing(stack_env, firestore_db, upload):
    import gzip

    bucket, name, generation = upload(gzip.compress(b"036000291452\n"), content_type="application/gzip")
    job = wait_job(firestore_db, job_id_for(bucket, name, generation), {"failed"})
    assert job["error"]["code"] == "compressed_file" and "gzip" in job["error"]["message"]
    assert not job.get("chunks_total")


def test_missing_object_is_a_404_naming_the_path(operator, stack_env):
    r = operator.post(stack_env["UPCFAN_INGEST_URL"], json={"gcs_path": f"gs://{stack_env['UPCFAN_BUCKET']}/nope.txt"},
                      timeout=30)
    assert r.status_code == 404 and "nope.txt" in r.json()["error"]["message"]


def test_crash_midway_through_a_chunk_then_retry_gives_no_duplicate_and_no_missing_task(
        operator, stack_env, firestore_db, tasks_client, storage_client, monkeypatch):
    """A chunk dies after creating some of its tasks; Cloud Tasks retries it; totals stay exact."""
    host = stack_env["CLOUD_TASKS_EMULATOR_HOST"]
    control = stack_env["UPCFAN_CONTROL_QUEUE"]
    upcs = fresh_upcs(120)
    text = "\n".join(upcs + upcs[:10]) + "\n"  # 10 in-file duplicates
    # Outside the watched bucket so no finalize event races this test; submitted over HTTP instead.
    bucket = storage_client.bucket(stack_env["UPCFAN_BUCKET"] + "-manual")
    if not bucket.exists():
        bucket.create()
    blob = bucket.blob(f"crash/{random.randrange(10**9)}.txt")
    blob.metadata = {"upcfan-test-mode": "true"}
    blob.upload_from_string(text)
    tasks_client.pause_queue(name=control)
    try:
        r = operator.post(stack_env["UPCFAN_INGEST_URL"], json={"gcs_path": f"gs://{bucket.name}/{blob.name}"},
                          timeout=60)
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        from google.cloud import tasks_v2

        from shared.payloads import PlanTask

        def job_tasks(suffix: str) -> list:
            return [t for t in tasks_client.list_tasks(request=tasks_v2.ListTasksRequest(
                parent=control, response_view=tasks_v2.Task.View.FULL)) if job_id in t.name and t.name.endswith(suffix)]

        for k, v in stack_env.items():
            monkeypatch.setenv(k, v)
        reset_clients()
        # The request only queued the job's plan task; plan here (the queued one finds the job planned).
        assert len(job_tasks("-plan")) == 1
        ingest.plan_job(PlanTask(job_id=job_id))
        chunk_tasks = job_tasks("-c0")
        assert len(chunk_tasks) == 1
        payload = json.loads(chunk_tasks[0].http_request.body)
        with pytest.raises(RuntimeError, match="injected crash"):
            ingest.process_chunk(payload, crash_after_tasks=50)
    finally:
        tasks_client.resume_queue(name=control)
    job = wait_job(firestore_db, job_id, {"completed"})
    assert job["totals"] == {"lines": 130, "items": 120, "invalid": 0, "duplicate": 10, "skipped": 0}
    chunk = firestore_db.collection(JOBS).document(job_id).collection(CHUNKS).document(f"{payload['start']:015d}").get()
    assert chunk.get("tasks_created") == 70  # the retry created only what the crash left out
    queue = queue_id(stack_env["UPCFAN_QUEUE"])
    # The job completes inside the last delivery (complete, then the progress check) before that
    # delivery's answer reaches the emulator, which records the attempt only then: wait for it.
    def attempts_of(upc: str) -> list:
        return ct.attempts(host, queue, task_name_for(job_id, gtin14(upc), 1))

    for upc in upcs:
        attempts = poll(lambda: attempts_of(upc), 30, 0.2, f"the emulator's record of {upc}'s delivery")
        assert len(attempts) == 1, (upc, attempts)
    items = list(firestore_db.collection(JOBS).document(job_id).collection(ITEMS).stream())
    assert len(items) == 120 and all(i.get("attempt") == 1 and i.get("status") == "succeeded" for i in items)


def manual_object(storage_client, stack_env, metadata: dict | None) -> str:
    """gs:// path of a fresh two-UPC object outside the watched bucket (no finalize event starts a job)."""
    bucket = storage_client.bucket(stack_env["UPCFAN_BUCKET"] + "-manual")
    if not bucket.exists():
        bucket.create()
    blob = bucket.blob(f"handlers/{random.randrange(10**9)}.txt")
    blob.metadata = metadata
    blob.upload_from_string("\n".join(fresh_upcs(2)) + "\n")
    return f"gs://{bucket.name}/{blob.name}"


@pytest.mark.parametrize("metadata,body,handler", [
    ({"upcfan-handler": "dry_run"}, {}, "dry_run"),  # the object's metadata names it
    ({"upcfan-handler": "marketplace_draft"}, {"handler": "dry_run"}, "dry_run"),  # the request beats metadata
    (None, {"test_mode": True}, "dry_run"),  # the deprecated request boolean
    ({"upcfan-create-drafts": "false"}, {}, "dry_run"),  # a deprecated metadata boolean over the named default
    (None, {}, "marketplace_draft"),  # the local stack's UPCFAN_DEFAULT_HANDLER
])
def test_http_trigger_records_the_chosen_handler_by_name(operator, stack_env, firestore_db, storage_client, metadata, body,
                                                         handler):
    path = manual_object(storage_client, stack_env, metadata)
    r = operator.post(stack_env["UPCFAN_INGEST_URL"], json={"gcs_path": path, **body}, timeout=60)
    assert r.status_code == 202, r.text
    job = wait_job(firestore_db, r.json()["job_id"], {"completed"})
    assert job["options"] == {"handler": handler}


def test_unknown_handler_is_refused_over_http_and_acknowledged_as_an_event(operator, stack_env, firestore_db, storage_client,
                                                                          upload, bridge):
    path = manual_object(storage_client, stack_env, {"upcfan-handler": "nope"})
    for body in ({"gcs_path": path}, {"gcs_path": path, "handler": "nope"}):
        r = operator.post(stack_env["UPCFAN_INGEST_URL"], json=body, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["code"] == "unknown_handler", r.text
        assert "dry_run" in r.json()["error"]["message"] and "marketplace_draft" in r.json()["error"]["message"]
    # Dropped in the watched bucket: the event is answered 200 (a retry could not help) and makes no job.
    bucket, name, generation = upload("036000291452\n", metadata={"upcfan-handler": "nope"})
    delivered = poll(lambda: [d for d in bridge.deliveries(name) if d.get("outcome") == "delivered"], 60, 0.2,
                     "the bridge to deliver the finalize event")
    last = delivered[0]["attempts"][-1]
    assert last["status"] == 200 and "unknown handler 'nope'" in last["response"], last
    assert not firestore_db.collection(JOBS).document(job_id_for(bucket, name, generation)).get().exists


def test_event_for_an_overwritten_generation_is_acknowledged_not_retried(operator, stack_env):
    body = json.dumps({"bucket": stack_env["UPCFAN_BUCKET"], "name": "gone.txt", "generation": "1"}).encode()
    r = operator.post(stack_env["UPCFAN_INGEST_URL"], data=body,
                      headers=cloudevent_headers(stack_env["UPCFAN_BUCKET"], "gone.txt", "gone-1"), timeout=30)
    assert r.status_code == 200 and "gone.txt" in r.json()["ignored"]
