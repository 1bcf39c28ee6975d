"""In-process priority of small jobs' deliveries (shared/worker/lanes.py), and the worker's use of it."""

from __future__ import annotations

import datetime as dt
import threading
import time
import uuid

import pytest

from shared import worker
from shared.config import SMALL_LANE
from shared.store.memory import MemoryStore
from shared.worker import lanes
from shared.worker.lanes import LanePriority


def _deadline_poll(predicate, timeout_s: float = 5.0) -> None:
    end = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < end, "condition not reached in time"
        time.sleep(0.005)


def test_a_bulk_delivery_does_not_wait_when_no_small_one_is_in_flight():
    assert LanePriority(max_wait_s=5.0).yield_to_small() == 0.0


def test_a_bulk_delivery_waits_until_the_small_ones_are_done():
    priority = LanePriority(max_wait_s=30.0)
    release = threading.Event()
    waited: list[float] = []

    def small():
        with priority.small_delivery():
            release.wait(10)

    smalls = [threading.Thread(target=small) for _ in range(3)]
    for t in smalls:
        t.start()
    _deadline_poll(lambda: priority._small_in_flight == 3)
    bulk = threading.Thread(target=lambda: waited.append(priority.yield_to_small()))
    bulk.start()
    bulk.join(0.2)
    assert bulk.is_alive()  # held while the small deliveries run
    release.set()
    bulk.join(10)
    assert not bulk.is_alive() and 0.0 < waited[0] < 30.0
    assert priority._small_in_flight == 0


def test_the_wait_is_capped_so_a_stream_of_small_jobs_cannot_stop_bulk_work():
    priority = LanePriority(max_wait_s=0.05)
    with priority.small_delivery():
        waited = priority.yield_to_small()
    assert 0.05 <= waited < 5.0


def test_a_small_delivery_that_raises_still_leaves_the_count():
    priority = LanePriority()
    with pytest.raises(RuntimeError):
        with priority.small_delivery():
            raise RuntimeError("boom")
    assert priority.yield_to_small() == 0.0


def _job(store: MemoryStore, job_id: str, lane: str | None) -> None:
    doc = {"job_id": job_id, "status": "running", "options": {"test_mode": True}, "totals": {"items": 10}}
    if lane:
        doc["item_lane"] = lane
    store.jobs[job_id] = doc


@pytest.mark.parametrize("lane, counted", [(SMALL_LANE, True), ("bulk", False), (None, False)])
def test_the_worker_counts_a_small_jobs_delivery_and_makes_a_bulk_one_yield(monkeypatch, lane, counted):
    from shared.handlers import ItemHandler

    priority = LanePriority(max_wait_s=0.0)
    monkeypatch.setattr("shared.worker.process.LANE_PRIORITY", priority)
    seen: list[tuple[int, bool]] = []
    real_yield = priority.yield_to_small

    def yield_spy() -> float:
        seen.append((priority._small_in_flight, True))
        return real_yield()

    monkeypatch.setattr(priority, "yield_to_small", yield_spy)

    class Spy(ItemHandler):
        name = "spy"

        def handle(self, item):
            seen.append((priority._small_in_flight, False))
            return {}

    store = MemoryStore()
    job_id = f"job-{lane}-{uuid.uuid4().hex[:8]}"  # not in the process's job cache
    _job(store, job_id, lane)
    gtin = "00012345678905"
    out = worker.process_item_delivery({"job_id": job_id, "gtin": gtin, "upc": gtin[2:], "line": 1, "round": 1},
                                       {"X-CloudTasks-TaskName": "t1", "X-CloudTasks-TaskRetryCount": "0"},
                                       handler=Spy(), store=store)
    assert out.http_status == 200
    if counted:
        assert seen == [(1, False)]  # in flight while it ran; never made to wait
    else:
        assert seen == [(0, True), (0, False)]  # asked to yield before its claim
    assert priority._small_in_flight == 0
    assert lanes.BULK_YIELD_MAX_S > 0


@pytest.mark.parametrize("lane, counted, yielded", [(SMALL_LANE, 1, 0), ("bulk", 0, 1)])
def test_a_small_jobs_progress_check_goes_first_and_a_bulk_ones_yields(monkeypatch, lane, counted, yielded):
    from shared.events import Event
    from shared.progress import check_job_progress

    priority = LanePriority()
    monkeypatch.setattr("shared.progress.LANE_PRIORITY", priority)
    monkeypatch.setattr("shared.progress._notify_finished", lambda *a, **k: None)
    yields: list[float] = []
    real_yield = priority.yield_to_small
    monkeypatch.setattr(priority, "yield_to_small", lambda: yields.append(real_yield()) or yields[-1])
    in_flight_while_counting: list[int] = []

    class Recording(MemoryStore):
        def count_items_by_status(self, job_id):
            in_flight_while_counting.append(priority._small_in_flight)
            return super().count_items_by_status(job_id)

    store = Recording()
    job_id = f"job-{uuid.uuid4().hex[:8]}"
    at = dt.datetime(2026, 11, 30, tzinfo=dt.timezone.utc)
    store.create_job({"job_id": job_id, "status": "running", "options": {}, "round": 1, "item_lane": lane,
                      "totals": {"lines": 1, "items": 1, "invalid": 0, "duplicate": 0, "skipped": 0},
                      "fanout_done_at": at, "counts": {}, "created_at": at}, Event("created", "test", at))
    store.create_item(job_id, "00000000000017", {"status": "succeeded", "attempt": 1, "round": 1})
    assert check_job_progress(job_id, at.timestamp() + 60, store=store)["completed"]
    assert in_flight_while_counting and set(in_flight_while_counting) == {counted}
    assert len(yields) == yielded
    assert priority._small_in_flight == 0
