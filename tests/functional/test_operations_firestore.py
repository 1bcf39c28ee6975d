"""Operator core on the real Firestore emulator: status, listings, cancel and deliberate retry rounds.

Task creation goes through `shared.tasks.create_task` into a recording fake of the Cloud Tasks
client (same AlreadyExists semantics as the service), so the tests count exactly which tasks a
retry round creates.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid

import pytest
from google.api_core import exceptions as gexc

from shared import operations, tasks
from shared.clients import firestore_client, reset_clients
from shared.exceptions import ConflictError, NotFoundError
from shared.naming import line_doc_id, task_name_for

NOW = dt.datetime(2026, 1, 2, 12, 0, 0, tzinfo=dt.timezone.utc)


class RecordingTasksClient:
    """Stands in for CloudTasksClient.create_task: names are unique forever (tombstones included)."""

    def __init__(self, fail_after: int | None = None):
        self.created: dict[str, dict] = {}
        self.fail_after = fail_after
        self.calls = 0

    def create_task(self, parent, task):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("simulated crash while enqueuing")
        if task.name in self.created:
            raise gexc.AlreadyExists(f"task {task.name} exists")
        self.created[task.name] = {"parent": parent, "url": task.http_request.url,
                                   "payload": json.loads(task.http_request.body)}
        return task

    @property
    def task_ids(self) -> set[str]:
        return {name.rsplit("/", 1)[-1] for name in self.created}


@pytest.fixture
def ops(firestore_emulator, monkeypatch):
    monkeypatch.setenv("UPCFAN_WORKER_URL", "http://127.0.0.1:9/worker")
    monkeypatch.setenv("UPCFAN_MAX_RETRY_ROUNDS", "2")
    reset_clients()
    fake = RecordingTasksClient()
    monkeypatch.setattr(tasks, "tasks_client", lambda: fake)
    yield fake
    reset_clients()


def _gtin(n: int) -> str:
    body = f"{n:013d}"
    # GS1 mod-10 check digit over 13 digits
    total = sum(int(d) * (3 if i % 2 == 0 else 1) for i, d in enumerate(body))
    return body + str((10 - total % 10) % 10)


def seed_job(status: str = "completed_with_failures", items: dict[str, str] | None = None, *,
             round_: int = 1, never_claimed: int = 0, gcs_path: str | None = None,
             created_at: dt.datetime = NOW - dt.timedelta(minutes=10), lines: list[dict] | None = None) -> str:
    """A job with the given items {gtin: status}; `never_claimed` adds items to totals only."""
    db = firestore_client()
    job_id = f"t-{uuid.uuid4().hex[:12]}"
    items = items or {}
    lines = lines or []
    job_ref = db.collection("jobs").document(job_id)
    invalid = sum(1 for ln in lines if ln["outcome"] == "invalid")
    dup = len(lines) - invalid
    job_ref.set({
        "job_id": job_id, "gcs_path": gcs_path or f"gs://b/{job_id}.txt", "bucket": "b",
        "object": f"{job_id}.txt", "generation": "1", "source": "http", "status": status,
        "options": {"create_drafts": True, "test_mode": False},
        "totals": {"lines": len(items) + never_claimed + len(lines), "items": len(items) + never_claimed,
                   "invalid": invalid, "duplicate": dup, "skipped": 0},
        "round": round_, "created_at": created_at, "updated_at": created_at,
        "fanout_done_at": NOW - dt.timedelta(seconds=100), "completed_at": NOW if status.startswith("completed") else None,
        "stall": None, "error": None,
    })
    batch = db.batch()
    for i, (gtin, st) in enumerate(sorted(items.items())):
        doc = {"job_id": job_id, "gtin": gtin, "upc": gtin[1:], "line": i + 1, "status": st, "attempt": 1,
               "round": round_, "error": None, "history": [{"status": st, "attempt": 1, "owner": "w", "at": NOW,
                                                           "error_code": None}]}
        if st == "failed":
            doc["error"] = {"code": "marketplace_rejected", "message": f"listing rejected for {gtin}",
                            "retryable": False}
        batch.set(job_ref.collection("items").document(gtin), doc)
    for ln in lines:
        batch.set(job_ref.collection("lines").document(line_doc_id(ln["line"])), ln)
    batch.commit()
    return job_id


def _items(job_id: str) -> dict[str, dict]:
    col = firestore_client().collection("jobs").document(job_id).collection("items")
    return {d.id: d.to_dict() for d in col.stream()}


def _events(job_id: str, type_: str) -> list[dict]:
    col = firestore_client().collection("jobs").document(job_id).collection("events")
    return [d.to_dict() for d in col.stream() if d.to_dict().get("type") == type_]


def test_unknown_job_is_not_found_everywhere(ops):
    for call in (lambda: operations.get_job_status("no-such-job"),
                 lambda: operations.list_items("no-such-job"),
                 lambda: operations.cancel_job("no-such-job", "op"),
                 lambda: operations.retry_failed("no-such-job", "op")):
        with pytest.raises(NotFoundError, match="no-such-job"):
            call()


def test_status_reports_counts_percent_rate_and_eta(ops):
    items = {_gtin(i): s for i, s in enumerate(["succeeded"] * 6 + ["failed"] * 2 + ["queued", "processing"])}
    job_id = seed_job("running", items, never_claimed=10)
    view = operations.get_job_status(job_id, now=NOW)
    assert view["counts"] == {"queued": 1, "processing": 1, "succeeded": 6, "failed": 2, "cancelled": 0,
                              "never_claimed": 10}
    assert view["percent"] == 40.0  # 8 of 20 finished
    assert view["rate_items_per_s"] == 0.08  # 8 items in 100 s since fan-out
    assert view["eta_s"] == 150.0
    assert view["final"] is False and view["stalled"] is False
    assert view["outcome"]["pending"] == 12


def test_retry_refused_while_job_runs(ops):
    job_id = seed_job("running", {_gtin(1): "failed", _gtin(2): "queued"})
    with pytest.raises(ConflictError) as err:
        operations.retry_failed(job_id, "op")
    assert err.value.code == "job_not_final" and "still running" in err.value.message
    assert ops.created == {}


def test_retry_refused_while_items_never_claimed(ops):
    job_id = seed_job("completed_with_failures", {_gtin(1): "failed"}, never_claimed=3)
    with pytest.raises(ConflictError) as err:
        operations.retry_failed(job_id, "op")
    assert err.value.code == "items_open"


def test_retry_refused_past_max_rounds(ops):
    job_id = seed_job("completed_with_failures", {_gtin(1): "failed"}, round_=3)  # 2 retry rounds used
    with pytest.raises(ConflictError) as err:
        operations.retry_failed(job_id, "op")
    assert err.value.code == "retry_rounds_exhausted" and "2 retry rounds" in err.value.message


def test_retry_refused_when_nothing_failed(ops):
    job_id = seed_job("completed", {_gtin(1): "succeeded"})
    with pytest.raises(ConflictError) as err:
        operations.retry_failed(job_id, "op")
    assert err.value.code == "nothing_to_retry"


def test_retry_reruns_exactly_the_failed_items_once(ops, monkeypatch):
    monkeypatch.setattr(operations, "_PAGE", 3)  # several pages
    failed = [_gtin(i) for i in range(7)]
    ok = [_gtin(100 + i) for i in range(5)]
    job_id = seed_job("completed_with_failures", {**{g: "failed" for g in failed}, **{g: "succeeded" for g in ok}})
    before = _items(job_id)

    out = operations.retry_failed(job_id, "alice", now=NOW)

    assert out == {"job_id": job_id, "round": 2, "resumed": False, "status": "running",
                   "items_requeued": 7, "tasks_created": 7}
    assert ops.task_ids == {task_name_for(job_id, g, 2) for g in failed}
    payloads = {p["payload"]["gtin"]: p["payload"] for p in ops.created.values()}
    assert payloads[failed[0]] == {"job_id": job_id, "gtin": failed[0], "upc": failed[0][1:],
                                   "line": before[failed[0]]["line"], "round": 2}
    assert {p["url"] for p in ops.created.values()} == {"http://127.0.0.1:9/worker"}
    after = _items(job_id)
    for g in failed:
        assert after[g]["status"] == "queued" and after[g]["round"] == 2
        assert after[g]["error"]["code"] == "marketplace_rejected"  # kept for history
        assert after[g]["history"][-1]["error_code"] == "marketplace_rejected"
    for g in ok:
        assert after[g] == before[g]
    job = firestore_client().collection("jobs").document(job_id).get().to_dict()
    assert job["status"] == "running" and job["round"] == 2 and job["completed_at"] is None
    assert job["retry"]["state"] == "done" and job["retry"]["items"] == 7
    (event,) = _events(job_id, "retry_round")
    assert event["actor"] == "alice" and event["details"]["round"] == 2

    # The job is running again: a second request is refused, and creates nothing.
    with pytest.raises(ConflictError):
        operations.retry_failed(job_id, "alice")
    assert len(ops.created) == 7


def test_retry_resumes_a_crashed_round_instead_of_starting_another(ops, monkeypatch):
    monkeypatch.setattr(operations, "_PAGE", 3)
    failed = [_gtin(i) for i in range(8)]
    job_id = seed_job("completed_with_failures", {**{g: "failed" for g in failed}, _gtin(50): "succeeded"})
    ops.fail_after = 3  # first page's tasks are created, then enqueuing "crashes"

    with pytest.raises(RuntimeError):
        operations.retry_failed(job_id, "alice")
    job = firestore_client().collection("jobs").document(job_id).get().to_dict()
    assert job["retry"]["state"] == "enqueuing" and job["round"] == 2
    assert len(ops.created) == 3

    ops.fail_after = None
    out = operations.retry_failed(job_id, "bob")

    assert out["resumed"] is True and out["round"] == 2
    assert ops.task_ids == {task_name_for(job_id, g, 2) for g in failed}  # one task per failed item
    after = _items(job_id)
    assert all(after[g]["status"] == "queued" and after[g]["round"] == 2 for g in failed)
    assert after[_gtin(50)]["status"] == "succeeded" and after[_gtin(50)]["round"] == 1
    job = firestore_client().collection("jobs").document(job_id).get().to_dict()
    assert job["round"] == 2 and job["retry"]["state"] == "done"
    assert len(_events(job_id, "retry_round")) == 1

    # Resuming again once done is not possible; the job runs round 2.
    with pytest.raises(ConflictError):
        operations.retry_failed(job_id, "bob")


def test_resume_leaves_items_that_already_failed_again_in_the_new_round(ops, monkeypatch):
    monkeypatch.setattr(operations, "_PAGE", 2)
    failed = [_gtin(i) for i in range(4)]
    job_id = seed_job("completed_with_failures", {g: "failed" for g in failed})
    ops.fail_after = 2
    with pytest.raises(RuntimeError):
        operations.retry_failed(job_id, "alice")
    # A round-2 task ran and failed again before the operator resumed.
    ref = firestore_client().collection("jobs").document(job_id).collection("items").document(failed[0])
    ref.update({"status": "failed", "round": 2})
    ops.fail_after = None
    operations.retry_failed(job_id, "alice")
    assert ref.get().to_dict()["status"] == "failed"
    assert ops.task_ids == {task_name_for(job_id, g, 2) for g in failed}


def test_cancel_moves_queued_items_and_is_idempotent(ops):
    items = {_gtin(1): "queued", _gtin(2): "queued", _gtin(3): "processing", _gtin(4): "succeeded"}
    job_id = seed_job("running", items, never_claimed=2)
    # Item 1 was re-queued by an operator's retry round (not started); item 2 by a delivery's
    # retryable error (its handler ran, its effect may exist: the worker finishes it truthfully).
    item_ref = firestore_client().collection("jobs").document(job_id).collection("items").document(_gtin(1))
    item_ref.update({"history": [{"status": "queued", "attempt": 1, "owner": "retry:ops", "at": NOW}]})

    out = operations.cancel_job(job_id, "carol", now=NOW)
    assert out == {"job_id": job_id, "status": "cancelled", "already_cancelled": False, "items_cancelled": 1,
                   "items_left_to_deliveries": False}
    after = _items(job_id)
    assert [after[_gtin(i)]["status"] for i in (1, 2, 3, 4)] == ["cancelled", "queued", "processing", "succeeded"]
    job = firestore_client().collection("jobs").document(job_id).get().to_dict()
    assert job["status"] == "cancelled" and job["cancelled_at"] == NOW

    again = operations.cancel_job(job_id, "dave")
    assert again["already_cancelled"] is True and again["items_cancelled"] == 0
    (event,) = _events(job_id, "cancelled")
    assert event["actor"] == "carol"

    view = operations.get_job_status(job_id, now=NOW)
    assert view["outcome"]["cancelled"] == 5 and view["outcome"]["pending"] == 0  # 2 + processing + 2 never claimed

    with pytest.raises(ConflictError) as err:
        operations.retry_failed(job_id, "carol")
    assert err.value.code == "job_cancelled"


def test_cancel_refused_for_finished_job(ops):
    job_id = seed_job("completed", {_gtin(1): "succeeded"})
    with pytest.raises(ConflictError) as err:
        operations.cancel_job(job_id, "carol")
    assert "already completed" in err.value.message
    assert _events(job_id, "cancelled") == []


def test_list_jobs_newest_first_with_paging_and_filters(ops):
    path = f"gs://b/{uuid.uuid4().hex}.txt"
    ids = [seed_job("completed" if i % 2 else "running", gcs_path=path, created_at=NOW + dt.timedelta(seconds=i))
           for i in range(5)]
    seen, cursor = [], None
    for _ in range(5):
        page = operations.list_jobs(limit=2, gcs_path=path, cursor=cursor)
        seen += [j["job_id"] for j in page["jobs"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(ids))
    running = operations.list_jobs(limit=10, gcs_path=path, status="running")
    assert [j["job_id"] for j in running["jobs"]] == [ids[4], ids[2], ids[0]]
    assert running["jobs"][0]["created_at"].endswith("Z")


def test_list_items_failed_with_errors_and_line_records(ops):
    items = {_gtin(i): ("failed" if i < 5 else "succeeded") for i in range(8)}
    lines = [{"line": 9, "raw": "0123", "outcome": "invalid", "code": "bad_length", "reason": "4 digits"},
             {"line": 10, "raw": _gtin(1)[1:], "outcome": "duplicate", "code": "duplicate",
              "reason": "same GTIN as line 2", "gtin": _gtin(1), "duplicate_of_line": 2}]
    job_id = seed_job("completed_with_failures", items, lines=lines)

    got, cursor = [], None
    while True:
        page = operations.list_items(job_id, status="failed", limit=2, cursor=cursor)
        got += page["items"]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert [i["gtin"] for i in got] == sorted(g for g, s in items.items() if s == "failed")
    assert got[0]["error"] == {"code": "marketplace_rejected", "message": f"listing rejected for {got[0]['gtin']}",
                               "retryable": False}

    invalid = operations.list_items(job_id, status="invalid")
    assert invalid["kind"] == "lines" and invalid["items"][0]["reason"] == "4 digits"
    dup = operations.list_items(job_id, status="duplicate")["items"]
    assert dup[0]["duplicate_of_line"] == 2
    assert len(operations.list_items(job_id)["items"]) == 8


def test_pause_and_resume_are_idempotent_and_refused_for_a_finished_job(ops):
    job_id = seed_job("running", {_gtin(1): "queued", _gtin(2): "succeeded"})
    out = operations.pause_job(job_id, "ops@example.com", reason="marketplace maintenance", now=NOW)
    assert out == {"job_id": job_id, "status": "paused", "already_paused": False}
    assert operations.pause_job(job_id, "ops@example.com", now=NOW)["already_paused"] is True
    view = operations.get_job_status(job_id, now=NOW)
    assert view["status"] == "paused" and view["final"] is False and view["eta_s"] is None
    assert view["pause"]["code"] == "operator" and view["pause"]["message"] == "marketplace maintenance"
    assert [j["job_id"] for j in operations.list_jobs(status="paused", limit=100)["jobs"]].count(job_id) == 1
    with pytest.raises(ConflictError) as err:
        operations.retry_failed(job_id, "op")
    assert err.value.code == "job_not_final"
    later = NOW + dt.timedelta(minutes=5)
    out = operations.resume_job(job_id, "ops@example.com", now=later)
    assert out == {"job_id": job_id, "status": "running", "already_running": False}
    assert ops.task_ids and all("-p" in t for t in ops.task_ids)  # the progress check it asked for
    assert operations.resume_job(job_id, "ops@example.com", now=later)["already_running"] is True
    assert operations.get_job_status(job_id, now=later)["resumed_at"].startswith("2026-01-02T12:05")
    assert [e["actor"] for e in _events(job_id, "paused")] == ["ops@example.com"]
    assert len(_events(job_id, "resumed")) == 1 and len(_events(job_id, "pause_note")) == 1
    done = seed_job("completed")
    for call in (lambda: operations.pause_job(done, "op"), lambda: operations.resume_job(done, "op")):
        with pytest.raises(ConflictError) as err:
            call()
        assert err.value.code == "job_finished"


def test_cancel_of_a_paused_job(ops):
    job_id = seed_job("running", {_gtin(1): "queued"})
    operations.pause_job(job_id, "op", now=NOW)
    out = operations.cancel_job(job_id, "op", now=NOW)
    assert out["status"] == "cancelled" and out["already_cancelled"] is False
    assert _events(job_id, "cancelled")[0]["details"]["previous_status"] == "paused"
