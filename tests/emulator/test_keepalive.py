"""The dispatcher's keep-alive connections: a connection the target already closed is not an attempt.

A target closes idle keep-alive connections on its own clock (gunicorn, which serves the
functions through functions-framework: 2 s by default). If the dispatcher sends a task on such a
connection, the request is lost without reaching the handler and the delivery fails with
`ServerDisconnectedError`; counting that as a failed attempt made
tests/integration/test_worker_stack.py flaky. ConnectionTarget (conftest.py) makes that race
deterministic.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from google.cloud import tasks_v2
from google.protobuf import duration_pb2, timestamp_pb2

from devstack.cloudtasks import client as emu
from devstack.testing import poll

# gunicorn's default keep-alive (functions-framework does not change it): an idle connection is
# closed 2 s after its last response, at the latest 1 s later (its poll interval).
GUNICORN_KEEPALIVE_S = 2.0


def _dur(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromTimedelta(timedelta(seconds=seconds))
    return d


def _at(seconds_from_now: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(datetime.now(timezone.utc) + timedelta(seconds=seconds_from_now))
    return ts


def _primary(host: str, queue: str, task_id: str) -> list[tuple[int | None, str | None]]:
    return [(a["status"], a["error"]) for a in emu.attempts(host, queue.rsplit("/", 1)[1], task_id)
            if not a["duplicate"]]


def test_connection_the_target_closed_while_idle_is_not_an_attempt(
        tasks_client, make_queue, connection_target, emulator_host):
    """The CI flake: the next task comes after the target's keep-alive has run out. Before the
    fix the dispatcher sent it on the pooled connection, lost it and recorded a failed attempt."""
    target = connection_target(closes_idle=lambda idle_s: idle_s >= GUNICORN_KEEPALIVE_S)
    q = make_queue(retry={"max_attempts": 5, "min_backoff": _dur(0.1), "max_backoff": _dur(0.1)})
    tasks_client.create_task(parent=q, task=tasks_v2.Task(
        name=f"{q}/tasks/first", http_request=tasks_v2.HttpRequest(url=target.url())))
    poll(lambda: _primary(emulator_host, q, "first") == [(200, None)], 10, 0.02, "the first task's 200")
    # Scheduled after the 200, so the pooled connection is idle for longer than the keep-alive.
    tasks_client.create_task(parent=q, task=tasks_v2.Task(
        name=f"{q}/tasks/later", schedule_time=_at(GUNICORN_KEEPALIVE_S + 0.5),
        http_request=tasks_v2.HttpRequest(url=target.url())))
    poll(lambda: _primary(emulator_host, q, "later"), 15, 0.02, "the later task's attempt")
    poll(lambda: emu.queue_stats(emulator_host, q.rsplit("/", 1)[1]).get("succeeded") == 2, 10, 0.02, "both done")

    assert _primary(emulator_host, q, "later") == [(200, None)]
    assert target.counts["stale_drops"] == 0, target.counts
    assert [r["retry_count"] for r in target.for_task("later")] == ["0"]


def test_request_dropped_after_reaching_the_handler_still_counts(
        tasks_client, make_queue, connection_target, emulator_host):
    """The other side of the rule: a reused connection that closes without an answer after the
    request was read (a handler that died) is a failed attempt, retried with backoff, as Cloud
    Tasks does; the dispatcher must not resend it behind the queue's back."""
    target = connection_target(answer=lambda connection, nth: {(1, 1): 500, (1, 2): None}.get((connection, nth), 200))
    q = make_queue(retry={"max_attempts": 5, "min_backoff": _dur(0.1), "max_backoff": _dur(0.1)})
    tasks_client.create_task(parent=q, task=tasks_v2.Task(
        name=f"{q}/tasks/dies", http_request=tasks_v2.HttpRequest(url=target.url())))
    poll(lambda: emu.queue_stats(emulator_host, q.rsplit("/", 1)[1]).get("succeeded") == 1, 10, 0.02, "success")

    attempts = _primary(emulator_host, q, "dies")
    assert [status for status, _ in attempts] == [500, None, 200], attempts
    assert "ServerDisconnected" in attempts[1][1]
    seen = target.for_task("dies")
    # The second attempt went out on the first attempt's connection (kept alive, reused) ...
    assert [(r["connection"], r["nth_on_connection"]) for r in seen] == [(1, 1), (1, 2), (2, 1)], seen
    # ... and every delivery is an attempt of its own.
    assert [r["retry_count"] for r in seen] == ["0", "1", "2"]
