"""Worker state machine units (claim / cancel / heartbeat / complete) on the in-memory store.

The transitions are the pure functions of `shared/item_state.py`; the in-memory store runs them
exactly as the Firestore store does (read, decide, write, atomically).
"""

from __future__ import annotations

import datetime as dt

import pytest

from shared.exceptions import PermanentItemError, RetryableItemError
from shared.item_state import CancelKind, ClaimKind, CompleteKind, Create, HandlerOutcome
from shared.model import ITEM_HISTORY_LIMIT
from shared.payloads import ItemTask
from shared.store.memory import MemoryStore
from shared.worker import TaskDelivery, process_item_delivery
from shared.worker import job_cache, progress_requests

T0 = 1_900_000_000.0
LEASE = 30.0
TASK = ItemTask(job_id="job-1", gtin="00012345678905", upc="012345678905", line=7, round=1)


def _at(t):
    return dt.datetime.fromtimestamp(t, tz=dt.timezone.utc)


class Item:
    """One item of TASK's job in a fresh in-memory store, driven by the store's typed operations."""

    def __init__(self, data=None):
        self.store = MemoryStore()
        if data is not None:
            self.store.transact_item("seed", TASK.job_id, TASK.gtin, lambda _: (None, Create(dict(data))))

    @property
    def data(self):
        item = self.store.get_item(TASK.job_id, TASK.gtin)
        return None if item is None else item.doc

    def claim(self, owner, t, task=TASK, task_name="t"):
        return self.store.claim_item(task, task_name, owner, _at(t), _at(t + LEASE))

    def extend(self, owner, t):
        return self.store.extend_lease(TASK.job_id, TASK.gtin, owner, _at(t), _at(t + LEASE))

    def complete(self, owner, t, outcome):
        return self.store.complete_item(TASK.job_id, TASK.gtin, owner, _at(t), outcome)

    def cancel(self, owner, t):
        return self.store.cancel_item_of_cancelled_job(TASK, "t", owner, _at(t))

    def edit(self, **fields):
        self.store.items[TASK.job_id][TASK.gtin][1].update(fields)


def _claimed(owner="a", t=T0):
    item = Item()
    item.claim(owner, t, task_name="task-1")
    return item


# --- claim -------------------------------------------------------------------------------------


def test_claim_absent_item_creates_it_processing():
    ref = Item()
    claim = ref.claim("a", T0, task_name="task-1")
    assert claim.kind is ClaimKind.CLAIMED and claim.created and claim.attempt == 1
    d = ref.data
    assert d["status"] == "processing" and d["attempt"] == 1 and d["lease_owner"] == "a"
    assert d["lease_expires_at"] == _at(T0 + LEASE) and d["upc"] == "012345678905" and d["line"] == 7
    assert d["history"] == [{"status": "processing", "attempt": 1, "owner": "a", "at": _at(T0), "error_code": None}]


def test_every_item_carries_its_lease_shard_born_or_claimed():
    """The sweeper's lease-overrun query matches only items with a lease shard: items are born with
    it, and an item born before the shard existed gets it at its next claim (before it can overrun)."""
    from shared.naming import LEASE_SHARDS, lease_shard_for

    shard = lease_shard_for(TASK.gtin)
    assert 0 <= shard < LEASE_SHARDS and _claimed().data["lease_shard"] == shard
    legacy = Item({"status": "queued", "attempt": 0, "round": 1, "history": []})
    assert "lease_shard" not in legacy.data
    legacy.claim("a", T0)
    assert legacy.data["lease_shard"] == shard
    # spread: a sorted run of GTINs (a sorted input file) lands in every shard, evenly
    counts = [0] * LEASE_SHARDS
    for n in range(16_000):
        counts[lease_shard_for(f"{40_000_000_000_000 + n:014d}")] += 1
    assert min(counts) > 800 and max(counts) < 1200


@pytest.mark.parametrize("status", ["succeeded", "failed", "cancelled"])
def test_claim_terminal_is_noop(status):
    ref = Item({"status": status, "attempt": 2, "round": 1})
    before = dict(ref.data)
    assert ref.claim("b", T0).kind is ClaimKind.TERMINAL
    assert ref.data == before


def test_claim_live_lease_is_busy_expired_is_reclaimed():
    ref = _claimed("a")
    busy = ref.claim("b", T0 + LEASE - 0.001)
    assert busy.kind is ClaimKind.BUSY and busy.previous_owner == "a"
    again = ref.claim("b", T0 + LEASE + 0.001)
    assert again.kind is ClaimKind.CLAIMED and again.reclaimed and again.attempt == 2
    assert ref.data["lease_owner"] == "b" and [h["owner"] for h in ref.data["history"]] == ["a", "b"]


def test_claim_queued_item_after_operator_round_takes_new_round():
    ref = Item({"status": "queued", "attempt": 3, "round": 2, "history": []})
    assert ref.claim("b", T0).kind is ClaimKind.STALE_ROUND
    claim = ref.claim("b", T0, task=TASK.model_copy(update={"round": 2}), task_name="t2")
    assert claim.kind is ClaimKind.CLAIMED and claim.attempt == 4 and ref.data["round"] == 2 and ref.data["task_name"] == "t2"


def test_claim_unknown_status_is_not_touched():
    ref = Item({"status": "weird", "attempt": 1, "round": 1})
    assert ref.claim("b", T0).kind is ClaimKind.UNKNOWN_STATE


# --- heartbeat -----------------------------------------------------------------------------------


def test_extend_lease_only_for_owner():
    ref = _claimed("a")
    assert ref.extend("a", T0 + 10)
    assert ref.data["lease_expires_at"] == _at(T0 + 10 + LEASE)
    assert not ref.extend("b", T0 + 20)
    assert ref.data["lease_expires_at"] == _at(T0 + 10 + LEASE)


# --- complete ------------------------------------------------------------------------------------


def test_complete_success_stores_result_and_clears_error():
    ref = _claimed("a")
    ref.edit(error={"code": "old", "message": "m", "retryable": True})
    kind = ref.complete("a", T0 + 1, HandlerOutcome(result={"offer_id": "1"}))
    assert kind is CompleteKind.SUCCEEDED
    assert ref.data["status"] == "succeeded" and ref.data["result"] == {"offer_id": "1"} and ref.data["error"] is None
    assert ref.data["finished_at"] == _at(T0 + 1) and ref.data["lease_expires_at"] is None


def test_complete_retryable_requeues_until_the_retry_window_is_spent():
    """Issue 15: an item's retry budget is time since its first failure, not the task's last attempt."""
    err = RetryableItemError("offer lookup: GET /offer answered 503: down", code="marketplace_unavailable")
    window = 3600.0
    ref = _claimed("a")
    assert ref.complete("a", T0 + 1, HandlerOutcome(error=err, retry_window_s=window)) is CompleteKind.REQUEUED
    assert ref.data["status"] == "queued" and ref.data["lease_owner"] is None
    assert ref.data["error"] == {"code": "marketplace_unavailable", "message": err.message, "retryable": True}
    assert ref.data["first_failed_at"] == _at(T0 + 1)
    # a later failure inside the window: queued again, the first failure's time is kept
    ref.claim("b", T0 + window - 10)
    assert ref.complete("b", T0 + window - 5, HandlerOutcome(error=err, retry_window_s=window)) is CompleteKind.REQUEUED
    assert ref.data["first_failed_at"] == _at(T0 + 1)
    # the window is spent: failed, with the specific error and the budget named
    ref.claim("c", T0 + window + 1)
    assert ref.complete("c", T0 + window + 2, HandlerOutcome(error=err, retry_window_s=window)) is CompleteKind.FAILED
    assert ref.data["status"] == "failed" and ref.data["history"][-1]["error_code"] == "marketplace_unavailable"
    assert ref.data["error"]["code"] == "marketplace_unavailable"
    assert ref.data["error"]["message"].startswith("retry window of 1h 00m spent after 3 attempts; last error: offer lookup")


def test_a_resume_gives_open_items_a_fresh_retry_window():
    err = RetryableItemError("down", code="marketplace_unavailable")
    ref = _claimed("a")
    ref.complete("a", T0 + 1, HandlerOutcome(error=err, retry_window_s=100.0))
    ref.claim("b", T0 + 500)
    # 500 s since the first failure, but the job was resumed 50 s ago: the window runs from the resume
    outcome = HandlerOutcome(error=err, retry_window_s=100.0, window_floor=_at(T0 + 450))
    assert ref.complete("b", T0 + 500, outcome) is CompleteKind.REQUEUED
    ref.claim("c", T0 + 560)
    outcome = HandlerOutcome(error=err, retry_window_s=100.0, window_floor=_at(T0 + 450))
    assert ref.complete("c", T0 + 560, outcome) is CompleteKind.FAILED


def test_retry_window_defaults_to_the_setting(monkeypatch):
    from shared import config

    monkeypatch.setenv("UPCFAN_ITEM_RETRY_WINDOW_S", "10")
    config.settings.cache_clear()
    try:
        err = RetryableItemError("down", code="marketplace_timeout")
        ref = _claimed("a")
        assert ref.complete("a", T0 + 1, HandlerOutcome(error=err)) is CompleteKind.REQUEUED
        ref.claim("b", T0 + 20)
        assert ref.complete("b", T0 + 20, HandlerOutcome(error=err)) is CompleteKind.FAILED
    finally:
        config.settings.cache_clear()


def test_stop_for_a_paused_job_requeues_without_a_failure_and_for_a_cancelled_job_cancels():
    from shared.item_state import StopKind

    ref = _claimed("a")
    kind = ref.store.stop_item_for_job(TASK.job_id, TASK.gtin, "a", _at(T0 + 1), cancelled=False)
    assert kind is StopKind.RELEASED
    assert ref.data["status"] == "queued" and ref.data["lease_owner"] is None and ref.data["error"] is None
    assert not ref.data.get("first_failed_at") and ref.data["history"][-1]["error_code"] == "job_paused"
    ref.claim("b", T0 + 2)
    assert ref.store.stop_item_for_job(TASK.job_id, TASK.gtin, "x", _at(T0 + 3), cancelled=True) is StopKind.LEASE_LOST
    kind = ref.store.stop_item_for_job(TASK.job_id, TASK.gtin, "b", _at(T0 + 3), cancelled=True,
                                       side_effects_started=True)
    assert kind is StopKind.CANCELLED and ref.data["status"] == "cancelled" and ref.data["cancelled_midway"] is True
    assert ref.store.stop_item_for_job(TASK.job_id, TASK.gtin, "b", _at(T0 + 4), cancelled=True) \
        is StopKind.FINISHED_ELSEWHERE


def test_complete_permanent_fails():
    ref = _claimed("a")
    err = PermanentItemError("catalog lookup: 404", code="product_not_found")
    assert ref.complete("a", T0 + 1, HandlerOutcome(error=err)) is CompleteKind.FAILED
    assert ref.data["error"]["retryable"] is False


def test_complete_by_non_owner_is_lease_lost_and_after_terminal_finished_elsewhere():
    ref = _claimed("a")
    ref.claim("b", T0 + LEASE + 1)
    before = dict(ref.data)
    assert ref.complete("a", T0 + 50, HandlerOutcome(result={})) is CompleteKind.LEASE_LOST
    assert ref.data == before
    ref.complete("b", T0 + 50, HandlerOutcome(result={}))
    assert ref.complete("b", T0 + 51, HandlerOutcome(result={})) is CompleteKind.FINISHED_ELSEWHERE
    assert Item().complete("b", T0, HandlerOutcome(result={})) is CompleteKind.LEASE_LOST


def test_history_keeps_last_limit_entries():
    ref = _claimed("a")
    err = RetryableItemError("x", code="marketplace_timeout")
    for i in range(10):
        owner = f"o{i}"
        ref.claim(owner, T0 + 100 * (i + 1))
        ref.complete(owner, T0 + 100 * (i + 1) + 1, HandlerOutcome(error=err))
    assert len(ref.data["history"]) == ITEM_HISTORY_LIMIT
    assert ref.data["history"][-1]["owner"] == "o9" and ref.data["attempt"] == 11


# --- cancel --------------------------------------------------------------------------------------


def test_cancel_item_transitions():
    absent = Item()
    assert absent.cancel("a", T0) is CancelKind.CANCELLED and absent.data["status"] == "cancelled"
    queued = Item({"status": "queued", "attempt": 1, "round": 1, "history": []})
    assert queued.cancel("a", T0) is CancelKind.CANCELLED
    live = _claimed("x")
    assert live.cancel("a", T0 + 1) is CancelKind.BUSY and live.data["status"] == "processing"
    # its lease expired: an earlier delivery ran the handler, so it is finished, not cancelled
    assert live.cancel("a", T0 + LEASE + 1) is CancelKind.STARTED
    requeued = Item({"status": "queued", "attempt": 1, "round": 1, "history": [{"owner": "task:0:ab"}]})
    assert requeued.cancel("a", T0) is CancelKind.STARTED and requeued.data["status"] == "queued"
    done = Item({"status": "succeeded", "attempt": 1, "round": 1})
    assert done.cancel("a", T0) is CancelKind.TERMINAL and done.data["status"] == "succeeded"


# --- delivery identity and payload ---------------------------------------------------------------


def test_delivery_from_headers_is_case_insensitive_and_computes_last_attempt():
    d = TaskDelivery.from_headers({"x-cloudtasks-taskname": "n1", "X-CloudTasks-TaskRetryCount": "7", "X-CloudTasks-TaskExecutionCount": "5"}, 8)
    assert d.task_name == "n1" and d.retry_count == 7 and d.execution_count == 5 and d.last_attempt
    assert d.owner.startswith("n1:7:") and len(d.owner.split(":")[2]) == 8
    d2 = TaskDelivery.from_headers({"X-CloudTasks-TaskRetryCount": "six"}, 8)
    assert d2.retry_count == 0 and not d2.last_attempt and d2.task_name == "direct"
    # unlimited attempts (the item queue's -1): no delivery is ever the last one
    assert not TaskDelivery.from_headers({"X-CloudTasks-TaskRetryCount": "100000"}, -1).last_attempt
    assert TaskDelivery.from_headers({}, 8).owner != TaskDelivery.from_headers({}, 8).owner


class ExplodingStore:
    def __getattr__(self, name):
        raise AssertionError("a malformed payload must not touch the store")


@pytest.mark.parametrize(
    "payload",
    [
        None,
        [],
        "text",
        {},
        {"job_id": "j", "gtin": "123", "upc": "1", "line": 1, "round": 1},
        {"job_id": "j", "gtin": "00012345678905", "upc": "1", "line": 0, "round": 1},
        {"job_id": "j", "gtin": "00012345678905", "upc": "1", "line": 1, "round": "x"},
        {"job_id": "../x", "gtin": "00012345678905", "upc": "1", "line": 1, "round": 1},
    ],
)
def test_malformed_payload_is_200_bad_payload_without_store(payload):
    out = process_item_delivery(payload, {}, store=ExplodingStore())
    assert out.http_status == 200 and out.body["status"] == "bad_payload"
    assert out.body["error"]["code"] == "bad_payload" and "can never succeed" in out.body["error"]["message"]


def test_store_fault_becomes_503_not_a_crash():
    from google.api_core import exceptions as gexc

    class DownStore(MemoryStore):
        def get_job(self, job_id):
            raise gexc.ServiceUnavailable("emulator gone")

    job_cache.JOB_CACHE.clear()
    out = process_item_delivery(TASK.model_dump(), {}, store=DownStore())
    assert out.http_status == 503 and out.body["error"]["code"] == "store_unavailable"
    assert "emulator gone" in out.body["error"]["message"]


# --- progress check requests ---------------------------------------------------------------------


def test_progress_check_request_named_per_window_and_deduplicated(monkeypatch):
    from shared import config, tasks
    from shared.naming import progress_task_name_for

    monkeypatch.setenv("UPCFAN_WORKER_URL", "http://127.0.0.1:9/")
    monkeypatch.setenv("UPCFAN_PROGRESS_CHECK_S", "5")
    config.settings.cache_clear()
    calls = []
    monkeypatch.setattr(tasks, "create_task", lambda queue, spec: calls.append((queue, spec)) or True)
    progress_requests.PROGRESS_REQUESTS.seen.clear()
    try:
        now = 1_000_003.2  # window 200000 spans [1_000_000, 1_000_005)
        assert progress_requests.request_progress_check("job-p", now) == progress_task_name_for("job-p", 200_000)
        assert progress_requests.request_progress_check("job-p", now + 1) is None  # same window: no RPC
        queue, spec = calls[0]
        assert queue.endswith("/queues/upcfan-control") and spec.url == "http://127.0.0.1:9/progress"
        assert spec.payload == {"job_id": "job-p"}
        assert spec.schedule_time == _at(1_000_006.0)
        assert progress_requests.request_progress_check("job-p", now + 5) is not None and len(calls) == 2
    finally:
        config.settings.cache_clear()


def test_progress_check_enqueue_failure_is_logged_not_raised(monkeypatch):
    from shared import config, tasks

    monkeypatch.setenv("UPCFAN_WORKER_URL", "http://127.0.0.1:9")
    config.settings.cache_clear()

    def boom(queue, spec):
        raise RuntimeError("tasks API down")

    monkeypatch.setattr(tasks, "create_task", boom)
    progress_requests.PROGRESS_REQUESTS.seen.clear()
    try:
        assert progress_requests.request_progress_check("job-q", 50.0) is None
        assert ("job-q", 10) not in progress_requests.PROGRESS_REQUESTS.seen  # a later completion may try again
    finally:
        config.settings.cache_clear()


def test_started_in_current_round_tells_requeued_deliveries_from_operator_rounds():
    from shared.model import started_in_current_round

    assert started_in_current_round({"status": "processing"})
    assert started_in_current_round({"status": "queued", "attempt": 1,
                                     "history": [{"owner": "task:0:ab", "status": "queued"}]})
    assert not started_in_current_round({"status": "queued", "attempt": 1,
                                         "history": [{"owner": "retry:ops", "status": "queued"}]})
    # Born at fan-out and never claimed (attempt 0): nothing ran, whoever wrote its history.
    assert not started_in_current_round({"status": "queued", "attempt": 0,
                                         "history": [{"owner": "fanout:c0", "status": "queued"}]})
    assert not started_in_current_round({"status": "succeeded", "history": [{"owner": "task:0:ab"}]})


def test_a_job_naming_an_unknown_handler_fails_its_items_with_that_reason():
    """A handler removed after the job was written: the item ends failed with a specific error (200),
    so the job still completes instead of its tasks being retried to exhaustion."""
    from shared.events import Event

    store = MemoryStore()
    store.create_job({"job_id": TASK.job_id, "status": "running", "options": {"handler": "no_such_handler"},
                      "round": 1}, Event("created", "test", _at(T0)))
    job_cache.JOB_CACHE.clear()
    out = process_item_delivery(TASK.model_dump(), {"X-CloudTasks-TaskName": "t1"}, now=T0, store=store)
    assert out.http_status == 200 and out.body["status"] == "failed"
    assert out.body["error"]["code"] == "unknown_handler" and "no_such_handler" in out.body["error"]["message"]
    item = store.get_item(TASK.job_id, TASK.gtin)
    assert item.status == "failed" and item.doc["error"]["retryable"] is False
