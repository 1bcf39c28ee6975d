"""The final progress check (issue 15): its window is named after the complete commit, a transient
CreateTask fault is retried, and a request that still fails is flagged on the job (never swallowed),
cleared by the next check and reported by the sweeper."""

from __future__ import annotations

import datetime as dt
import time

import pytest
from google.api_core import exceptions as gexc

from shared import tasks
from shared.config import settings
from shared.events import Event
from shared.model import PROGRESS_CHECK_MISSED_AT, PROGRESS_CHECK_MISSED_ERROR, PROGRESS_CHECK_UNTIL
from shared.payloads import ItemTask
from shared.progress import check_job_progress
from shared.store.memory import MemoryStore
from shared.sweeper.rules import progress_missed, rule_for_kind
from shared.worker import job_cache, process, progress_requests
from shared.worker.progress_requests import PROGRESS_REQUESTS, request_progress_check

JOB_ID = "job-progress"
T0 = 1_900_000_000.0
TASK = ItemTask(job_id=JOB_ID, gtin="00012345678905", upc="012345678905", line=1, round=1)


def _at(t: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(t, tz=dt.timezone.utc)


@pytest.fixture
def store(monkeypatch) -> MemoryStore:
    monkeypatch.setenv("UPCFAN_WORKER_URL", "https://worker.example")
    settings.cache_clear()
    PROGRESS_REQUESTS.seen.clear()
    mem = MemoryStore()
    mem.create_job({"job_id": JOB_ID, "status": "running", "options": {"handler": "dry_run"}, "round": 1,
                    "totals": {"lines": 2, "items": 2, "invalid": 0, "duplicate": 0, "skipped": 0},
                    "fanout_done_at": _at(T0 - 60), "counts": {}, "created_at": _at(T0 - 120)},
                   Event("created", "test", _at(T0 - 120)))
    yield mem
    PROGRESS_REQUESTS.seen.clear()


def _no_wait(monkeypatch) -> None:
    """TASK_API's waits are real sleeps; the policy and its attempt count stay as configured."""
    monkeypatch.setattr("shared.retry.RetryPolicy.wait_s", lambda self, n: 0.0)


def test_a_transient_create_fault_is_retried_and_nothing_is_flagged(store, monkeypatch):
    _no_wait(monkeypatch)
    calls = []

    class Flaky:
        def create_task(self, parent, task):
            calls.append(task.name)
            if len(calls) < 3:
                raise gexc.ServiceUnavailable("blip")
            return task

    monkeypatch.setattr(tasks, "tasks_client", lambda: Flaky())
    task_id = request_progress_check(JOB_ID, T0, store=store)
    assert task_id and len(calls) == 3 and calls[-1].endswith(task_id)
    assert store.get_job(JOB_ID).doc.get(PROGRESS_CHECK_MISSED_AT) is None


@pytest.mark.parametrize("fault", [gexc.ServiceUnavailable("down for good"), gexc.PermissionDenied("no enqueuer")])
def test_a_request_that_still_fails_is_flagged_then_cleared_by_the_next_check(store, monkeypatch, fault):
    _no_wait(monkeypatch)

    class Down:
        def create_task(self, parent, task):
            raise fault

    monkeypatch.setattr(tasks, "tasks_client", lambda: Down())
    assert request_progress_check(JOB_ID, T0, store=store) is None
    job = store.get_job(JOB_ID).doc
    assert job[PROGRESS_CHECK_MISSED_AT] == _at(T0)
    assert type(fault).__name__ in job[PROGRESS_CHECK_MISSED_ERROR] and f"{JOB_ID}-p" in job[PROGRESS_CHECK_MISSED_ERROR]
    # forgotten by this process, so the next completion in the same window asks again
    assert PROGRESS_REQUESTS.first(JOB_ID, int(T0 // settings().progress_check_s))

    # The sweeper reports it once the grace has passed (a running job with the flag) ...
    rule = rule_for_kind(progress_missed.PROGRESS_CHECK_MISSED)
    now = _at(T0) + progress_missed.MISSED_GRACE + dt.timedelta(minutes=1)
    finding = rule.classify({**job, "job_id": JOB_ID}, now, settings())
    assert finding.kind == "progress_check_missed" and "could not be enqueued 3 min ago" in finding.reason
    assert rule.moved_on({**job, "job_id": JOB_ID}) is None

    # ... until a check runs (here the job is not done yet: the flag is cleared, the job stays running).
    check_job_progress(JOB_ID, T0 + 10, store=store)
    job = store.get_job(JOB_ID).doc
    assert job[PROGRESS_CHECK_MISSED_AT] is None and job["status"] == "running"
    assert rule.moved_on({**job, "job_id": JOB_ID}) == "a progress check ran"


def test_a_flag_that_cannot_be_written_is_logged_and_nothing_raises(store, monkeypatch):
    _no_wait(monkeypatch)

    class Down:
        def create_task(self, parent, task):
            raise gexc.ServiceUnavailable("down")

    def broken_update(job_id, fields):
        raise gexc.ServiceUnavailable("firestore down too")

    monkeypatch.setattr(tasks, "tasks_client", lambda: Down())
    monkeypatch.setattr(store, "update_job", broken_update)
    logged = []
    monkeypatch.setattr(progress_requests, "log_event", lambda event, **kw: logged.append(event))
    assert request_progress_check(JOB_ID, T0, store=store) is None
    assert logged == ["progress_check_enqueue_failed", "progress_check_missed_unrecorded"]


def test_the_progress_window_is_taken_after_the_complete_commit(store, monkeypatch):
    """A complete transaction that commits late (retries, a slow store) must not name the window of
    its start: that window's check may already have run without seeing this item final."""
    commits: list[float] = []

    class SlowCommit(MemoryStore):
        def complete_item(self, *args, **kwargs):
            time.sleep(0.05)  # the commit takes 50 ms
            kind = super().complete_item(*args, **kwargs)
            commits.append(time.time())
            return kind

    slow = SlowCommit()
    slow.jobs = store.jobs
    asked: list[tuple[float, float]] = []
    monkeypatch.setattr(process, "request_progress_check", lambda job_id, now: asked.append((now, time.time())))
    job_cache.JOB_CACHE.clear()

    class Handler:
        name = "ok"

        def handle(self, ctx):
            return {"ok": True}

    out = process.process_item_delivery(TASK.model_dump(), {"X-CloudTasks-TaskName": "t1"}, now=T0, store=slow,
                                        handler=Handler())
    assert out.http_status == 200 and out.body["status"] == "succeeded"
    item = slow.get_item(JOB_ID, TASK.gtin)
    completed_at = item.doc["updated_at"].timestamp()  # the complete transaction's `at` (before the commit)
    (now, wall), = asked
    assert now - completed_at >= 0.05 - 1e-3, "the window must be named after the commit, not before it"
    assert commits and wall >= commits[0]


# ---------------------------------------------------------------- one check of a job counts at a time


def _recording_tasks(monkeypatch) -> list[tasks.TaskSpec]:
    made: list[tasks.TaskSpec] = []
    monkeypatch.setattr(tasks, "create_task", lambda queue, spec: made.append(spec) or True)
    return made


def test_a_check_that_finds_another_counting_asks_again_for_the_next_window(store, monkeypatch):
    """A count costs time in proportion to the job's items: checks of one job must not pile up. The
    check that is turned away may carry the write that completes the job, so it is asked for again."""
    made = _recording_tasks(monkeypatch)
    window_s = settings().progress_check_s
    counted: list[str] = []
    inner: dict = {}

    real_count = store.count_items_by_status

    def count_with_another_check_arriving(job_id):
        counted.append(job_id)
        if not inner:  # while the first check counts, a second one is dispatched
            inner["out"] = check_job_progress(JOB_ID, T0 + 1, store=store)
        return real_count(job_id)

    monkeypatch.setattr(store, "count_items_by_status", count_with_another_check_arriving)
    outer = check_job_progress(JOB_ID, T0, store=store)

    assert outer["status"] == "running" and inner["out"]["status"] == "busy"
    assert counted == [JOB_ID], "the second check must not count while the first one does"
    (spec,) = made
    assert spec.task_id == inner["out"]["asked_again"]
    assert spec.schedule_time.timestamp() >= (int((T0 + 1) // window_s) + 2) * window_s, "the next window's check"
    # The first check let go when it was done: the next one counts.
    assert store.get_job(JOB_ID).doc[PROGRESS_CHECK_UNTIL] is None
    assert check_job_progress(JOB_ID, T0 + 10, store=store)["status"] == "running" and len(counted) == 2


def test_a_check_left_holding_the_job_is_taken_over_once_its_lease_has_passed(store, monkeypatch):
    made = _recording_tasks(monkeypatch)
    store.update_job(JOB_ID, {PROGRESS_CHECK_UNTIL: _at(T0 + 30)})  # a check that died while counting
    assert check_job_progress(JOB_ID, T0 + 29, store=store)["status"] == "busy" and len(made) == 1
    assert check_job_progress(JOB_ID, T0 + 31, store=store)["status"] == "running"


def test_the_completing_check_lets_go_in_its_completion(store, monkeypatch):
    _recording_tasks(monkeypatch)
    monkeypatch.setattr("shared.progress._notify_finished", lambda *a, **k: None)
    for gtin in ("00000000000017", "00000000000024"):
        store.create_item(JOB_ID, gtin, {"status": "succeeded", "attempt": 1, "round": 1})
    out = check_job_progress(JOB_ID, T0, store=store)
    assert out["completed"] and out["status"] == "completed"
    job = store.get_job(JOB_ID).doc
    assert job["status"] == "completed" and job[PROGRESS_CHECK_UNTIL] is None


def test_a_check_of_a_finished_job_neither_holds_nor_releases_it(store, monkeypatch):
    _recording_tasks(monkeypatch)
    store.update_job(JOB_ID, {"status": "completed"})
    writes = []
    real_update = store.update_job
    monkeypatch.setattr(store, "update_job", lambda job_id, fields: writes.append(fields) or real_update(job_id, fields))
    assert check_job_progress(JOB_ID, T0, store=store)["status"] == "completed"
    assert PROGRESS_CHECK_UNTIL not in store.get_job(JOB_ID).doc
    assert all(PROGRESS_CHECK_UNTIL not in w for w in writes)
