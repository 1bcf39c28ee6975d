"""Issue 17, item 3 on the full local stack: a small job's item tasks go to the small-jobs lane
(`upcfan-items-small`), a large one's to the bulk item queue, and an operator's retry round and
re-drive of a small job create its tasks in the small lane again.

The local stack runs with the lane off (`devstack.stack.LOCAL_SMALL_JOB_MAX_LINES`); this module
restarts ingest with `UPCFAN_SMALL_JOB_MAX_LINES=5`, so 3 lines are small and 8 lines are bulk, and
restores it at the end. Where a task went is read from the Cloud Tasks emulator (its dispatch log
per queue and GetTask per queue), never inferred from timing. The module's IAM audit
(tests/integration/conftest.py) checks that every call into the new queue was granted.
"""

from __future__ import annotations

import pytest

from devstack.cloudtasks import client as ct
from devstack.testing import bounce_component, fresh_upcs, gtin14, poll, wait_job
from shared.config import SMALL_ITEM_QUEUE
from shared.model import ITEMS, JOBS
from shared.naming import job_id_for, redrive_task_name_for, task_name_for
from shared.tasks import item_queue_for, task_exists

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]

THRESHOLD = 5
DRY_RUN = {"upcfan-handler": "dry_run"}
FAULT_KEYS = ("error_rate", "latency_ms", "status", "error_after_effect_rate")


@pytest.fixture(scope="module")
def lane_on(stack_env):
    bounce_component("ingest", extra_env={"UPCFAN_SMALL_JOB_MAX_LINES": str(THRESHOLD)})
    yield stack_env
    bounce_component("ingest")  # back to the stack's own env (lane off)


def _queue_id(lane: str) -> str:
    return item_queue_for("any", lane).rsplit("/", 1)[-1]


def _dispatched_in(stack_env, lane: str, task_id: str) -> int:
    return len(ct.attempts(stack_env["CLOUD_TASKS_EMULATOR_HOST"], _queue_id(lane), task_id))


def _start(upload, upcs: list[str], metadata: dict | None = None) -> str:
    bucket, name, generation = upload("\n".join(upcs) + "\n", content_type="text/plain", metadata=metadata)
    return job_id_for(bucket, name, generation)


def test_a_small_job_runs_in_the_small_lane_and_a_large_one_in_bulk(lane_on, upload, firestore_db):
    assert _queue_id("small") == SMALL_ITEM_QUEUE.name
    small_upcs, large_upcs = fresh_upcs(3), fresh_upcs(THRESHOLD + 3)
    small, large = _start(upload, small_upcs, DRY_RUN), _start(upload, large_upcs, DRY_RUN)
    small_doc = wait_job(firestore_db, small, {"completed"}, 120)
    large_doc = wait_job(firestore_db, large, {"completed"}, 120)
    assert (small_doc["item_lane"], large_doc["item_lane"]) == ("small", "bulk")
    for job_id, upcs, lane, other in ((small, small_upcs, "small", "bulk"), (large, large_upcs, "bulk", "small")):
        for upc in upcs:
            task = task_name_for(job_id, gtin14(upc), 1)
            assert _dispatched_in(lane_on, lane, task) >= 1, (job_id, task, lane)
            assert _dispatched_in(lane_on, other, task) == 0, (job_id, task, other)
    planned = firestore_db.collection(JOBS).document(small).collection("events").document("planned").get().to_dict()
    assert planned["details"]["item_lane"] == "small"


def test_retry_failed_of_a_small_job_enqueues_in_its_lane(lane_on, upload, operator, marketplace, firestore_db):
    api = lane_on["UPCFAN_API_URL"].rstrip("/")
    upcs = fresh_upcs(3)
    bad = gtin14(upcs[0])
    current = marketplace.faults()
    spec = {k: current[k] for k in FAULT_KEYS}
    marketplace.faults(**spec, fail_gtins={**current["fail_gtins"], bad: 400}, latency_gtins=current["latency_gtins"])
    try:
        job_id = _start(upload, upcs)  # the stack's default handler: marketplace drafts
        doc = wait_job(firestore_db, job_id, {"completed_with_failures"}, 120)
        assert doc["item_lane"] == "small"
    finally:
        current = marketplace.faults()
        marketplace.faults(**{k: current[k] for k in FAULT_KEYS},
                           fail_gtins={g: s for g, s in current["fail_gtins"].items() if g != bad},
                           latency_gtins=current["latency_gtins"])
    r = operator.post(f"{api}/api/batch/jobs/{job_id}/retry-failed", timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["round"] == 2 and r.json()["tasks_created"] == 1, r.json()
    wait_job(firestore_db, job_id, {"completed"}, 120)
    retried = task_name_for(job_id, bad, 2)
    assert _dispatched_in(lane_on, "small", retried) >= 1
    assert _dispatched_in(lane_on, "bulk", retried) == 0


def test_redrive_of_a_small_job_looks_and_enqueues_in_its_lane(lane_on, upload, operator, tasks_client, firestore_db):
    api = lane_on["UPCFAN_API_URL"].rstrip("/")
    small_queue = item_queue_for("any", "small")
    upcs = fresh_upcs(3)
    # The small lane holds the job's tasks (paused), so one can be deleted before any delivery.
    tasks_client.pause_queue(name=small_queue)
    try:
        job_id = _start(upload, upcs, DRY_RUN)
        job_ref = firestore_db.collection(JOBS).document(job_id)
        doc = wait_job(firestore_db, job_id, {"running"}, 120)
        assert doc["item_lane"] == "small"
        names = [task_name_for(job_id, gtin14(u), 1) for u in upcs]
        poll(lambda: all(task_exists(small_queue, n) for n in names), 60, 0.2, "the job's tasks in the small lane")
        assert not any(task_exists(item_queue_for(n, "bulk"), n) for n in names)
        stuck = gtin14(upcs[0])
        tasks_client.delete_task(name=f"{small_queue}/tasks/{names[0]}")

        r = operator.post(f"{api}/api/batch/jobs/{job_id}/redrive", json={"dry_run": False}, timeout=60)
        assert r.status_code == 200, r.text
        out = r.json()
        # Only the deleted task is missing: the other two were found, live, in the small lane.
        assert [row["gtin"] for row in out["items"]] == [stuck] and out["tasks_created"] == 1, out
        new = redrive_task_name_for(job_id, stuck, 1, 1)
        assert task_exists(small_queue, new) and not task_exists(item_queue_for(new, "bulk"), new)
    finally:
        tasks_client.resume_queue(name=small_queue)
    wait_job(firestore_db, job_id, {"completed"}, 120)
    assert job_ref.collection(ITEMS).document(stuck).get().to_dict()["task_name"] == new
    assert _dispatched_in(lane_on, "small", new) >= 1
