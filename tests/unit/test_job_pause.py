"""Pause / resume of a job (issue 15's circuit breaker): the pure transitions, the failure window, the
alert and the settings that drive them."""

from __future__ import annotations

import datetime as dt

import pytest

from shared import breaker, job_state
from shared.alerts import SlackPostResult, build_pause_message
from shared.config import SettingsError, load_settings
from shared.events import Event
from shared.exceptions import ConflictError, NotFoundError
from shared.model import Job
from shared.store.memory import MemoryStore

T0 = dt.datetime(2026, 11, 30, 9, 0, tzinfo=dt.timezone.utc)
REASON = {"code": "marketplace_unauthorized", "message": "catalog lookup answered 401"}


def _job(status="running", **doc):
    return Job.from_doc({"job_id": "j", "status": status, "round": 1, "fanout_done_at": T0, **doc})


def test_pause_running_job_records_why_and_what_to_resume_to():
    result, write = job_state.pause(_job("running"), "j", REASON, "breaker:x", T0)
    assert result.changed and result.status == "paused"
    assert write.fields["status"] == "paused" and write.fields["paused_at"] == T0
    assert write.fields["pause"] == {**REASON, "actor": "breaker:x", "previous_status": "running", "paused_at": T0}
    (event,) = write.events
    assert event.type == "paused" and event.details["code"] == "marketplace_unauthorized"


@pytest.mark.parametrize("status", ["paused", "completed", "completed_with_failures", "cancelled", "failed"])
def test_pause_is_a_noop_unless_running_or_ingesting(status):
    result, write = job_state.pause(_job(status), "j", REASON, "op", T0)
    assert not result.changed and result.status == status and write is None


def test_pause_of_a_missing_job_is_not_found():
    with pytest.raises(NotFoundError):
        job_state.pause(None, "j", REASON, "op", T0)


def test_resume_returns_to_the_previous_status_and_restarts_retry_windows():
    paused = _job("paused", pause={"previous_status": "ingesting", "code": "operator"})
    result, write = job_state.resume(paused, "j", "op@x", T0)
    assert result.changed and result.status == "ingesting"
    assert write.fields["status"] == "ingesting" and write.fields["resumed_at"] == T0
    assert write.events[0].type == "resumed"
    assert Job.from_doc({**paused.doc, **write.fields}).resumed_at == T0
    result, write = job_state.resume(_job("running"), "j", "op", T0)
    assert not result.changed and write is None


def test_a_paused_job_never_completes_but_can_be_cancelled_and_fails():
    paused = _job("paused", pause={"previous_status": "running"})
    completion, write = job_state.complete(paused, {"succeeded": 3}, T0)
    assert completion.final is None and write is None
    changed, write = job_state.cancel(paused, "j", "op", T0)
    assert changed and write.fields["status"] == "cancelled"
    assert write.events[0].details["previous_status"] == "paused"
    _, write = job_state.fail(paused, {"code": "object_generation_gone", "message": "gone"}, T0)
    assert write.fields["status"] == "failed"


def test_retry_failed_is_refused_while_paused():
    with pytest.raises(ConflictError) as err:
        job_state.refuse_unless_retryable("j", _job("paused"))
    assert err.value.code == "job_not_final"


def test_fanout_finishing_while_paused_keeps_it_paused_and_resumes_to_running():
    paused = Job.from_doc({"job_id": "j", "status": "paused", "pause": {"previous_status": "ingesting"}})
    doc, write = job_state.finish_fanout(paused, [{"totals": {"items": 2}}], T0)
    assert "status" not in write.fields and write.fields["pause"]["previous_status"] == "running"
    _, write = job_state.resume(Job.from_doc(doc), "j", "op", T0)
    assert write.fields["status"] == "running"


def test_store_pause_and_resume_through_transactions():
    store = MemoryStore()
    store.create_job({"job_id": "j", "status": "running", "round": 1}, Event("created", "t", T0))
    assert store.pause_job("j", REASON, "op", T0).changed
    assert not store.pause_job("j", REASON, "op", T0).changed  # only the first pauses (and alerts)
    assert store.get_job("j").status == "paused"
    assert store.resume_job("j", "op", T0 + dt.timedelta(minutes=1)).status == "running"
    types = [d["type"] for _, d in store.events["j"]]
    assert types == ["created", "paused", "resumed"]


# --- the breaker -------------------------------------------------------------------------------


def test_failure_window_trips_only_past_the_share_with_a_minimum_sample():
    window = breaker.FailureWindow()

    def record(failed, epoch=None):
        return window.record("j", epoch, failed, size=10, min_attempts=4, percent=50.0)

    assert not record(True).tripped and not record(True).tripped and not record(True).tripped  # 3 < min sample
    verdict = record(False)  # 3 of 4 > 50 %
    assert verdict.tripped and verdict.failures == 3 and verdict.attempts == 4
    # the window starts over after a trip and after a resume (a new epoch)
    assert [record(f).tripped for f in (True, False, True, False)] == [False, False, False, False]  # 50 % is not more
    assert record(True, epoch="resumed").attempts == 1


def test_pause_job_alerts_once_and_records_the_note():
    store = MemoryStore()
    store.create_job({"job_id": "j", "status": "running", "round": 1, "gcs_path": "gs://b/f.txt"},
                     Event("created", "t", T0))
    posted = []

    def post(message):
        posted.append(message)
        return SlackPostResult(ok=True, status=200)

    first = breaker.pause_job(store, "j", "marketplace_unauthorized", "401 from catalog", "breaker:a", T0, post=post)
    second = breaker.pause_job(store, "j", "marketplace_unauthorized", "401 again", "breaker:b", T0, post=post)
    assert first.changed and not second.changed and len(posted) == 1
    notes = [d for _, d in store.events["j"] if d["type"] == "pause_note"]
    assert len(notes) == 1 and notes[0]["details"]["sent"] is True


def test_pause_message_says_what_happened_and_what_to_do():
    message = build_pause_message({"job_id": "j-<1>", "gcs_path": "gs://b/f.txt"}, "failure_rate",
                                  "30 of 40 failed permanently", "breaker:x")
    assert "j-&lt;1&gt; paused (failure_rate)" in message.text and "30 of 40" in message.text
    body = str(message.blocks)
    assert "upcfan resume j-<1>" in body.replace("&lt;", "<").replace("&gt;", ">")
    assert "upcfan cancel" in body and "gs://b/f.txt" in body


# --- settings ----------------------------------------------------------------------------------


def test_retry_and_breaker_settings_are_validated(monkeypatch):
    s = load_settings()
    assert s.item_max_attempts == -1 and s.item_retry_window_s == 6 * 3600
    for var, value, needle in (("UPCFAN_ITEM_MAX_ATTEMPTS", "0", "UPCFAN_ITEM_MAX_ATTEMPTS"),
                               ("UPCFAN_ITEM_RETRY_WINDOW_S", "0", "UPCFAN_ITEM_RETRY_WINDOW_S"),
                               ("UPCFAN_BREAKER_FAILURE_PERCENT", "150", "UPCFAN_BREAKER_FAILURE_PERCENT"),
                               ("UPCFAN_BREAKER_MIN_ATTEMPTS", "500", "UPCFAN_BREAKER_WINDOW")):
        monkeypatch.setenv(var, value)
        with pytest.raises(SettingsError) as err:
            load_settings()
        assert needle in err.value.message
        monkeypatch.delenv(var)


# --- the worker with a paused / pausing job (memory store; the Firestore versions are functional tests) ---


class _Handler:
    """Calls `heartbeat()` before its one side effect, like the marketplace handler; raises what it is given."""

    name = "test"

    def __init__(self, error=None, before=None, during=None):
        self.error, self.before, self.during, self.effects = error, before, during, 0

    def handle(self, ctx):
        from shared.exceptions import LeaseLostError

        if self.before:
            self.before()
        if not ctx.heartbeat():
            raise LeaseLostError("stopped before the side effect")
        self.effects += 1
        if self.during:
            self.during()
        if self.error:
            raise self.error
        return {"ok": True}


def _deliver(store, job_id, gtin, handler):
    from shared.payloads import ItemTask
    from shared.worker import job_cache, process_item_delivery

    job_cache.JOB_CACHE.clear()
    task = ItemTask(job_id=job_id, gtin=gtin, upc=gtin[2:], line=1, round=1)
    return process_item_delivery(task.model_dump(), {"X-CloudTasks-TaskName": f"t-{gtin}"}, store=store,
                                 handler=handler)


def _running(store, job_id="j", **doc):
    store.create_job({"job_id": job_id, "status": "running", "round": 1, "options": {"handler": "dry_run"},
                      "totals": {"items": 100}, **doc}, Event("created", "t", T0))


def test_a_paused_jobs_delivery_answers_503_without_claiming():
    store = MemoryStore()
    _running(store, status="paused")
    handler = _Handler()
    out = _deliver(store, "j", "00000000000017", handler)
    assert out.http_status == 503 and out.body["status"] == "job_paused"
    assert store.get_item("j", "00000000000017") is None and handler.effects == 0


def test_a_pause_seen_before_the_side_effect_releases_the_item_without_a_failure():
    store = MemoryStore()
    _running(store)
    handler = _Handler(before=lambda: store.pause_job("j", REASON, "op", T0))
    out = _deliver(store, "j", "00000000000017", handler)
    assert out.http_status == 503 and out.body["released"] is True and handler.effects == 0
    item = store.get_item("j", "00000000000017")
    assert item.status == "queued" and item.doc["error"] is None and not item.doc.get("first_failed_at")


def test_a_cancel_seen_before_the_side_effect_finishes_the_item_cancelled():
    store = MemoryStore()
    _running(store)
    handler = _Handler(before=lambda: store.cancel_job("j", "op", T0))
    out = _deliver(store, "j", "00000000000017", handler)
    assert out.http_status == 200 and out.body["status"] == "cancelled" and handler.effects == 0
    item = store.get_item("j", "00000000000017")
    assert item.status == "cancelled" and item.doc["cancelled_midway"] is False


def test_unauthorized_pauses_the_job_once_and_requeues_the_item(monkeypatch):
    from shared.exceptions import PermanentItemError

    monkeypatch.setattr("shared.alerts.post_message", lambda message: SlackPostResult(ok=True, status=200))
    store = MemoryStore()
    _running(store)
    err = PermanentItemError("catalog lookup: GET /catalog answered 401: bad token", code="marketplace_unauthorized")
    first = _deliver(store, "j", "00000000000017", _Handler(error=err))
    assert first.http_status == 503 and store.get_job("j").status == "paused"
    assert store.get_item("j", "00000000000017").status == "queued"
    # another job: a delivery in flight whose 401 comes after a concurrent one paused the job is
    # released too, with no second pause or alert
    _running(store, "k")
    concurrent = _Handler(error=err, during=lambda: breaker.pause_job(store, "k", err.code, err.message, "other", T0))
    second = _deliver(store, "k", "00000000000024", concurrent)
    assert second.http_status == 503 and store.get_item("k", "00000000000024").status == "queued"
    assert [d["type"] for _, d in store.events["k"]].count("paused") == 1
    types = [d["type"] for _, d in store.events["j"]]
    assert types.count("paused") == 1 and types.count("pause_note") == 1


def test_a_permanent_failure_rate_pauses_the_job(monkeypatch):
    from shared.exceptions import PermanentItemError

    monkeypatch.setenv("UPCFAN_BREAKER_WINDOW", "10")
    monkeypatch.setenv("UPCFAN_BREAKER_MIN_ATTEMPTS", "4")
    from shared import config

    config.settings.cache_clear()
    breaker.FAILURE_WINDOW.clear()
    monkeypatch.setattr("shared.alerts.post_message", lambda message: SlackPostResult(ok=True, status=200))
    store = MemoryStore()
    _running(store)
    err = PermanentItemError("offer create answered 400: bad category", code="marketplace_rejected")
    try:
        outs = [_deliver(store, "j", f"0000000000{n:04d}", _Handler(error=None if n == 1 else err))
                for n in (1, 2, 3)]
        assert store.get_job("j").status == "running"  # 2 of 3: below the minimum sample
        outs.append(_deliver(store, "j", "00000000000048", _Handler(error=err)))
        assert [o.body["status"] for o in outs] == ["succeeded", "failed", "failed", "failed"]
        job = store.get_job("j")
        assert job.status == "paused" and job.doc["pause"]["code"] == "failure_rate"
        assert "3 of the job's last 4" in job.doc["pause"]["message"]
    finally:
        config.settings.cache_clear()
        breaker.FAILURE_WINDOW.clear()


def test_retryable_errors_never_trip_the_breaker(monkeypatch):
    from shared.exceptions import RetryableItemError

    monkeypatch.setenv("UPCFAN_BREAKER_WINDOW", "4")
    monkeypatch.setenv("UPCFAN_BREAKER_MIN_ATTEMPTS", "1")
    from shared import config

    config.settings.cache_clear()
    breaker.FAILURE_WINDOW.clear()
    store = MemoryStore()
    _running(store)
    try:
        for n in range(6):
            out = _deliver(store, "j", f"0000000000{n:04d}", _Handler(error=RetryableItemError("503", code="x")))
            assert out.http_status == 503 and out.body["status"] == "queued"
        assert store.get_job("j").status == "running"
    finally:
        config.settings.cache_clear()
        breaker.FAILURE_WINDOW.clear()


def test_progress_check_pauses_a_job_past_its_max_failed_percent(monkeypatch):
    from shared.item_state import Create
    from shared.progress import check_job_progress

    monkeypatch.setattr("shared.alerts.post_message", lambda message: SlackPostResult(ok=True, status=200))
    store = MemoryStore()
    _running(store, options={"handler": "dry_run", "max_failed_percent": 10}, totals={"items": 20},
             fanout_done_at=T0)
    for n, status in enumerate(["failed"] * 2 + ["succeeded"] * 5):
        store.transact_item("seed", "j", f"g{n}", lambda _, s=status: (None, Create({"status": s, "round": 1})))
    out = check_job_progress("j", T0, store=store)
    assert not out.get("paused") and store.get_job("j").status == "running"  # 2 of 20 = 10 %: not more
    store.transact_item("seed", "j", "g9", lambda _: (None, Create({"status": "failed", "round": 1})))
    out = check_job_progress("j", T0, store=store)
    job = store.get_job("j")
    assert out["paused"] and job.status == "paused" and job.doc["pause"]["code"] == "max_failed_percent"
    assert "3 of 20 items failed" in job.doc["pause"]["message"]


def test_the_sweeper_never_queries_paused_jobs_as_stalled():
    """A paused job waits for an operator by design: no sweeper rule selects it (its rules select jobs by
    an equality on status: running or ingesting)."""
    from shared.config import settings
    from shared.model import JOBS
    from shared.sweeper.rules import RULES

    now = dt.datetime.now(dt.timezone.utc)
    for rule in RULES:
        if rule.query.collection != JOBS or rule.query.collection_group:
            continue
        statuses = [w.value(now, settings()) for w in rule.query.filters if w.field == "status"]
        assert statuses and all(s != "paused" and s in ("running", "ingesting") for s in statuses), rule.name


def test_job_cache_forget_makes_the_next_delivery_read_the_job_again():
    from shared.worker.job_cache import JobCache

    reads = []

    class Store:
        def get_job(self, job_id):
            reads.append(job_id)
            return None

    cache = JobCache(ttl_s=60.0)
    cache.get(Store(), "j1")
    cache.get(Store(), "j1")
    assert reads == ["j1"]
    cache.forget("j1")
    cache.get(Store(), "j1")
    assert reads == ["j1", "j1"]


def test_evidence_from_before_a_resume_does_not_pause_the_job_again():
    # A 401 from a call made with the old key (before the operator fixed it and resumed) is stale.
    store = MemoryStore()
    store.create_job({"job_id": "j", "status": "running", "round": 1}, Event("created", "t", T0))
    assert store.pause_job("j", REASON, "breaker:a", T0).changed
    resumed = T0 + dt.timedelta(seconds=10)
    store.resume_job("j", "op", resumed)
    stale = breaker.pause_job(store, "j", REASON["code"], "401 again", "breaker:b", resumed + dt.timedelta(seconds=1),
                              evidence_at=resumed - dt.timedelta(seconds=2), post=lambda *a, **k: None)
    assert not stale.changed and stale.stale_evidence and store.get_job("j").status == "running"
    fresh = breaker.pause_job(store, "j", REASON["code"], "401 with the new key", "breaker:c",
                              resumed + dt.timedelta(seconds=3), evidence_at=resumed + dt.timedelta(seconds=1),
                              post=lambda *a, **k: SlackPostResult(ok=True, status=200))
    assert fresh.changed and store.get_job("j").status == "paused"
