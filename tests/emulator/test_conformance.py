"""Conformance suite for the local Cloud Tasks emulator.

Only the official google-cloud-tasks client and the /_emulator inspection API are used; every test
that takes `tasks_client` runs twice, over REST and over gRPC (conftest.py). Synchronisation is by polling with deadlines; the only fixed waits are short observation
windows that prove something did *not* happen (paused queue, schedule_time not reached).

Note on exception classes: over the REST transport google-api-core maps HTTP 409 to `Conflict` and
400 to `BadRequest` (the gRPC-only subclasses AlreadyExists / InvalidArgument / FailedPrecondition
are not raised); over gRPC each status has its class. Tests catch the REST classes (the gRPC ones
are their subclasses) and check the google.rpc status with `_status` (shared.api_errors), which
over gRPC reads it from the class and over REST from the JSON error body.
"""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.request
from datetime import datetime, timedelta, timezone

import pytest
from google.api_core import exceptions as gexc
from google.cloud import tasks_v2
from google.protobuf import duration_pb2, field_mask_pb2, timestamp_pb2

from devstack.cloudtasks import client as emu
from shared.api_errors import rpc_status

PARENT = "projects/demo-emulator/locations/us-central1"  # same as conftest.PARENT


def poll(fn, timeout: float = 10.0, interval: float = 0.02, what: str = "condition"):
    """Call fn until it returns a truthy value; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def _status(exc: gexc.GoogleAPICallError) -> str:
    return rpc_status(exc)


def _dur(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromTimedelta(timedelta(seconds=seconds))
    return d


def _http_task(url: str, name: str | None = None, body: bytes = b"", **kw) -> tasks_v2.Task:
    task = tasks_v2.Task(http_request=tasks_v2.HttpRequest(url=url, body=body, **kw))
    if name:
        task.name = name
    return task


def _tid(name: str) -> str:
    return name.rsplit("/", 1)[1]


def _qid(name: str) -> str:
    return name.rsplit("/", 1)[1]


# ------------------------------------------------------------------ queues
def test_queue_crud(tasks_client, make_queue):
    q = make_queue(retry={"max_attempts": 5, "min_backoff": _dur(1), "max_backoff": _dur(10), "max_doublings": 3},
                   rate={"max_dispatches_per_second": 10, "max_concurrent_dispatches": 4})
    got = tasks_client.get_queue(name=q)
    assert got.state == tasks_v2.Queue.State.RUNNING
    assert got.retry_config.max_attempts == 5 and got.retry_config.max_doublings == 3
    assert got.rate_limits.max_dispatches_per_second == 10 and got.rate_limits.max_concurrent_dispatches == 4
    assert got.rate_limits.max_burst_size >= 1

    with pytest.raises(gexc.Conflict) as ei:
        tasks_client.create_queue(parent=PARENT, queue=tasks_v2.Queue(name=q))
    assert _status(ei.value) == "ALREADY_EXISTS"

    upd = tasks_client.update_queue(
        queue=tasks_v2.Queue(name=q, rate_limits=tasks_v2.RateLimits(max_dispatches_per_second=3),
                             retry_config=tasks_v2.RetryConfig(max_attempts=-1)),
        update_mask=field_mask_pb2.FieldMask(paths=["rate_limits.max_dispatches_per_second", "retry_config.max_attempts"]),
    )
    assert upd.rate_limits.max_dispatches_per_second == 3
    assert upd.rate_limits.max_concurrent_dispatches == 4  # untouched: not in the mask
    assert upd.retry_config.max_attempts == -1 and upd.retry_config.max_doublings == 3

    with pytest.raises(gexc.BadRequest) as ei:
        tasks_client.update_queue(queue=tasks_v2.Queue(name=q), update_mask=field_mask_pb2.FieldMask(paths=["state"]))
    assert _status(ei.value) == "INVALID_ARGUMENT"

    assert q in [x.name for x in tasks_client.list_queues(parent=PARENT)]
    tasks_client.delete_queue(name=q)
    with pytest.raises(gexc.NotFound):
        tasks_client.get_queue(name=q)
    with pytest.raises(gexc.NotFound):
        tasks_client.create_task(parent=q, task=_http_task("http://127.0.0.1:9/x"))

    # UpdateQueue creates a missing queue.
    created = tasks_client.update_queue(queue=tasks_v2.Queue(name=q + "x"))
    assert created.name == q + "x"
    tasks_client.delete_queue(name=q + "x")


def test_error_classes_follow_the_transport(tasks_client, transport, make_queue, target):
    """gRPC raises production's classes (what shared/ code sees deployed); REST the HTTP ones."""
    q = make_queue(paused=True)
    name = f"{q}/tasks/classes-1"
    tasks_client.create_task(parent=q, task=_http_task(target.url("/ok"), name))
    with pytest.raises(gexc.Conflict) as exists:
        tasks_client.create_task(parent=q, task=_http_task(target.url("/ok"), name))
    with pytest.raises(gexc.BadRequest) as bad:
        tasks_client.create_task(parent=q, task=_http_task(target.url("/ok"), f"{q}/tasks/has space"))
    with pytest.raises(gexc.NotFound) as missing:
        tasks_client.get_task(name=f"{q}/tasks/never")
    expected = ({"grpc": gexc.AlreadyExists, "rest": gexc.Conflict}, {"grpc": gexc.InvalidArgument, "rest": gexc.BadRequest},
                {"grpc": gexc.NotFound, "rest": gexc.NotFound})
    assert [type(e.value) for e in (exists, bad, missing)] == [classes[transport] for classes in expected]
    assert [_status(e.value) for e in (exists, bad, missing)] == ["ALREADY_EXISTS", "INVALID_ARGUMENT", "NOT_FOUND"]
    assert "already exists" in exists.value.message


def test_invalid_queue_names(tasks_client):
    with pytest.raises(gexc.BadRequest) as ei:
        tasks_client.create_queue(parent=PARENT, queue=tasks_v2.Queue(name=f"{PARENT}/queues/bad_underscore"))
    assert _status(ei.value) == "INVALID_ARGUMENT"
    with pytest.raises(gexc.BadRequest):
        tasks_client.create_queue(parent=PARENT, queue=tasks_v2.Queue(name="projects/other/locations/x/queues/q"))


# ------------------------------------------------------------------ dedup
def test_dedup_live_and_tombstoned_names(tasks_client, make_queue, target, emu_config, emulator_host):
    q = make_queue(paused=True)
    name = f"{q}/tasks/dedup-1"
    tasks_client.create_task(parent=q, task=_http_task(target.url("/ok"), name))
    with pytest.raises(gexc.Conflict) as ei:  # live task
        tasks_client.create_task(parent=q, task=_http_task(target.url("/ok"), name))
    assert _status(ei.value) == "ALREADY_EXISTS"

    tasks_client.delete_task(name=name)
    with pytest.raises(gexc.NotFound):
        tasks_client.get_task(name=name)
    with pytest.raises(gexc.Conflict):  # deleted -> tombstoned
        tasks_client.create_task(parent=q, task=_http_task(target.url("/ok"), name))

    # Succeeded -> tombstoned.
    tasks_client.resume_queue(name=q)
    done = f"{q}/tasks/dedup-done"
    tasks_client.create_task(parent=q, task=_http_task(target.url("/ok"), done))
    poll(lambda: emu.queue_stats(emulator_host, _qid(q)).get("succeeded") == 1, what="success")
    with pytest.raises(gexc.NotFound):
        tasks_client.get_task(name=done)
    with pytest.raises(gexc.Conflict):
        tasks_client.create_task(parent=q, task=_http_task(target.url("/ok"), done))
    assert len(target.for_task("dedup-done")) == 1

    # Short tombstone window: the name becomes reusable once it passes.
    emu_config(tombstone_seconds=0.5)
    t0 = time.monotonic()

    def reusable():
        try:
            tasks_client.create_task(parent=q, task=_http_task(target.url("/ok"), name))
            return True
        except gexc.Conflict:
            return False

    poll(reusable, timeout=5, interval=0.05, what="tombstone expiry")
    assert time.monotonic() - t0 < 3


def test_invalid_task_names_and_unknown_queue(tasks_client, make_queue, target):
    q = make_queue(paused=True)
    other = make_queue(paused=True)
    bad = [f"{q}/tasks/has space", f"{q}/tasks/dot.dot", f"{q}/tasks/" + "a" * 501, f"{other}/tasks/elsewhere",
           f"{q}/tasks/", "nonsense"]
    for name in bad:
        with pytest.raises(gexc.BadRequest) as ei:
            tasks_client.create_task(parent=q, task=_http_task(target.url("/ok"), name))
        assert _status(ei.value) == "INVALID_ARGUMENT", name
    ok = tasks_client.create_task(parent=q, task=_http_task(target.url("/ok"), f"{q}/tasks/" + "A-z_9" * 100))
    assert len(_tid(ok.name)) == 500
    with pytest.raises(gexc.NotFound):
        tasks_client.create_task(parent=f"{PARENT}/queues/no-such-queue", task=_http_task(target.url("/ok")))
    with pytest.raises(gexc.BadRequest):  # body not allowed with GET
        tasks_client.create_task(parent=q, task=_http_task(target.url("/ok"), body=b"x",
                                                           http_method=tasks_v2.HttpMethod.GET))
    with pytest.raises(gexc.BadRequest):  # no target at all
        tasks_client.create_task(parent=q, task=tasks_v2.Task())


def test_task_size_limit(tasks_client, make_queue, target):
    q = make_queue(paused=True)
    tasks_client.create_task(parent=q, task=_http_task(target.url("/ok"), body=b"x" * 90_000))
    with pytest.raises(gexc.BadRequest) as ei:
        tasks_client.create_task(parent=q, task=_http_task(target.url("/ok"), body=b"x" * (100 * 1024 + 1)))
    assert _status(ei.value) == "INVALID_ARGUMENT"
    assert "size" in ei.value.message.lower()


# ------------------------------------------------------------------ retries
def test_backoff_timing(tasks_client, make_queue, target, emulator_host):
    # min 0.2 s, max 1.0 s, 2 doublings: 0.2, 0.4, 0.8, then linear +0.8 -> capped 1.0
    q = make_queue(retry={"max_attempts": 5, "min_backoff": _dur(0.2), "max_backoff": _dur(1.0), "max_doublings": 2})
    t = tasks_client.create_task(parent=q, task=_http_task(target.url("/fail"), f"{q}/tasks/backoff"))
    poll(lambda: len(target.for_task(_tid(t.name))) == 5, timeout=10, what="5 attempts")
    starts = [r["mono"] for r in target.for_task(_tid(t.name))]
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    for got, want in zip(gaps, [0.2, 0.4, 0.8, 1.0]):
        assert want - 0.03 <= got <= want + 0.25, (gaps, [0.2, 0.4, 0.8, 1.0])


def test_backoff_formula_documented_example():
    from devstack.cloudtasks.emulator import RetryCfg

    cfg = RetryCfg(max_attempts=10, min_backoff=10, max_backoff=300, max_doublings=3)
    assert [cfg.backoff(n) for n in range(1, 9)] == [10, 20, 40, 80, 160, 240, 300, 300]


def test_max_attempts_exhaustion_log(tasks_client, make_queue, target, emulator_host):
    q = make_queue(retry={"max_attempts": 3, "min_backoff": _dur(0.05), "max_backoff": _dur(0.1)})
    name = f"{q}/tasks/exhaust-me"
    tasks_client.create_task(parent=q, task=_http_task(target.url("/status/503"), name))
    entry = poll(lambda: next((e for e in emu.exhausted(emulator_host) if e["name"] == name), None), what="exhaustion")
    assert entry["attempts"] == 3 and entry["last_status"] == 503
    assert len(target.for_task("exhaust-me")) == 3
    with pytest.raises(gexc.NotFound):
        tasks_client.get_task(name=name)
    with pytest.raises(gexc.Conflict):  # exhausted -> tombstoned
        tasks_client.create_task(parent=q, task=_http_task(target.url("/ok"), name))
    hist = emu.attempts(emulator_host, _qid(q), "exhaust-me")
    assert [h["attempt"] for h in hist] == [1, 2, 3] and all(h["status"] == 503 for h in hist)
    st = emu.queue_stats(emulator_host, _qid(q))
    assert st["exhausted"] == 1 and st["retried"] == 2 and st["dispatched"] == 3


def test_unlimited_attempts(tasks_client, make_queue, target, emulator_host):
    q = make_queue(retry={"max_attempts": -1, "min_backoff": _dur(0.02), "max_backoff": _dur(0.05)})
    target.scripts["unl"] = [500] * 7
    tasks_client.create_task(parent=q, task=_http_task(target.url("/script/unl"), f"{q}/tasks/unlimited"))
    poll(lambda: emu.queue_stats(emulator_host, _qid(q)).get("succeeded") == 1, what="eventual success")
    assert len(target.for_task("unlimited")) == 8
    assert emu.queue_stats(emulator_host, _qid(q))["exhausted"] == 0


def test_headers_retry_and_execution_counts(tasks_client, make_queue, target, emulator_host):
    q = make_queue(retry={"max_attempts": 5, "min_backoff": _dur(0.05), "max_backoff": _dur(0.1)})
    target.scripts["hdr"] = [404, 500]
    sched = datetime.now(timezone.utc) + timedelta(seconds=2)  # in the future even on a loaded machine: ETA == schedule_time
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(sched)
    task = tasks_v2.Task(
        name=f"{q}/tasks/hdr-1", schedule_time=ts,
        http_request=tasks_v2.HttpRequest(
            url=target.url("/script/hdr"), http_method=tasks_v2.HttpMethod.PUT, body=b'{"a": 1}',
            headers={"X-Custom": "v1", "X-CloudTasks-TaskName": "spoofed"},
            oidc_token=tasks_v2.OidcToken(service_account_email="tasks@demo.iam", audience="aud-1"),
        ),
    )
    tasks_client.create_task(parent=q, task=task)
    reqs = poll(lambda: (lambda r: r if len(r) == 3 else None)(target.for_task("hdr-1")), what="3 deliveries")
    h = [r["headers"] for r in reqs]
    assert [x["X-CloudTasks-TaskRetryCount"] for x in h] == ["0", "1", "2"]
    assert [x["X-CloudTasks-TaskExecutionCount"] for x in h] == ["0", "1", "1"]  # 5xx not counted
    assert "X-CloudTasks-TaskPreviousResponse" not in h[0] and "X-CloudTasks-TaskRetryReason" not in h[0]
    assert h[1]["X-CloudTasks-TaskPreviousResponse"] == "404" and h[2]["X-CloudTasks-TaskPreviousResponse"] == "500"
    assert h[1]["X-CloudTasks-TaskRetryReason"]
    for x, r in zip(h, reqs):
        assert x["X-CloudTasks-QueueName"] == _qid(q)
        assert x["X-CloudTasks-TaskName"] == "hdr-1"
        assert x["X-Custom"] == "v1"
        assert x["User-Agent"] == "Google-Cloud-Tasks"
        assert x["Content-Type"] == "application/json"
        assert x["Authorization"].startswith("Bearer ")
        claims = json.loads(base64.urlsafe_b64decode(x["Authorization"].split(".")[1] + "=="))
        assert claims["email"] == "tasks@demo.iam" and claims["aud"] == "aud-1"
        assert r["method"] == "PUT" and r["body"] == b'{"a": 1}'
    assert abs(float(h[0]["X-CloudTasks-TaskETA"]) - sched.timestamp()) < 0.001
    assert float(h[1]["X-CloudTasks-TaskETA"]) > float(h[0]["X-CloudTasks-TaskETA"])
    poll(lambda: emu.queue_stats(emulator_host, _qid(q)).get("succeeded") == 1, what="success")


def test_task_counters_and_attempt_status(tasks_client, make_queue, target):
    q = make_queue(retry={"max_attempts": 10, "min_backoff": _dur(30), "max_backoff": _dur(30)})
    name = f"{q}/tasks/counted"
    tasks_client.create_task(parent=q, task=_http_task(target.url("/status/404"), name))
    t = poll(lambda: (lambda t: t if t.response_count == 1 else None)(tasks_client.get_task(name=name)),
             what="first response")
    assert t.dispatch_count == 1
    assert t.first_attempt.dispatch_time and t.last_attempt.response_time
    assert t.last_attempt.response_status.code == 5  # NOT_FOUND
    assert t.schedule_time.timestamp() > time.time() + 20  # rescheduled by min_backoff (30 s)


# ------------------------------------------------------------------ dispatch
def test_rate_limit(tasks_client, make_queue, target, emulator_host):
    rate, n = 20.0, 70
    q = make_queue(rate={"max_dispatches_per_second": rate}, paused=True)
    burst = tasks_client.get_queue(name=q).rate_limits.max_burst_size
    for i in range(n):
        tasks_client.create_task(parent=q, task=_http_task(target.url(f"/ok/rate-{_qid(q)}"), f"{q}/tasks/r{i}"))
    tasks_client.resume_queue(name=q)
    poll(lambda: target.count(f"/ok/rate-{_qid(q)}") == n, timeout=15, what="all deliveries")
    times = sorted(r["mono"] for r in target.requests if r["path"] == f"/ok/rate-{_qid(q)}")
    steady = times[burst:]
    measured = (len(steady) - 1) / (steady[-1] - steady[0])
    assert rate * 0.8 <= measured <= rate * 1.2, (measured, burst)


def test_concurrency_cap(tasks_client, make_queue, target, emulator_host):
    q = make_queue(rate={"max_concurrent_dispatches": 3})
    for i in range(12):
        tasks_client.create_task(parent=q, task=_http_task(target.url("/hold/0.2"), f"{q}/tasks/c{i}"))
    poll(lambda: emu.queue_stats(emulator_host, _qid(q)).get("succeeded") == 12, timeout=10, what="all done")
    assert target.max_concurrent == 3


def test_dispatch_deadline_retry_and_no_stall(tasks_client, make_queue, target, emu_config, emulator_host):
    emu_config(min_dispatch_deadline_seconds=0.5)
    q = make_queue(retry={"max_attempts": 5, "min_backoff": _dur(0.05), "max_backoff": _dur(0.1)})
    slow = f"{q}/tasks/slow-1"
    t = tasks_client.create_task(parent=q, task=tasks_v2.Task(
        name=slow, dispatch_deadline=_dur(0.5), http_request=tasks_v2.HttpRequest(url=target.url("/slowfirst/1.5"))))
    assert t.dispatch_deadline.total_seconds() == pytest.approx(0.5)
    # A slow target does not stall other tasks of the same queue.
    poll(lambda: target.for_task("slow-1"), what="slow task dispatched")
    tasks_client.create_task(parent=q, task=_http_task(target.url("/ok"), f"{q}/tasks/fast-1"))
    poll(lambda: target.for_task("fast-1"), timeout=1.0, what="fast task delivered while slow one hangs")
    poll(lambda: emu.queue_stats(emulator_host, _qid(q)).get("succeeded") == 2, timeout=5, what="both succeed")
    hist = emu.attempts(emulator_host, _qid(q), "slow-1")
    assert hist[0]["status"] is None and "deadline" in hist[0]["error"]
    assert 0.4 <= hist[0]["duration_s"] < 1.5
    assert hist[1]["status"] == 200
    second = target.for_task("slow-1")[1]["headers"]
    assert second["X-CloudTasks-TaskRetryCount"] == "1"
    assert "DEADLINE_EXCEEDED" in second["X-CloudTasks-TaskRetryReason"]
    assert "X-CloudTasks-TaskPreviousResponse" not in second


def test_dispatch_deadline_default_and_clamp(tasks_client, make_queue, target):
    q = make_queue(paused=True)
    t = tasks_client.create_task(parent=q, task=_http_task(target.url("/ok")))
    assert t.dispatch_deadline.total_seconds() == 600
    lo = tasks_client.create_task(parent=q, task=tasks_v2.Task(dispatch_deadline=_dur(5),
                                                               http_request=tasks_v2.HttpRequest(url=target.url("/ok"))))
    hi = tasks_client.create_task(parent=q, task=tasks_v2.Task(dispatch_deadline=_dur(7200),
                                                               http_request=tasks_v2.HttpRequest(url=target.url("/ok"))))
    assert lo.dispatch_deadline.total_seconds() == 15 and hi.dispatch_deadline.total_seconds() == 1800


def test_pause_resume_purge(tasks_client, make_queue, target, emulator_host):
    q = make_queue(paused=True)
    assert tasks_client.get_queue(name=q).state == tasks_v2.Queue.State.PAUSED
    for i in range(5):
        tasks_client.create_task(parent=q, task=_http_task(target.url(f"/ok/{_qid(q)}"), f"{q}/tasks/p{i}"))
    time.sleep(0.3)  # observation window: a paused queue dispatches nothing
    assert target.count(f"/ok/{_qid(q)}") == 0
    assert emu.queue_stats(emulator_host, _qid(q))["dispatched"] == 0
    resumed = tasks_client.resume_queue(name=q)
    assert resumed.state == tasks_v2.Queue.State.RUNNING
    poll(lambda: target.count(f"/ok/{_qid(q)}") == 5, what="deliveries after resume")

    tasks_client.pause_queue(name=q)
    for i in range(5):
        tasks_client.create_task(parent=q, task=_http_task(target.url(f"/ok/{_qid(q)}"), f"{q}/tasks/x{i}"))
    purged = tasks_client.purge_queue(name=q)
    assert purged.purge_time
    assert list(tasks_client.list_tasks(parent=q)) == []
    with pytest.raises(gexc.Conflict):  # purged names are tombstoned too
        tasks_client.create_task(parent=q, task=_http_task(target.url("/ok"), f"{q}/tasks/x0"))
    tasks_client.resume_queue(name=q)
    time.sleep(0.2)  # observation window
    assert target.count(f"/ok/{_qid(q)}") == 5


def test_get_list_delete_run(tasks_client, make_queue, target, emulator_host):
    q = make_queue(paused=True)
    names = []
    for i in range(25):
        t = tasks_client.create_task(parent=q, task=_http_task(target.url("/ok"), body=b"payload-%d" % i))
        assert _tid(t.name).isdigit()  # generated id
        names.append(t.name)
    assert len(set(names)) == 25
    pager = tasks_client.list_tasks(request={"parent": q, "page_size": 10})
    pages = list(pager.pages)
    assert [len(p.tasks) for p in pages] == [10, 10, 5]
    assert sorted(t.name for p in pages for t in p.tasks) == sorted(names)
    assert all(not t.http_request.body and t.view == tasks_v2.Task.View.BASIC for p in pages for t in p.tasks)
    full = list(tasks_client.list_tasks(request={"parent": q, "response_view": tasks_v2.Task.View.FULL}))
    assert sorted(t.http_request.body for t in full) == sorted(b"payload-%d" % i for i in range(25))

    got = tasks_client.get_task(request={"name": names[0], "response_view": tasks_v2.Task.View.FULL})
    assert got.http_request.body == b"payload-0" and got.http_request.url == target.url("/ok")
    assert tasks_client.get_task(name=names[0]).http_request.body == b""

    tasks_client.delete_task(name=names[1])
    with pytest.raises(gexc.NotFound):
        tasks_client.get_task(name=names[1])
    with pytest.raises(gexc.NotFound):
        tasks_client.delete_task(name=names[1])

    ran = tasks_client.run_task(name=names[2])  # runs even though the queue is paused
    assert ran.dispatch_count == 1
    poll(lambda: emu.queue_stats(emulator_host, _qid(q)).get("succeeded") == 1, what="run_task delivery")
    assert target.for_task(_tid(names[2]))[0]["body"] == b"payload-2"
    with pytest.raises(gexc.NotFound):
        tasks_client.run_task(name=names[2])
    assert emu.queue_stats(emulator_host, _qid(q))["tasks"] == 23


def test_schedule_time(tasks_client, make_queue, target):
    q = make_queue()
    when = datetime.now(timezone.utc) + timedelta(seconds=1.0)
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(when)
    tasks_client.create_task(parent=q, task=tasks_v2.Task(name=f"{q}/tasks/later", schedule_time=ts,
                                                          http_request=tasks_v2.HttpRequest(url=target.url("/ok"))))
    req = poll(lambda: target.for_task("later"), timeout=5, what="scheduled delivery")[0]
    assert when.timestamp() - 0.01 <= req["t"] <= when.timestamp() + 0.5


def test_duplicate_deliveries_knob(tasks_client, make_queue, target, emu_config, emulator_host):
    emu_config(duplicate_deliveries=2)
    q = make_queue()
    tasks_client.create_task(parent=q, task=_http_task(target.url("/ok"), f"{q}/tasks/dup-1", body=b"same"))
    reqs = poll(lambda: (lambda r: r if len(r) == 3 else None)(target.for_task("dup-1")), what="3 deliveries")
    assert {r["headers"]["X-CloudTasks-TaskRetryCount"] for r in reqs} == {"0"}
    assert {r["body"] for r in reqs} == {b"same"}
    poll(lambda: len(emu.attempts(emulator_host, _qid(q), "dup-1")) == 3, what="attempt log")
    hist = emu.attempts(emulator_host, _qid(q), "dup-1")
    assert sum(1 for h in hist if h["duplicate"]) == 2
    st = emu.queue_stats(emulator_host, _qid(q))
    assert st["succeeded"] == 1 and st["duplicate_deliveries"] == 2 and st["dispatched"] == 1


def test_duplicate_2xx_ends_task_knob(tasks_client, make_queue, target, emu_config, emulator_host):
    """Whichever copy answers 200 first ends the task, even while the other still runs."""
    emu_config(duplicate_deliveries=1, duplicate_2xx_ends_task=True)
    q = make_queue()
    # The first request for the task sleeps 6 s, the other answers 200 at once.
    name = f"{q}/tasks/dup-fast"
    tasks_client.create_task(parent=q, task=_http_task(target.url("/slowfirst/6"), name))
    poll(lambda: len(target.for_task("dup-fast")) == 2, what="both deliveries")

    def gone() -> bool:
        try:
            tasks_client.get_task(name=name)
            return False
        except gexc.NotFound:
            return True

    poll(gone, timeout=3, what="the first 200 to end the task")
    st = emu.queue_stats(emulator_host, _qid(q))
    assert st["succeeded"] == 1 and st["in_flight"] in (0, 1)
    with pytest.raises(gexc.Conflict):  # ended means tombstoned, as for any finished task
        tasks_client.create_task(parent=q, task=_http_task(target.url("/ok"), name))


def test_app_engine_tasks_stored_not_dispatched(tasks_client, make_queue, emulator_host):
    q = make_queue(paused=True, retry={"max_attempts": 1})
    t = tasks_client.create_task(parent=q, task=tasks_v2.Task(
        app_engine_http_request=tasks_v2.AppEngineHttpRequest(relative_uri="/work", body=b"x")))
    assert t.app_engine_http_request.relative_uri == "/work"
    with pytest.raises(gexc.BadRequest) as ei:
        tasks_client.run_task(name=t.name)
    assert _status(ei.value) == "FAILED_PRECONDITION"
    tasks_client.resume_queue(name=q)
    entry = poll(lambda: next((e for e in emu.exhausted(emulator_host) if e["name"] == t.name), None),
                 what="app engine task exhausted")
    assert "App Engine" in entry["last_error"]


# ------------------------------------------------------------------ robustness
def _raw(host: str, method: str, path: str, data: bytes | None) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://{host}{path}", data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_bad_input_never_crashes(emulator_host, make_queue):
    q = make_queue(paused=True)
    cases = [
        ("POST", f"/v2/{q}/tasks", b"{not json"),
        ("POST", f"/v2/{q}/tasks", b"[1,2]"),
        ("POST", f"/v2/{q}/tasks", b'{"task": "str"}'),
        ("POST", f"/v2/{q}/tasks", b'{"task": {"httpRequest": {"url": 5}}}'),
        ("POST", f"/v2/{q}/tasks", b'{"task": {"httpRequest": {"url": "http://127.0.0.1:1/", "httpMethod": 99}}}'),
        ("POST", f"/v2/{q}/tasks", b'{"task": {"httpRequest": {"url": "http://127.0.0.1:1/", "body": "!!"}}}'),
        ("POST", f"/v2/{q}/tasks", b'{"task": {"httpRequest": {"url": "ftp://x"}}}'),
        ("POST", f"/v2/{q}/tasks", b'{"task": {"scheduleTime": "yesterday", "httpRequest": {"url": "http://a/"}}}'),
        ("POST", f"/v2/{q}/tasks", b'{"task": {"dispatchDeadline": 10, "httpRequest": {"url": "http://a/"}}}'),
        ("POST", f"/v2/{PARENT}/queues", b'{"name": "x", "rateLimits": {"maxDispatchesPerSecond": "fast"}}'),
        ("PATCH", f"/v2/{q}?updateMask=retryConfig.maxAttempts", b'{"retryConfig": {"maxAttempts": -5}}'),
        ("POST", "/_emulator/config", b'{"duplicate_deliveries": "many"}'),
        ("POST", "/_emulator/config", b'{"nope": 1}'),
    ]
    for method, path, data in cases:
        code, body = _raw(emulator_host, method, path, data)
        assert code == 400 and body["error"]["status"] == "INVALID_ARGUMENT", (path, data, body)
        assert body["error"]["message"]
    code, body = _raw(emulator_host, "GET", f"/v2/{q}/tasks/nope", None)
    assert code == 404 and body["error"]["status"] == "NOT_FOUND"
    assert emu.health(emulator_host)["ok"]


def test_bad_grpc_input_never_crashes(emulator_hosts, emulator_host, make_queue):
    """Bytes that are no CreateTaskRequest, an unknown method, a malformed name: each one a status."""
    import grpc

    q = make_queue(paused=True)
    with grpc.insecure_channel(emulator_hosts[1], options=[("grpc.enable_http_proxy", 0)]) as channel:
        def call(method: str, payload: bytes) -> grpc.StatusCode:
            with pytest.raises(grpc.RpcError) as ei:
                channel.unary_unary(f"/google.cloud.tasks.v2.CloudTasks/{method}")(payload, timeout=5)
            return ei.value.code()

        assert call("CreateTask", b"\xff\xff\xff") == grpc.StatusCode.INVALID_ARGUMENT
        assert call("BufferTask", b"") == grpc.StatusCode.UNIMPLEMENTED
        name_only = tasks_v2.GetTaskRequest.serialize(tasks_v2.GetTaskRequest(name=f"{q}/not-a-task"))
        assert call("GetTask", name_only) == grpc.StatusCode.INVALID_ARGUMENT
    assert emu.health(emulator_host)["ok"]
