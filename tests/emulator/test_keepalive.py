"""The dispatcher's keep-alive connections: a connection the target already closed is not an attempt.

A target closes idle keep-alive connections on its own clock (gunicorn, which serves the
functions through functions-framework: 2 s by default). If the dispatcher sends a task on such a
connection, the request is lost without reaching the handler and the delivery fails with
`ServerDisconnectedError`; counting that as a failed attempt made
tests/integration/test_worker_stack.py flaky. The target below makes that race deterministic.
"""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import datetime, timedelta, timezone

import pytest
from google.cloud import tasks_v2
from google.protobuf import duration_pb2, timestamp_pb2

from devstack.cloudtasks import client as emu

# gunicorn's default keep-alive (functions-framework does not change it): an idle connection is
# closed 2 s after its last response, at the latest 1 s later (its poll interval).
GUNICORN_KEEPALIVE_S = 2.0


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


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 keep-alive connection of ConnectionTarget: parses requests, asks the target
    what to do with each, and answers or drops the connection."""

    def __init__(self, target: "ConnectionTarget", index: int):
        self.target = target
        self.index = index
        self.buffer = b""
        self.served = 0  # requests read on this connection so far
        self.idle_since: float | None = None  # end of the last response; None before the first
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.idle_since is not None and not self.buffer:
            idle = time.monotonic() - self.idle_since
            if self.target.closes_idle(idle):
                # The keep-alive timer fired as the request arrived: closed unread, never handled.
                self.target.note("stale_drops")
                self.transport.close()
                return
        self.buffer += data
        while self._handle_one():
            pass

    def _handle_one(self) -> bool:
        head, sep, rest = self.buffer.partition(b"\r\n\r\n")
        if not sep:
            return False
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        if len(rest) < length:
            return False
        self.buffer = rest[length:]
        self.served += 1
        self.target.record({"connection": self.index, "nth_on_connection": self.served,
                            "task": headers.get("x-cloudtasks-taskname"),
                            "retry_count": headers.get("x-cloudtasks-taskretrycount")})
        status = self.target.answer(self.index, self.served)
        if status is None:  # the handler ran, then the process died before answering
            self.transport.close()
            return False
        self.transport.write(f"HTTP/1.1 {status} X\r\nContent-Length: 2\r\n\r\nok".encode())
        self.idle_since = time.monotonic()
        return True


class ConnectionTarget:
    """An HTTP target that sees connections: `closes_idle(idle_s)` says whether a request arriving
    on a connection idle that long finds it already closed; `answer(connection, nth)` gives the
    status for the nth request on a connection (None: close it unanswered after reading)."""

    def __init__(self, closes_idle=lambda idle_s: False, answer=lambda connection, nth: 200):
        self.closes_idle = closes_idle
        self.answer = answer
        self.requests: list[dict] = []
        self.counts = {"connections": 0, "stale_drops": 0}
        self._lock = threading.Lock()
        self.loop = asyncio.new_event_loop()
        self.port = 0
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        if not ready.wait(10):
            raise RuntimeError("connection target did not start")

    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def _protocol(self) -> _Connection:
        with self._lock:
            self.counts["connections"] += 1
            return _Connection(self, self.counts["connections"])

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(self.loop.create_server(self._protocol, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]
        ready.set()
        self.loop.run_forever()

    def note(self, key: str) -> None:
        with self._lock:
            self.counts[key] += 1

    def record(self, request: dict) -> None:
        with self._lock:
            self.requests.append(request)

    def for_task(self, task_id: str) -> list[dict]:
        with self._lock:
            return [r for r in self.requests if r["task"] == task_id]

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def connection_target():
    targets: list[ConnectionTarget] = []

    def make(**kw) -> ConnectionTarget:
        targets.append(ConnectionTarget(**kw))
        return targets[-1]

    yield make
    for t in targets:
        t.close()


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
    poll(lambda: _primary(emulator_host, q, "first") == [(200, None)], what="the first task's 200")
    # Scheduled after the 200, so the pooled connection is idle for longer than the keep-alive.
    tasks_client.create_task(parent=q, task=tasks_v2.Task(
        name=f"{q}/tasks/later", schedule_time=_at(GUNICORN_KEEPALIVE_S + 0.5),
        http_request=tasks_v2.HttpRequest(url=target.url())))
    poll(lambda: _primary(emulator_host, q, "later"), timeout=15, what="the later task's attempt")
    poll(lambda: emu.queue_stats(emulator_host, q.rsplit("/", 1)[1]).get("succeeded") == 2, what="both done")

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
    poll(lambda: emu.queue_stats(emulator_host, q.rsplit("/", 1)[1]).get("succeeded") == 1, what="success")

    attempts = _primary(emulator_host, q, "dies")
    assert [status for status, _ in attempts] == [500, None, 200], attempts
    assert "ServerDisconnected" in attempts[1][1]
    seen = target.for_task("dies")
    # The second attempt went out on the first attempt's connection (kept alive, reused) ...
    assert [(r["connection"], r["nth_on_connection"]) for r in seen] == [(1, 1), (1, 2), (2, 1)], seen
    # ... and every delivery is an attempt of its own.
    assert [r["retry_count"] for r in seen] == ["0", "1", "2"]
