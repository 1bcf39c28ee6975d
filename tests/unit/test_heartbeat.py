"""The heartbeat gives the item up when it cannot renew the lease for about half of it (issue 15: a
heartbeat that could not reach Firestore never gave up, so past the lease another delivery could
claim the item while this one still called the marketplace)."""

from __future__ import annotations

import logging
import threading

import pytest

from devstack.testing import poll
from shared.worker.delivery import Clock
from shared.worker.lease import Heartbeat, give_up_after_s

FIELDS = {"job_id": "job-1", "gtin": "00012345678905", "owner": "task:0:ab"}


class FailingStore:
    """A store whose lease renewals raise while `failing` is set (Firestore unreachable)."""

    def __init__(self, failing: bool = True, kept: bool = True):
        self.failing, self.kept = failing, kept
        self.calls = 0
        self.lock = threading.Lock()

    def extend_lease(self, job_id, gtin, owner, now, until):
        with self.lock:
            self.calls += 1
        if self.failing:
            raise ConnectionError("firestore unreachable")
        return self.kept


class Mono:
    def __init__(self):
        self.t = 500.0

    def __call__(self) -> float:
        return self.t


def _heartbeat(store, mono, lease_s=60.0, interval_s=15.0) -> Heartbeat:
    return Heartbeat(store, FIELDS["job_id"], FIELDS["gtin"], FIELDS["owner"], Clock(None), lease_s, interval_s, FIELDS,
                     monotonic=mono)


def _events(caplog, name):
    return [r for r in caplog.records if getattr(r, "fields", {}).get("event") == name]


def test_give_up_after_is_half_the_lease_or_after_a_renewal_was_due():
    assert give_up_after_s(60.0, 15.0) == 30.0
    assert give_up_after_s(60.0, 40.0) == 50.0  # beats every 40 s: halfway from the first due beat to 60 s
    assert give_up_after_s(60.0, 40.0) > 40.0


def test_failed_renewals_give_the_item_up_after_half_the_lease(caplog):
    caplog.set_level(logging.INFO)
    store, mono = FailingStore(), Mono()
    hb = _heartbeat(store, mono)
    mono.t += 15
    assert hb.beat() and hb.alive()  # one failed beat at 15 s is not a lost lease
    mono.t += 14.9
    assert hb.alive()
    mono.t += 0.1  # 30 s since the claim, no renewal succeeded
    assert not hb.beat() and not hb.alive()
    abandoned = _events(caplog, "lease_abandoned")
    assert len(abandoned) == 1 and abandoned[0].levelname == "WARNING"
    f = abandoned[0].fields
    assert f["since_renewal_s"] == pytest.approx(30.0) and f["give_up_after_s"] == 30.0
    assert f["last_error"] == "ConnectionError: firestore unreachable" and f["job_id"] == "job-1"
    assert len(_events(caplog, "heartbeat_failed")) == 2
    # given up stays given up: a renewal that gets through later does not revive it, nor is it tried
    store.failing = False
    calls = store.calls
    assert not hb.beat() and not hb.alive() and store.calls == calls
    assert len(_events(caplog, "lease_abandoned")) == 1


def test_the_clock_restarts_at_each_successful_renewal():
    store, mono = FailingStore(failing=False), Mono()
    hb = _heartbeat(store, mono)
    for _ in range(4):  # 60 s of good beats: well past half the lease since the claim
        mono.t += 15
        assert hb.beat()
    store.failing = True
    mono.t += 15
    assert hb.beat()  # 15 s since the last renewal
    mono.t += 14.99
    assert hb.alive()
    mono.t += 0.01
    assert not hb.alive()


def test_alive_gives_up_even_while_a_renewal_hangs():
    # the handler asks alive() before each side effect; it does not wait for the beat to fail
    store, mono = FailingStore(failing=False), Mono()
    hb = _heartbeat(store, mono)
    mono.t += 30
    assert not hb.alive()


def test_a_refused_renewal_is_a_lost_lease_not_a_give_up(caplog):
    caplog.set_level(logging.INFO)
    store, mono = FailingStore(failing=False, kept=False), Mono()
    hb = _heartbeat(store, mono)
    assert not hb.beat() and not hb.alive()
    assert len(_events(caplog, "lease_lost")) == 1 and not _events(caplog, "lease_abandoned")


def test_with_heartbeats_off_nothing_is_given_up():
    store, mono = FailingStore(), Mono()
    hb = _heartbeat(store, mono, interval_s=0).start()
    mono.t += 3600
    assert hb.alive()
    hb.stop()


def test_the_running_thread_gives_up_against_an_unreachable_store(caplog):
    caplog.set_level(logging.INFO)
    store = FailingStore()
    hb = Heartbeat(store, FIELDS["job_id"], FIELDS["gtin"], FIELDS["owner"], Clock(None), 0.4, 0.05, FIELDS).start()
    try:
        poll(lambda: not hb.alive(), timeout_s=10, what="the heartbeat gives up")
        poll(lambda: _events(caplog, "lease_abandoned"), timeout_s=10, what="lease_abandoned logged")
        poll(lambda: not hb._thread.is_alive(), timeout_s=10, what="the heartbeat thread ends")
    finally:
        hb.stop()
    assert store.calls >= 2 and len(_events(caplog, "lease_abandoned")) == 1


def test_a_finished_handler_whose_heartbeat_gave_up_still_writes_its_outcome(caplog):
    """Renewals failing only stops further side effects: the outcome of a handler that finished is
    written when the lease held (the complete transaction checks the owner), not thrown away."""
    import datetime as dt

    from shared.events import Event
    from shared.handlers.base import ItemHandler
    from shared.payloads import ItemTask
    from shared.store.memory import MemoryStore
    from shared.worker import job_cache, process_item_delivery

    class UnreachableRenewals(MemoryStore):
        def extend_lease(self, *args, **kwargs):
            raise ConnectionError("firestore unreachable")

    class SlowHandler(ItemHandler):
        name = "slow"

        def handle(self, item):
            poll(lambda: not item.heartbeat(), 10.0, 0.05, "the heartbeat to give up")
            return {"done": True}

    store = UnreachableRenewals()
    store.create_job({"job_id": "job-1", "status": "running", "options": {}, "round": 1},
                     Event("created", "test", dt.datetime.now(dt.timezone.utc)))
    job_cache.JOB_CACHE.clear()
    task = ItemTask(job_id="job-1", gtin=FIELDS["gtin"], upc="012345678905", line=1, round=1)
    try:
        outcome = process_item_delivery(task.model_dump(), {"X-CloudTasks-TaskName": "t1"}, store=store,
                                        handler=SlowHandler(), lease_s=1.0, heartbeat_s=0.2)
    finally:
        job_cache.JOB_CACHE.clear()
    assert _events(caplog, "lease_abandoned")
    assert outcome.http_status == 200 and outcome.body["status"] == "succeeded"
    assert store.get_item("job-1", FIELDS["gtin"]).status == "succeeded"
