"""Worker state machine and progress checks against a real Firestore emulator."""

from __future__ import annotations

import datetime as dt
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from shared.config import settings
from shared.exceptions import PermanentItemError, RetryableItemError
from shared.handlers import ItemContext, ItemHandler
from shared.model import EVENTS, ITEMS, JOBS
from shared.progress import check_job_progress, job_counts
from shared.item_state import HandlerOutcome
from shared.payloads import ItemTask
from shared.store import TXN_COUNTER
from shared.store.firestore import FirestoreStore
from shared.worker import process_item_delivery
from shared.worker.delivery import utc

T0 = 1_900_000_000.0  # fake clock start for lease arithmetic
LEASE_S = 30.0


def _gtin(n: int) -> str:
    """A valid GTIN-14 for index n (UPC-A with check digit, zero-padded)."""
    body = f"{n:011d}"
    total = sum(int(d) * (3 if i % 2 == 0 else 1) for i, d in enumerate(body))
    upc = body + str((10 - total % 10) % 10)
    return upc.zfill(14)


def _payload(job_id: str, n: int = 1, round_: int = 1) -> dict:
    gtin = _gtin(n)
    return {"job_id": job_id, "gtin": gtin, "upc": gtin[2:], "line": n, "round": round_}


def _headers(retry: int = 0, name: str = "task") -> dict:
    return {"X-CloudTasks-TaskName": name, "X-CloudTasks-TaskRetryCount": str(retry), "X-CloudTasks-TaskExecutionCount": str(retry)}


class RecordingHandler(ItemHandler):
    name = "recording"

    def __init__(self, fn=None):
        self.calls: list[ItemContext] = []
        self._lock = threading.Lock()
        self._fn = fn

    def handle(self, item: ItemContext) -> dict:
        with self._lock:
            self.calls.append(item)
        if self._fn:
            return self._fn(item)
        return {"offer_id": f"o-{item.gtin}", "sku": item.gtin, "created": True}


def _wait_until(predicate, timeout_s: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.01)  # polling with a deadline, not synchronising by sleep
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def db(firestore_emulator):
    return firestore_emulator


@pytest.fixture
def job(db):
    """A running job with 3 planned items; returns its id."""
    return _make_job(db, items=3)


def _make_job(db, items: int, status: str = "running", fanout_done: bool = True, options=None) -> str:
    job_id = f"job-{uuid.uuid4().hex[:10]}"
    db.collection(JOBS).document(job_id).set(
        {
            "job_id": job_id,
            "status": status,
            "options": options or {"test_mode": True},
            "totals": {"lines": items, "items": items, "invalid": 0, "duplicate": 0, "skipped": 0},
            "round": 1,
            "fanout_done_at": dt.datetime.now(dt.timezone.utc) if fanout_done else None,
        }
    )
    return job_id


def _item(db, job_id: str, n: int = 1) -> dict | None:
    snap = db.collection(JOBS).document(job_id).collection(ITEMS).document(_gtin(n)).get()
    return snap.to_dict() if snap.exists else None


def _claim(db, job_id: str, owner: str, now: float, lease_s: float, n: int = 1):
    """Another delivery's claim of item n, made directly on the store."""
    return FirestoreStore(db).claim_item(ItemTask(**_payload(job_id, n)), "t", owner, utc(now), utc(now + lease_s))


def _deliver(db, job_id, n=1, handler=None, retry=0, now=T0, **kw):
    return process_item_delivery(_payload(job_id, n), _headers(retry), now=now, handler=handler, store=FirestoreStore(db), lease_s=LEASE_S, **kw)


def test_happy_path_two_transactions_and_item_born_at_claim(db, job):
    handler = RecordingHandler()
    assert _item(db, job) is None
    TXN_COUNTER.reset()
    outcomes = [_deliver(db, job, n, handler) for n in (1, 2, 3)]
    assert [o.http_status for o in outcomes] == [200, 200, 200]
    assert TXN_COUNTER.snapshot() == {"claim": 3, "complete": 3}
    item = _item(db, job, 1)
    assert item["status"] == "succeeded" and item["attempt"] == 1 and item["round"] == 1
    assert item["result"]["offer_id"] == f"o-{_gtin(1)}"
    assert item["upc"] == _gtin(1)[2:] and item["line"] == 1
    assert [h["status"] for h in item["history"]] == ["processing", "succeeded"]
    assert item["lease_expires_at"] is None and item["finished_at"] is not None


def test_concurrent_deliveries_run_handler_once(db, job):
    n_threads = 6
    finished = []
    lock = threading.Lock()

    def slow(item):
        # Hold the lease until every other delivery has answered.
        _wait_until(lambda: len(finished) >= n_threads - 1, what="other deliveries to answer")
        return {"ok": True}

    handler = RecordingHandler(slow)
    barrier = threading.Barrier(n_threads)

    def one(i):
        barrier.wait()
        out = process_item_delivery(_payload(job), _headers(name=f"t{i}"), store=FirestoreStore(db), handler=handler, lease_s=LEASE_S)
        with lock:
            finished.append(out.http_status)
        return out

    with ThreadPoolExecutor(n_threads) as pool:
        outcomes = list(pool.map(one, range(n_threads)))
    assert len(handler.calls) == 1
    statuses = sorted(o.http_status for o in outcomes)
    assert statuses == [200] + [409] * (n_threads - 1)
    assert _item(db, job)["status"] == "succeeded"
    assert _item(db, job)["attempt"] == 1


def test_done_item_redelivered_is_noop(db, job):
    handler = RecordingHandler()
    assert _deliver(db, job, handler=handler).body["status"] == "succeeded"
    again = _deliver(db, job, handler=handler, retry=1, now=T0 + 1000)
    assert again.http_status == 200 and again.body["status"] == "noop" and again.body["item_status"] == "succeeded"
    assert len(handler.calls) == 1


def test_live_lease_answers_409(db, job):
    _claim(db, job, "other:0:x", T0, LEASE_S)
    handler = RecordingHandler()
    out = _deliver(db, job, handler=handler, now=T0 + LEASE_S - 1)
    assert out.http_status == 409 and out.body["holder"] == "other:0:x"
    assert handler.calls == []


def test_expired_lease_is_reclaimed_as_attempt_2(db, job):
    _claim(db, job, "crashed:0:x", T0, LEASE_S)
    handler = RecordingHandler()
    out = _deliver(db, job, handler=handler, retry=1, now=T0 + LEASE_S + 1)
    assert out.http_status == 200 and out.body["status"] == "succeeded" and out.body["attempt"] == 2
    assert handler.calls[0].attempt == 2
    item = _item(db, job)
    assert item["attempt"] == 2
    assert [h["owner"] for h in item["history"]][0] == "crashed:0:x"


def test_lost_lease_discards_result_at_complete(db, job):

    def steal_then_return(item):
        # Another delivery takes over after our lease ran out (fake clock far ahead).
        _claim(db, job, "thief:1:y", T0 + 10 * LEASE_S, LEASE_S)
        return {"offer_id": "mine"}

    out = _deliver(db, job, handler=RecordingHandler(steal_then_return), heartbeat_s=3600)
    # 409, not 200: the item is still open, and only this task's next delivery can re-drive it
    # if the thief dies or re-queues it.
    assert out.http_status == 409 and out.body["status"] == "lease_lost"
    item = _item(db, job)
    assert item["status"] == "processing" and item["lease_owner"] == "thief:1:y" and item["result"] is None


def test_result_after_another_delivery_finished_the_item_is_a_200(db, job):

    def other_delivery_finishes_first(item):
        thief = "thief:1:y"
        _claim(db, job, thief, T0 + 10 * LEASE_S, LEASE_S)
        FirestoreStore(db).complete_item(job, _gtin(1), thief, utc(T0 + 10 * LEASE_S + 1),
                                         HandlerOutcome(result={"offer_id": "theirs"}))
        return {"offer_id": "theirs"}

    out = _deliver(db, job, handler=RecordingHandler(other_delivery_finishes_first), heartbeat_s=3600)
    assert out.http_status == 200 and out.body["status"] == "finished_elsewhere"
    assert _item(db, job)["status"] == "succeeded"


def test_lost_lease_seen_by_heartbeat_skips_complete(db, job):

    def steal_and_wait_for_heartbeat(item):
        _claim(db, job, "thief:1:y", T0 + 10 * LEASE_S, LEASE_S)
        _wait_until(lambda: not item.heartbeat(), what="heartbeat to notice the lost lease")
        return {"offer_id": "mine"}

    TXN_COUNTER.reset()
    out = _deliver(db, job, handler=RecordingHandler(steal_and_wait_for_heartbeat), heartbeat_s=0.05)
    assert out.http_status == 409 and out.body["status"] == "lease_lost"
    assert "complete" not in TXN_COUNTER.snapshot()
    assert _item(db, job)["lease_owner"] == "thief:1:y"


def test_heartbeat_extends_lease_while_handler_runs(db, job):
    def wait_for_beats(item):
        ref = db.collection(JOBS).document(job).collection(ITEMS).document(item.gtin)
        first = ref.get().to_dict()["lease_expires_at"]
        _wait_until(lambda: ref.get().to_dict()["lease_expires_at"] > first, what="a heartbeat")
        return {}

    out = _deliver(db, job, handler=RecordingHandler(wait_for_beats), heartbeat_s=0.05)
    assert out.body["status"] == "succeeded"


def test_retryable_error_requeues_with_503_then_succeeds(db, job):
    def flaky(item):
        if item.attempt == 1:
            raise RetryableItemError("offer create: POST /offer answered 503: down", code="marketplace_unavailable")
        return {"offer_id": "o1"}

    handler = RecordingHandler(flaky)
    first = _deliver(db, job, handler=handler)
    assert first.http_status == 503 and first.body["status"] == "queued"
    item = _item(db, job)
    assert item["status"] == "queued" and item["lease_owner"] is None
    assert item["error"] == {"code": "marketplace_unavailable", "message": "offer create: POST /offer answered 503: down", "retryable": True}
    second = _deliver(db, job, handler=handler, retry=1, now=T0 + 5)
    assert second.http_status == 200 and second.body["status"] == "succeeded"
    item = _item(db, job)
    assert item["attempt"] == 2 and item["error"] is None
    assert [h["status"] for h in item["history"]] == ["processing", "queued", "processing", "succeeded"]
    assert item["history"][1]["error_code"] == "marketplace_unavailable"


def test_permanent_error_fails_with_200(db, job):
    def reject(item):
        raise PermanentItemError("offer create: POST /offer answered 400 (errorId 25709): Invalid sku", code="marketplace_rejected")

    out = _deliver(db, job, handler=RecordingHandler(reject))
    assert out.http_status == 200 and out.body["status"] == "failed"
    item = _item(db, job)
    assert item["status"] == "failed" and item["error"]["code"] == "marketplace_rejected" and not item["error"]["retryable"]
    assert "Invalid sku" in item["error"]["message"]


def test_retry_window_spent_turns_retryable_into_failed(db, job):
    """Issue 15: the item's retry budget is time since its first failure (was: the task's last attempt)."""
    def down(item):
        raise RetryableItemError("catalog lookup: GET /catalog answered 503: maintenance", code="marketplace_unavailable")

    window = settings().item_retry_window_s
    first = _deliver(db, job, handler=RecordingHandler(down))
    first_failed_at = _item(db, job)["first_failed_at"]
    assert first.http_status == 503 and abs((first_failed_at - utc(T0)).total_seconds()) < 5  # the fake clock runs
    # inside the window, on any attempt (there is no last one): queued again, 503
    inside = _deliver(db, job, handler=RecordingHandler(down), retry=10_000, now=T0 + window - 60)
    assert inside.http_status == 503 and inside.body["status"] == "queued"
    assert _item(db, job)["first_failed_at"] == first_failed_at
    out = _deliver(db, job, handler=RecordingHandler(down), retry=1, now=T0 + window + 1)
    assert out.http_status == 200 and out.body["status"] == "failed"
    item = _item(db, job)
    assert item["status"] == "failed" and item["error"]["code"] == "marketplace_unavailable"
    assert "maintenance" in item["error"]["message"] and "retry window of 6h 00m spent after 3 attempts" in \
        item["error"]["message"]


def test_cancelled_job_cancels_items(db):
    job_id = _make_job(db, items=3, status="cancelled")
    item_refs = db.collection(JOBS).document(job_id).collection(ITEMS)
    # item 2 was queued by a retryable failure, item 3 already succeeded
    item_refs.document(_gtin(2)).set({"status": "queued", "attempt": 1, "round": 1, "history": []})
    item_refs.document(_gtin(3)).set({"status": "succeeded", "attempt": 1, "round": 1, "history": []})
    handler = RecordingHandler()
    outs = [_deliver(db, job_id, n, handler) for n in (1, 2, 3)]
    assert [o.http_status for o in outs] == [200, 200, 200]
    assert [o.body["status"] for o in outs] == ["cancelled", "cancelled", "terminal"]
    assert handler.calls == []
    assert [_item(db, job_id, n)["status"] for n in (1, 2, 3)] == ["cancelled", "cancelled", "succeeded"]
    result = check_job_progress(job_id, store=FirestoreStore(db))
    assert result["status"] == "cancelled" and result["counts"]["cancelled"] == 2
    job = db.collection(JOBS).document(job_id).get().to_dict()
    assert job["status"] == "cancelled" and job["counts"]["succeeded"] == 1


def test_cancelled_job_item_under_a_live_lease_answers_409(db):
    """The holder may die or re-queue after this answer; a 200 here would end the only task."""
    job_id = _make_job(db, items=1, status="cancelled")
    _claim(db, job_id, "holder:0:x", T0, LEASE_S)
    out = _deliver(db, job_id, 1, RecordingHandler(), now=T0 + 1)
    assert out.http_status == 409 and out.body["status"] == "busy"
    assert _item(db, job_id, 1)["status"] == "processing"


def test_a_busy_item_answers_409_on_any_attempt_without_waiting(db, job):
    """Issue 15: with unlimited attempts no delivery is the last one, so none waits for a holder (the
    old last attempt did, then its 409 ended the task); a 409 never ends a task now."""
    _claim(db, job, "live:0:x", T0, LEASE_S)
    handler = RecordingHandler()
    started = time.monotonic()
    out = _deliver(db, job, 1, handler, retry=10_000, now=T0 + 0.5)
    assert out.http_status == 409 and out.body["status"] == "busy" and handler.calls == []
    assert time.monotonic() - started < 5.0


def test_cancelled_job_finishes_an_item_whose_handler_already_ran(db):
    """Requeued after a retryable error (its effect may exist): finished truthfully, not cancelled."""
    job_id = _make_job(db, items=1, status="cancelled")
    ref = db.collection(JOBS).document(job_id).collection(ITEMS).document(_gtin(1))
    ref.set({"status": "queued", "attempt": 1, "round": 1, "history": [{"status": "queued", "owner": "t:0:aa"}]})
    handler = RecordingHandler()
    out = _deliver(db, job_id, 1, handler)
    assert out.http_status == 200 and len(handler.calls) == 1
    assert _item(db, job_id, 1)["status"] == "succeeded" and _item(db, job_id, 1)["attempt"] == 2


class SideEffectHandler(ItemHandler):
    """Checks `item.heartbeat()` right before its side effect, as the marketplace handler does."""

    name = "side_effect"

    def __init__(self, error=None, before=None, during=None):
        self.error, self.before, self.during = error, before, during
        self.effects = 0
        self._lock = threading.Lock()

    def handle(self, item: ItemContext) -> dict:
        from shared.exceptions import LeaseLostError

        if self.before:
            self.before(item)
        if not item.heartbeat():
            raise LeaseLostError("lease or job check failed before the side effect")
        with self._lock:
            self.effects += 1
        if self.during:
            self.during(item)
        if self.error:
            raise self.error
        return {"offer_id": f"o-{item.gtin}"}


def _job_doc(db, job_id):
    return db.collection(JOBS).document(job_id).get().to_dict()


def _events(db, job_id):
    return [e.to_dict() for e in db.collection(JOBS).document(job_id).collection(EVENTS).stream()]


def test_cancelled_job_stops_a_requeued_item_before_its_side_effect(db):
    """Issue 15 hole: cancel did not stop new side effects for an item re-queued after a retryable error."""
    job_id = _make_job(db, items=1, status="cancelled")
    ref = db.collection(JOBS).document(job_id).collection(ITEMS).document(_gtin(1))
    ref.set({"status": "queued", "attempt": 1, "round": 1, "history": [{"status": "queued", "owner": "t:0:aa"}]})
    handler = SideEffectHandler()
    out = _deliver(db, job_id, 1, handler)
    assert out.http_status == 200 and out.body["status"] == "cancelled" and handler.effects == 0
    item = _item(db, job_id, 1)
    assert item["status"] == "cancelled" and item["cancelled_midway"] is False


def test_paused_job_answers_503_without_claiming_then_resume_lets_it_run(db):
    from shared.worker.job_cache import JOB_CACHE

    store = FirestoreStore(db)
    job_id = _make_job(db, items=1)
    store.pause_job(job_id, {"code": "operator", "message": "maintenance"}, "ops@example.com", utc(T0))
    JOB_CACHE.clear()
    handler = SideEffectHandler()
    out = _deliver(db, job_id, 1, handler, retry=3)
    assert out.http_status == 503 and out.body["status"] == "job_paused"
    assert _item(db, job_id, 1) is None and handler.effects == 0  # no claim, no attempt spent
    assert store.resume_job(job_id, "ops@example.com", utc(T0 + 10)).status == "running"
    JOB_CACHE.clear()
    out = _deliver(db, job_id, 1, handler, retry=4, now=T0 + 11)
    assert out.http_status == 200 and out.body["status"] == "succeeded" and handler.effects == 1
    assert _item(db, job_id, 1)["attempt"] == 1
    assert [e["type"] for e in sorted(_events(db, job_id), key=lambda e: e["at"])] == ["paused", "resumed"]


def test_a_pause_during_a_delivery_releases_the_item_without_spending_its_window(db):
    job_id = _make_job(db, items=1)
    store = FirestoreStore(db)
    pause = lambda item: store.pause_job(job_id, {"code": "operator", "message": "m"}, "op", utc(T0))  # noqa: E731
    out = _deliver(db, job_id, 1, SideEffectHandler(before=pause))
    assert out.http_status == 503 and out.body["released"] is True
    item = _item(db, job_id, 1)
    assert item["status"] == "queued" and item["lease_owner"] is None and item["error"] is None
    assert not item.get("first_failed_at") and item["history"][-1]["error_code"] == "job_paused"


def test_a_resume_gives_an_open_item_a_fresh_retry_window(db):
    from shared.worker.job_cache import JOB_CACHE

    store = FirestoreStore(db)
    job_id = _make_job(db, items=1)
    window = settings().item_retry_window_s
    down = SideEffectHandler(error=RetryableItemError("offer lookup answered 503", code="marketplace_unavailable"))
    assert _deliver(db, job_id, 1, down).http_status == 503  # first failure at T0
    store.pause_job(job_id, {"code": "operator", "message": "m"}, "op", utc(T0 + 60))
    store.resume_job(job_id, "op", utc(T0 + window - 60))
    JOB_CACHE.clear()
    # past the window since the first failure, inside it since the resume: still queued
    out = _deliver(db, job_id, 1, down, retry=5, now=T0 + window + 60)
    assert out.http_status == 503 and _item(db, job_id, 1)["status"] == "queued"


def test_unauthorized_pauses_the_job_once_with_one_alert_event(db):
    """Concurrent deliveries all get 401: the job pauses once, one alert (its `pause_note`), and every
    item goes back to queued without a failure; later deliveries answer 503 without claiming."""
    from shared.worker.job_cache import JOB_CACHE

    job_id = _make_job(db, items=4)
    err = PermanentItemError("catalog lookup: GET /catalog answered 401: Invalid access token",
                             code="marketplace_unauthorized")
    barrier = threading.Barrier(4)
    handler = SideEffectHandler(error=err, during=lambda item: barrier.wait(timeout=20))
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda n: _deliver(db, job_id, n, handler), range(1, 5)))
    assert [o.http_status for o in outs] == [503] * 4
    job = _job_doc(db, job_id)
    assert job["status"] == "paused" and job["pause"]["code"] == "marketplace_unauthorized"
    types = [e["type"] for e in _events(db, job_id)]
    assert types.count("paused") == 1 and types.count("pause_note") == 1
    assert [_item(db, job_id, n)["status"] for n in range(1, 5)] == ["queued"] * 4
    JOB_CACHE.clear()
    again = _deliver(db, job_id, 1, handler, retry=1)
    assert again.http_status == 503 and again.body["status"] == "job_paused" and handler.effects == 4


def test_a_paused_job_whose_items_are_final_completes_only_after_resume(db):
    store = FirestoreStore(db)
    job_id = _make_job(db, items=1)
    _deliver(db, job_id, 1, RecordingHandler())
    store.pause_job(job_id, {"code": "operator", "message": "m"}, "op", utc(T0))
    assert check_job_progress(job_id, store=store)["completed"] is False
    assert _job_doc(db, job_id)["status"] == "paused"
    store.resume_job(job_id, "op", utc(T0 + 1))
    assert check_job_progress(job_id, store=store)["status"] == "completed"


def test_stale_round_and_missing_job_are_noops(db, job):
    handler = RecordingHandler()
    item_ref = db.collection(JOBS).document(job).collection(ITEMS).document(_gtin(1))
    item_ref.set({"status": "queued", "attempt": 1, "round": 2, "history": []})
    out = process_item_delivery(_payload(job, round_=1), _headers(), now=T0, store=FirestoreStore(db), handler=handler)
    assert out.http_status == 200 and out.body["reason"] == "stale_round"
    out = process_item_delivery(_payload("no-such-job"), _headers(), now=T0, store=FirestoreStore(db), handler=handler)
    assert out.http_status == 200 and out.body["status"] == "job_missing"
    assert handler.calls == []
    # the round-2 task does run it
    out = process_item_delivery(_payload(job, round_=2), _headers(), now=T0, store=FirestoreStore(db), handler=handler)
    assert out.body["status"] == "succeeded" and _item(db, job)["attempt"] == 2


def test_poison_pill_fails_alone(db):
    job_id = _make_job(db, items=5)

    def poison(item):
        if item.gtin == _gtin(3):
            raise MemoryError("parser blew up on this product")
        return {"ok": True}

    with ThreadPoolExecutor(5) as pool:
        outs = list(pool.map(lambda n: _deliver(db, job_id, n, RecordingHandler(poison)), range(1, 6)))
    assert [o.http_status for o in outs] == [200, 200, 503, 200, 200]  # the crash is retried with backoff
    statuses = [_item(db, job_id, n)["status"] for n in range(1, 6)]
    assert statuses == ["succeeded", "succeeded", "queued", "succeeded", "succeeded"]
    out = _deliver(db, job_id, 3, RecordingHandler(poison), retry=1, now=T0 + settings().item_retry_window_s + 1)
    assert out.http_status == 200 and _item(db, job_id, 3)["status"] == "failed"
    error = _item(db, job_id, 3)["error"]
    assert error["code"] == "handler_crashed" and "MemoryError" in error["message"] and "parser blew up" in error["message"]


def test_progress_counts_then_completes_exactly_once_under_concurrent_checks(db):
    job_id = _make_job(db, items=4, fanout_done=False)

    def maybe_fail(item):
        if item.gtin == _gtin(4):
            raise PermanentItemError("catalog lookup: GET /catalog/v1/product answered 404: no product", code="product_not_found")
        return {"ok": True}

    for n in (1, 2):
        _deliver(db, job_id, n, RecordingHandler(maybe_fail))
    early = check_job_progress(job_id, store=FirestoreStore(db))
    assert early["completed"] is False and early["counts"]["succeeded"] == 2 and early["changed"] is True
    assert check_job_progress(job_id, store=FirestoreStore(db))["changed"] is False  # unchanged counts are not rewritten
    counts = job_counts(job_id, store=FirestoreStore(db))
    assert counts["born"] == 2 and counts["never_claimed"] == 2

    for n in (3, 4):
        _deliver(db, job_id, n, RecordingHandler(maybe_fail))
    # all items terminal, but fan-out not done: no completion yet
    assert check_job_progress(job_id, store=FirestoreStore(db))["completed"] is False
    db.collection(JOBS).document(job_id).update({"fanout_done_at": dt.datetime.now(dt.timezone.utc)})

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: check_job_progress(job_id, store=FirestoreStore(db)), range(8)))
    assert sum(1 for r in results if r["completed"]) == 1
    job = db.collection(JOBS).document(job_id).get().to_dict()
    assert job["status"] == "completed_with_failures" and job["completed_at"] is not None
    assert job["counts"] == {"queued": 0, "processing": 0, "succeeded": 3, "failed": 1, "cancelled": 0}
    events = [e.to_dict() for e in db.collection(JOBS).document(job_id).collection(EVENTS).stream()]
    # the completion, and the job-finished note's outcome (no webhook here: not sent)
    assert sorted(e["type"] for e in events) == ["completed", "job_finished_note"]
    # a later check changes nothing
    assert check_job_progress(job_id, store=FirestoreStore(db))["completed"] is False
    assert db.collection(JOBS).document(job_id).get().to_dict()["status"] == "completed_with_failures"


def test_progress_all_succeeded_completes(db):
    job_id = _make_job(db, items=2)
    for n in (1, 2):
        _deliver(db, job_id, n, RecordingHandler())
    assert check_job_progress(job_id, store=FirestoreStore(db))["status"] == "completed"


def _born(job: str, n: int, line: int | None = None) -> dict:
    from shared import item_state

    task = ItemTask(**{**_payload(job, n), "line": line if line is not None else n})
    return item_state.born_queued(task, f"t-{n}", utc(T0), owner=f"fanout:c{line or n}")


def test_create_items_in_one_batch_write_some_existing(db, job):
    """Issue 15 (fan-out cost): items are created in batches, each write on its own; a batch where
    some items exist creates the others and returns the existing ones as they are (this line's own
    item, or another line's: the chunk decides duplicate-in-file from it), never overwriting them."""
    store = FirestoreStore(db)
    assert store.create_items(job, {_gtin(n): _born(job, n) for n in (1, 2)}) == {_gtin(1): None, _gtin(2): None}
    # 1: created by another line (a duplicate), 2: this line's own (an earlier attempt), 3 and 4: new
    got = store.create_items(job, {_gtin(1): _born(job, 1, line=50), _gtin(2): _born(job, 2),
                                   _gtin(3): _born(job, 3), _gtin(4): _born(job, 4)})
    assert set(got) == {_gtin(n) for n in (1, 2, 3, 4)}
    assert got[_gtin(3)] is None and got[_gtin(4)] is None
    assert got[_gtin(1)].doc["line"] == 1 and got[_gtin(1)].never_claimed and got[_gtin(1)].gtin == _gtin(1)
    assert got[_gtin(2)].doc["line"] == 2 and got[_gtin(2)].version is not None
    assert _item(db, job, 1)["line"] == 1 and _item(db, job, 4)["status"] == "queued"
    assert store.count_never_claimed(job) == 4
    with pytest.raises(ValueError, match="at most 500"):
        store.create_items(job, {f"{n:014d}": _born(job, 1) for n in range(501)})


class _FaultyBatch:
    """A BatchWrite batch whose first commit does not send the writes of `fail` and answers them with
    `code` (a google.rpc.Code): what BatchWrite reports for a write it could not apply. It takes the
    store's Writes as `BulkWriteBatch._add_write_pbs` does (shared/store/raw_writes.py builds them)."""

    commits = 0

    def __init__(self, db, fail: set[str], code: int):
        from google.cloud.firestore_v1.bulk_batch import BulkWriteBatch

        self.real, self.fail, self.code, self.writes = BulkWriteBatch(db), fail, code, []

    def _add_write_pbs(self, write_pbs):
        self.writes.extend(write_pbs)

    def commit(self, retry=None):
        from types import SimpleNamespace

        def doc_id(write) -> str:
            return write.update.name.rsplit("/", 1)[-1]

        type(self).commits += 1
        first = type(self).commits == 1
        sent = [w for w in self.writes if not (first and doc_id(w) in self.fail)]
        self.real._add_write_pbs(sent)
        answers = iter(self.real.commit(retry=retry).status if sent else [])
        return SimpleNamespace(status=[SimpleNamespace(code=self.code, message="injected")
                                       if first and doc_id(w) in self.fail else next(answers)
                                       for w in self.writes])


@pytest.mark.parametrize("code,retried", [(14, True), (10, True), (7, False)], ids=["unavailable", "aborted",
                                                                                 "permission_denied"])
def test_create_items_resends_a_write_that_failed_transiently_and_raises_others(db, job, monkeypatch, code, retried):
    """Per-write faults of a BatchWrite: a transient one is sent again under STORE_BATCH_WRITE (the
    writes that succeeded are not), any other raises, so the chunk task fails and Cloud Tasks retries it."""
    from google.api_core import exceptions as gexc

    from shared.store import firestore as fs_store

    _FaultyBatch.commits = 0
    monkeypatch.setattr(fs_store, "_bulk_batch", lambda client: _FaultyBatch(client, {_gtin(2)}, code))
    store = FirestoreStore(db)
    docs = {_gtin(n): _born(job, n) for n in (1, 2, 3)}
    if not retried:
        with pytest.raises(gexc.PermissionDenied):
            store.create_items(job, docs)
        assert _FaultyBatch.commits == 1 and _item(db, job, 1)["line"] == 1
        assert db.collection(JOBS).document(job).collection(ITEMS).document(_gtin(2)).get().exists is False
        return
    assert store.create_items(job, docs) == {_gtin(n): None for n in (1, 2, 3)}
    assert _FaultyBatch.commits == 2
    assert [_item(db, job, n)["line"] for n in (1, 2, 3)] == [1, 2, 3]


def test_items_born_at_fanout_create_if_absent_then_claim_as_attempt_1(db, job):
    """Issue 15: the chunk creates the item `queued` (attempt 0) before its task; a second create
    (another chunk's line, or this chunk retried) gets the existing item back; the first delivery
    claims it as attempt 1; writes per item: create + claim + complete, still two transactions."""
    from shared import item_state

    store = FirestoreStore(db)
    task = ItemTask(**_payload(job, 1))
    doc = item_state.born_queued(task, "t-1", utc(T0), owner="fanout:c0")
    assert store.create_item(job, task.gtin, doc) is None
    other_line = item_state.born_queued(ItemTask(**{**_payload(job, 1), "line": 99}), "t-1", utc(T0), owner="fanout:c9")
    existing = store.create_item(job, task.gtin, other_line)
    assert existing is not None and existing.doc["line"] == 1 and existing.never_claimed
    assert store.count_never_claimed(job) == 1
    counts = job_counts(job, store=store)
    assert (counts["queued"], counts["never_claimed"], counts["unborn"]) == (1, 1 + 2, 2)  # items 2, 3 legacy: unborn

    TXN_COUNTER.reset()
    out = _deliver(db, job, 1, RecordingHandler())
    assert out.http_status == 200 and TXN_COUNTER.snapshot() == {"claim": 1, "complete": 1}
    item = _item(db, job, 1)
    assert (item["status"], item["attempt"], item["line"]) == ("succeeded", 1, 1)
    assert [h["status"] for h in item["history"]] == ["queued", "processing", "succeeded"]
    assert store.count_never_claimed(job) == 0
