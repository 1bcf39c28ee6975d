"""In-memory Cloud Tasks v2 model: queues, tasks, tombstones, and the asyncio dispatcher.

Everything runs on one asyncio loop, so state changes need no locks: a method that does not
await is atomic with respect to every other request and to the dispatcher.
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import heapq
import itertools
import json
import logging
import math
import re
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from devstack.cloudtasks import protojson as pj
from devstack.cloudtasks.delivery import Delivery, Outcome
from devstack.cloudtasks.errors import (
    RPC_CODE,
    already_exists,
    failed_precondition,
    invalid,
    not_found,
    rpc_status_for_http,
)
from devstack.cloudtasks.protojson import HttpMethod, QueueState, TaskView
from devstack.cloudtasks.taskrequest import (
    TASK_RE,
    TargetKind,
    check_task_size,
    parse_request,
    schedule_time,
    task_identity,
)

log = logging.getLogger("cloudtasks-emulator")

PARENT_RE = re.compile(r"^projects/([A-Za-z0-9:.\-]+)/locations/([A-Za-z0-9_\-]+)$")
QUEUE_RE = re.compile(r"^projects/([A-Za-z0-9:.\-]+)/locations/([A-Za-z0-9_\-]+)/queues/([^/]+)$")
QUEUE_ID_RE = re.compile(r"^[A-Za-z0-9-]{1,100}$")

DEFAULT_DEADLINE_S = 600.0  # HTTP tasks: default 10 minutes
MAX_DEADLINE_S = 1800.0  # ... in [15 s, 30 min]
MAX_RATE = 500.0
MAX_CONCURRENT = 5000
# Headers Cloud Tasks computes or reserves; user values for them are dropped.
RESERVED_HEADER_PREFIXES = ("x-cloudtasks-", "x-google-", "x-appengine-")
RESERVED_HEADERS = {"host", "content-length", "user-agent", "transfer-encoding", "connection"}


def _now() -> float:
    return time.time()


@dataclass
class RetryCfg:
    max_attempts: int = 100
    min_backoff: float = 0.1
    max_backoff: float = 3600.0
    max_doublings: int = 16
    max_retry_duration: float = 0.0

    def backoff(self, attempts: int) -> float:
        """Delay before the next attempt after `attempts` failed attempts (documented formula).

        The interval starts at min_backoff, doubles max_doublings times, then grows linearly by
        min_backoff * 2**max_doublings, capped at max_backoff. E.g. min 10 s, max 300 s,
        3 doublings: 10, 20, 40, 80, 160, 240, 300, 300, ...
        """
        n = max(attempts, 1) - 1  # retries already scheduled before this one
        if n <= self.max_doublings:
            delay = self.min_backoff * (2.0 ** n)
        else:
            step = self.min_backoff * (2.0 ** self.max_doublings)
            delay = step * (1 + n - self.max_doublings)
        return min(delay, self.max_backoff)

    def exhausted(self, attempts: int, first_attempt_ts: float | None, now: float) -> bool:
        """No further attempt when both limits are satisfied (an unlimited one counts as
        satisfied unless both are unlimited: -1 attempts and 0 duration retry forever)."""
        unlimited_attempts = self.max_attempts == -1
        unlimited_duration = self.max_retry_duration <= 0
        if unlimited_attempts and unlimited_duration:
            return False
        attempts_done = unlimited_attempts or attempts >= self.max_attempts
        age = now - (first_attempt_ts or now)
        duration_done = unlimited_duration or age >= self.max_retry_duration
        return attempts_done and duration_done

    def to_json(self) -> dict:
        return {
            "maxAttempts": self.max_attempts,
            "maxRetryDuration": pj.format_duration(self.max_retry_duration),
            "minBackoff": pj.format_duration(self.min_backoff),
            "maxBackoff": pj.format_duration(self.max_backoff),
            "maxDoublings": self.max_doublings,
        }


def burst_for(rate: float) -> int:
    """max_burst_size is output only; Cloud Tasks sets it "at least equal to" the rate."""
    return max(1, min(int(math.ceil(rate)), 500))


@dataclass
class Attempt:
    schedule_time: float
    dispatch_time: float
    response_time: float | None = None
    status: str | None = None  # google.rpc code name
    message: str = ""


@dataclass
class Task:
    queue: "Queue"
    task_id: str
    name: str
    kind: TargetKind
    request: dict  # stored httpRequest / appEngineHttpRequest (JSON form, body base64)
    body: bytes
    method: str
    url: str
    headers: dict
    auth: dict | None  # {"oidcToken": {...}} or {"oauthToken": {...}}
    schedule_time: float
    create_time: float
    deadline: float
    retry: RetryCfg | None  # task-level override
    retry_json: dict | None
    dispatch_count: int = 0
    response_count: int = 0
    execution_count: int = 0
    first_attempt: Attempt | None = None
    last_attempt: Attempt | None = None
    prev_response_code: int | None = None
    prev_retry_reason: str | None = None
    in_flight: int = 0
    gen: int = 0  # bumped whenever the task's heap entry becomes stale

    def effective_retry(self) -> RetryCfg:
        return self.retry or self.queue.retry


@dataclass
class Queue:
    name: str
    project: str
    location: str
    queue_id: str
    rate: float = MAX_RATE
    max_concurrent: int = 1000
    retry: RetryCfg = field(default_factory=RetryCfg)
    state: QueueState = QueueState.RUNNING
    purge_time: float | None = None
    extra: dict = field(default_factory=dict)  # appEngineRoutingOverride, httpTarget, stackdriverLoggingConfig
    tasks: dict = field(default_factory=dict)  # task_id -> Task (insertion ordered)
    heap: list = field(default_factory=list)  # (schedule_time, seq, task_id, gen)
    in_flight: int = 0
    tokens: float = 0.0
    tokens_at: float = 0.0
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    loop_task: asyncio.Task | None = None
    deleted: bool = False

    @property
    def burst(self) -> int:
        return burst_for(self.rate)

    def to_json(self, enum_int: bool) -> dict:
        out = {
            "name": self.name,
            "rateLimits": {
                "maxDispatchesPerSecond": self.rate,
                "maxBurstSize": self.burst,
                "maxConcurrentDispatches": self.max_concurrent,
            },
            "retryConfig": self.retry.to_json(),
            "state": pj.enum_out(self.state, enum_int),
        }
        if self.purge_time is not None:
            out["purgeTime"] = pj.format_timestamp(self.purge_time)
        out.update(self.extra)
        return out


def _new_stats() -> dict:
    return {
        "tasks": 0, "created": 0, "dispatched": 0, "succeeded": 0, "retried": 0, "exhausted": 0,
        "deleted": 0, "purged": 0, "in_flight": 0, "duplicate_deliveries": 0,
    }


def _is_2xx(status: int | None) -> bool:
    return status is not None and 200 <= status < 300


def _rpc_status(outcome: Outcome) -> tuple[str, str]:
    """An attempt's google.rpc code name and message, as last_attempt.response_status shows them."""
    if outcome.status is not None:
        return rpc_status_for_http(outcome.status), f"HTTP status code {outcome.status}"
    return outcome.error_kind or "UNKNOWN", outcome.message


def _fake_jwt(claims: dict) -> str:
    def b64(obj) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj, separators=(",", ":")).encode()).rstrip(b"=").decode()

    return f"{b64({'alg': 'none', 'typ': 'JWT', 'kid': 'cloudtasks-emulator'})}.{b64(claims)}.emulator"


class Emulator:
    def __init__(self, tombstone_seconds: float = 3600.0, duplicate_deliveries: int = 0,
                 min_dispatch_deadline: float = 15.0, history_limit: int = 200_000,
                 exhausted_limit: int = 10_000):
        self.config = {
            "tombstone_seconds": float(tombstone_seconds),
            "duplicate_deliveries": int(duplicate_deliveries),
            # False: only the primary delivery's answer decides the task (copies are extra runs).
            # True: a copy's 2xx also ends the task, the first 2xx wins, even while the primary
            # still runs: a target must not answer 2xx unless its work is really finished.
            "duplicate_2xx_ends_task": False,
            "min_dispatch_deadline_seconds": float(min_dispatch_deadline),
        }
        self.queues: dict[str, Queue] = {}
        self.tombstones: dict[str, float] = {}  # full task name -> time the task ended
        self.history: OrderedDict = OrderedDict()  # (queue_id, task_id) -> [attempt dicts]
        self.history_limit = history_limit
        self.exhausted_log: deque = deque(maxlen=exhausted_limit)
        self.stats: dict[str, dict] = {}
        self.delivery = Delivery()
        self._seq = itertools.count()
        self._bg: set[asyncio.Task] = set()
        self._janitor: asyncio.Task | None = None
        self.started_at = _now()

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        await self.delivery.start()
        self._janitor = asyncio.create_task(self._janitor_loop())

    async def close(self) -> None:
        for q in list(self.queues.values()):
            self._stop_queue(q)
        if self._janitor:
            self._janitor.cancel()
        for t in list(self._bg):
            t.cancel()
        if self._bg:
            await asyncio.gather(*self._bg, return_exceptions=True)
        await self.delivery.close()

    async def reset(self) -> None:
        for q in list(self.queues.values()):
            self._stop_queue(q)
        for t in list(self._bg):
            t.cancel()
        self.queues.clear()
        self.tombstones.clear()
        self.history.clear()
        self.exhausted_log.clear()
        self.stats.clear()

    def _spawn(self, coro) -> asyncio.Task:
        t = asyncio.create_task(coro)
        self._bg.add(t)
        t.add_done_callback(self._bg.discard)
        return t

    async def _janitor_loop(self) -> None:
        while True:
            await asyncio.sleep(10)
            try:
                cutoff = _now() - self.config["tombstone_seconds"]
                stale = [n for n, ended in self.tombstones.items() if ended < cutoff]
                for n in stale:
                    del self.tombstones[n]
            except Exception:  # pragma: no cover - never let the janitor die
                log.exception("janitor failed")

    # ------------------------------------------------------------------ helpers
    def stat(self, queue_id: str) -> dict:
        s = self.stats.get(queue_id)
        if s is None:
            s = self.stats[queue_id] = _new_stats()
        return s

    def get_queue(self, name: str) -> Queue:
        q = self.queues.get(name)
        if q is None:
            if not QUEUE_RE.match(name):
                raise invalid(f"Invalid queue name {name!r}: expected projects/PROJECT_ID/locations/LOCATION_ID/queues/QUEUE_ID")
            raise not_found(f"Queue {name} does not exist.")
        return q

    def _tombstone(self, task: Task) -> None:
        self.tombstones[task.name] = _now()

    def _remove_task(self, task: Task) -> None:
        q = task.queue
        if q.tasks.get(task.task_id) is task:
            del q.tasks[task.task_id]
            task.gen += 1
            self.stat(q.queue_id)["tasks"] = len(q.tasks)
            self._tombstone(task)

    def _push(self, task: Task) -> None:
        task.gen += 1
        heapq.heappush(task.queue.heap, (task.schedule_time, next(self._seq), task.task_id, task.gen))
        task.queue.wake.set()

    def _record(self, task: Task, entry: dict) -> None:
        key = (task.queue.queue_id, task.task_id)
        lst = self.history.get(key)
        if lst is None:
            lst = self.history[key] = []
            if len(self.history) > self.history_limit:
                self.history.popitem(last=False)
        lst.append(entry)

    # ------------------------------------------------------------------ queues
    def _parse_rate(self, q: Queue, body: dict, paths: set[str] | None) -> None:
        rl = pj.expect_obj(body.get("rateLimits"), "queue.rate_limits")

        def want(p: str) -> bool:
            return paths is None or "rateLimits" in paths or f"rateLimits.{p}" in paths

        if want("maxDispatchesPerSecond"):
            v = rl.get("maxDispatchesPerSecond")
            rate = pj.parse_float(v, "queue.rate_limits.max_dispatches_per_second") if v is not None else 0.0
            if rate < 0 or rate > MAX_RATE:
                raise invalid(f"queue.rate_limits.max_dispatches_per_second must be in (0, {MAX_RATE:g}]")
            q.rate = rate or MAX_RATE
        if want("maxConcurrentDispatches"):
            v = rl.get("maxConcurrentDispatches")
            mc = pj.parse_int(v, "queue.rate_limits.max_concurrent_dispatches", 0, MAX_CONCURRENT) if v is not None else 0
            q.max_concurrent = mc or 1000
        if rl.get("maxBurstSize") is not None and paths is not None and "rateLimits.maxBurstSize" in paths:
            raise invalid("queue.rate_limits.max_burst_size is output only")

    @staticmethod
    def parse_retry(rc: dict, base: RetryCfg, paths: set[str] | None, prefix: str) -> RetryCfg:
        r = RetryCfg(**base.__dict__)
        defaults = RetryCfg()

        def want(p: str) -> bool:
            return paths is None or "retryConfig" in paths or f"retryConfig.{p}" in paths

        if want("maxAttempts"):
            v = rc.get("maxAttempts")
            n = pj.parse_int(v, f"{prefix}.max_attempts") if v is not None else 0
            if n < -1:
                raise invalid(f"{prefix}.max_attempts must be >= -1 (got {n})")
            r.max_attempts = n if n != 0 else defaults.max_attempts
        for key, attr in (("minBackoff", "min_backoff"), ("maxBackoff", "max_backoff"),
                          ("maxRetryDuration", "max_retry_duration")):
            if want(key):
                v = rc.get(key)
                secs = pj.parse_duration(v, f"{prefix}.{attr}") if v is not None else None
                if secs is not None and secs < 0:
                    raise invalid(f"{prefix}.{attr} must not be negative")
                if attr == "max_retry_duration":
                    r.max_retry_duration = secs or 0.0
                else:
                    setattr(r, attr, secs if secs else getattr(defaults, attr))
        if want("maxDoublings"):
            v = rc.get("maxDoublings")
            n = pj.parse_int(v, f"{prefix}.max_doublings") if v is not None else 0
            if n < 0:
                raise invalid(f"{prefix}.max_doublings must be >= 0")
            r.max_doublings = n if v is not None else defaults.max_doublings
        if r.min_backoff > r.max_backoff:
            raise invalid(f"{prefix}.min_backoff ({r.min_backoff}s) must not exceed max_backoff ({r.max_backoff}s)")
        return r

    def _apply_queue_body(self, q: Queue, body: dict, paths: set[str] | None) -> None:
        self._parse_rate(q, body, paths)
        rc = pj.expect_obj(body.get("retryConfig"), "queue.retry_config")
        q.retry = self.parse_retry(rc, q.retry, paths, "queue.retry_config")
        for key in ("appEngineRoutingOverride", "httpTarget", "stackdriverLoggingConfig"):
            if paths is None or key in paths or any(p.startswith(key + ".") for p in paths):
                if body.get(key) is not None:
                    q.extra[key] = pj.expect_obj(body.get(key), key)
                else:
                    q.extra.pop(key, None)

    def create_queue(self, parent: str, body: dict) -> Queue:
        m = PARENT_RE.match(parent)
        if not m:
            raise invalid(f"Invalid parent {parent!r}: expected projects/PROJECT_ID/locations/LOCATION_ID")
        name = pj.expect_str(body.get("name"), "queue.name")
        if not name:
            raise invalid("queue.name is required")
        qm = QUEUE_RE.match(name)
        if not qm or f"projects/{qm.group(1)}/locations/{qm.group(2)}" != parent:
            raise invalid(f"Queue name {name!r} must be {parent}/queues/QUEUE_ID")
        if not QUEUE_ID_RE.match(qm.group(3)):
            raise invalid(f"Invalid QUEUE_ID {qm.group(3)!r}: letters, digits and hyphens, at most 100 characters")
        if name in self.queues:
            raise already_exists(f"Queue {name} already exists.")
        if body.get("state") not in (None, 0, "STATE_UNSPECIFIED"):
            raise invalid("queue.state is output only")
        q = Queue(name=name, project=m.group(1), location=m.group(2), queue_id=qm.group(3))
        self._apply_queue_body(q, body, None)
        q.tokens, q.tokens_at = float(q.burst), time.monotonic()
        self.queues[name] = q
        self.stat(q.queue_id)
        q.loop_task = asyncio.create_task(self._queue_loop(q))
        log.info("queue created", extra={"queue": name})
        return q

    def update_queue(self, name: str, body: dict, mask: str | None) -> Queue:
        qm = QUEUE_RE.match(name)
        if not qm:
            raise invalid(f"Invalid queue name {name!r}")
        paths: set[str] | None = None
        if mask:
            paths = set()
            for raw in mask.split(","):
                p = raw.strip()
                camel = ".".join(re.sub(r"_([a-z])", lambda mm: mm.group(1).upper(), seg) for seg in p.split("."))
                top = camel.split(".")[0]
                if top not in ("rateLimits", "retryConfig", "appEngineRoutingOverride", "httpTarget",
                               "stackdriverLoggingConfig"):
                    raise invalid(f"update_mask path {p!r} is not a mutable Queue field")
                paths.add(camel)
        q = self.queues.get(name)
        if q is None:  # UpdateQueue creates the queue if it does not exist
            return self.create_queue(f"projects/{qm.group(1)}/locations/{qm.group(2)}", {**body, "name": name})
        self._apply_queue_body(q, body, paths)
        q.tokens = min(q.tokens, float(q.burst))
        q.wake.set()
        return q

    def _stop_queue(self, q: Queue) -> None:
        q.deleted = True
        if q.loop_task:
            q.loop_task.cancel()

    def delete_queue(self, name: str) -> None:
        q = self.get_queue(name)
        for t in list(q.tasks.values()):
            self._remove_task(t)
        self._stop_queue(q)
        del self.queues[name]

    def set_state(self, name: str, state: QueueState) -> Queue:
        q = self.get_queue(name)
        q.state = state
        q.wake.set()
        return q

    def purge_queue(self, name: str) -> Queue:
        q = self.get_queue(name)
        q.purge_time = _now()
        n = 0
        for t in list(q.tasks.values()):
            self._remove_task(t)
            n += 1
        self.stat(q.queue_id)["purged"] += n
        q.heap.clear()
        return q

    def list_queues(self, parent: str, flt: str = "") -> list[Queue]:
        if not PARENT_RE.match(parent):
            raise invalid(f"Invalid parent {parent!r}")
        qs = [q for n, q in sorted(self.queues.items()) if n.startswith(parent + "/queues/")]
        if flt:
            m = re.match(r"^\s*state\s*[:=]\s*\"?(\w+)\"?\s*$", flt)
            if not m or m.group(1) not in QueueState.__members__:
                raise invalid(f"Unsupported filter {flt!r} (the emulator supports 'state: RUNNING|PAUSED|DISABLED')")
            wanted = QueueState[m.group(1)]
            qs = [q for q in qs if q.state == wanted]
        return qs

    # ------------------------------------------------------------------ tasks
    def create_task(self, parent: str, tj: dict) -> Task:
        q = self.get_queue(parent)
        if q.state == QueueState.DISABLED:
            raise failed_precondition(f"Queue {q.name} is disabled.")
        now = _now()
        task_id, name = task_identity(parent, pj.expect_str(tj.get("name"), "task.name"), taken=q.tasks)
        request = parse_request(tj, q.extra)
        check_task_size(request, name)
        when = schedule_time(tj, now)
        deadline = self._dispatch_deadline(tj, name)
        retry = self._task_retry(q, tj)
        self._check_name_free(q, task_id, name, now)
        task = Task(
            queue=q, task_id=task_id, name=name, kind=request.kind, request=request.json, body=request.body,
            method=request.method, url=request.url, headers=dict(request.headers), auth=request.auth,
            schedule_time=when, create_time=now, deadline=deadline,
            retry=retry, retry_json=retry.to_json() if retry else None,
        )
        self._store_task(task)
        return task

    def _dispatch_deadline(self, tj: dict, name: str) -> float:
        """dispatch_deadline, clamped into [min_dispatch_deadline_seconds, 30 min] (not rejected)."""
        if tj.get("dispatchDeadline") is None:
            return DEFAULT_DEADLINE_S
        requested = pj.parse_duration(tj["dispatchDeadline"], "task.dispatch_deadline")
        if requested <= 0:
            return DEFAULT_DEADLINE_S
        deadline = min(max(requested, self.config["min_dispatch_deadline_seconds"]), MAX_DEADLINE_S)
        if deadline != requested:
            log.warning("dispatch_deadline clamped", extra={"task": name, "requested_s": requested, "used_s": deadline})
        return deadline

    def _task_retry(self, q: Queue, tj: dict) -> RetryCfg | None:
        """The task's own retry_config, its unset fields taken from the queue's."""
        if tj.get("retryConfig") is None:
            return None
        rc = pj.expect_obj(tj["retryConfig"], "task.retry_config")
        return self.parse_retry(rc, q.retry, set(f"retryConfig.{k}" for k in rc), "task.retry_config")

    def _check_name_free(self, q: Queue, task_id: str, name: str, now: float) -> None:
        """De-duplication: a live task, or one that ended less than tombstone_seconds ago."""
        if task_id in q.tasks:
            raise already_exists(f"The task {name} already exists.")
        ended = self.tombstones.get(name)
        if ended is not None:
            if now - ended < self.config["tombstone_seconds"]:
                raise already_exists(f"The task {name} was recently deleted or completed; its name cannot be reused yet.")
            del self.tombstones[name]

    def _store_task(self, task: Task) -> None:
        q = task.queue
        q.tasks[task.task_id] = task
        s = self.stat(q.queue_id)
        s["created"] += 1
        s["tasks"] = len(q.tasks)
        self._push(task)

    def get_task(self, name: str) -> Task:
        m = TASK_RE.match(name)
        if not m:
            raise invalid(f"Invalid task name {name!r}")
        q = self.get_queue(m.group(1))
        t = q.tasks.get(m.group(2))
        if t is None:
            raise not_found(f"Task {name} does not exist (it may have completed, been deleted or exhausted its retries).")
        return t

    def delete_task(self, name: str) -> None:
        t = self.get_task(name)
        self._remove_task(t)
        self.stat(t.queue.queue_id)["deleted"] += 1

    def list_tasks(self, parent: str, page_size: int, page_token: str) -> tuple[list[Task], str]:
        q = self.get_queue(parent)
        if page_size < 0:
            raise invalid("page_size must not be negative")
        page_size = min(page_size or 1000, 1000)
        ids = sorted(q.tasks)
        start = 0
        if page_token:
            try:
                last = base64.urlsafe_b64decode(page_token.encode()).decode()
            except Exception:
                raise invalid("Invalid page_token") from None
            start = bisect.bisect_right(ids, last)
        chunk = ids[start:start + page_size]
        nxt = ""
        if start + page_size < len(ids) and chunk:
            nxt = base64.urlsafe_b64encode(chunk[-1].encode()).decode()
        return [q.tasks[i] for i in chunk], nxt

    def run_task(self, name: str) -> Task:
        t = self.get_task(name)
        if t.kind is not TargetKind.HTTP:
            raise failed_precondition("RunTask: the emulator cannot dispatch App Engine tasks (no App Engine locally).")
        t.gen += 1  # drop its pending heap entry; a failure reschedules it
        self._start_attempt(t)
        return t

    # ------------------------------------------------------------------ task JSON
    def task_json(self, t: Task, view: TaskView, enum_int: bool) -> dict:
        full = view == TaskView.FULL
        req = dict(t.request)
        req["httpMethod"] = pj.enum_out(HttpMethod[t.method], enum_int)
        if full and t.body:
            req["body"] = base64.b64encode(t.body).decode()
        else:
            req.pop("body", None)
        out = {
            "name": t.name,
            "httpRequest" if t.kind is TargetKind.HTTP else "appEngineHttpRequest": req,
            "scheduleTime": pj.format_timestamp(t.schedule_time),
            "createTime": pj.format_timestamp(math.floor(t.create_time)),
            "dispatchDeadline": pj.format_duration(t.deadline),
            "dispatchCount": t.dispatch_count,
            "responseCount": t.response_count,
            "view": pj.enum_out(TaskView.FULL if full else TaskView.BASIC, enum_int),
        }
        if t.first_attempt:
            out["firstAttempt"] = {"dispatchTime": pj.format_timestamp(t.first_attempt.dispatch_time)}
        if t.last_attempt:
            a = t.last_attempt
            la = {"scheduleTime": pj.format_timestamp(a.schedule_time), "dispatchTime": pj.format_timestamp(a.dispatch_time)}
            if a.response_time is not None:
                la["responseTime"] = pj.format_timestamp(a.response_time)
                la["responseStatus"] = {"code": RPC_CODE.get(a.status or "UNKNOWN", 2), "message": a.message}
            out["lastAttempt"] = la
        if t.retry_json:
            out["retryConfig"] = t.retry_json
        return out

    # ------------------------------------------------------------------ dispatcher
    async def _queue_loop(self, q: Queue) -> None:
        try:
            while not q.deleted:
                q.wake.clear()
                if q.state != QueueState.RUNNING:
                    await q.wake.wait()
                    continue
                # Drop stale heap heads (deleted, rescheduled or force-run tasks).
                while q.heap:
                    sched, _, tid, gen = q.heap[0]
                    t = q.tasks.get(tid)
                    if t is None or t.gen != gen:
                        heapq.heappop(q.heap)
                        continue
                    break
                if not q.heap:
                    await q.wake.wait()
                    continue
                delay = q.heap[0][0] - _now()
                if delay > 0:
                    await self._wait(q, delay)
                    continue
                if q.in_flight >= q.max_concurrent:
                    await self._wait(q, 1.0)  # woken when an attempt finishes
                    continue
                mono = time.monotonic()
                q.tokens = min(float(q.burst), q.tokens + (mono - q.tokens_at) * q.rate)
                q.tokens_at = mono
                if q.tokens < 1.0:
                    await self._wait(q, (1.0 - q.tokens) / q.rate)
                    continue
                q.tokens -= 1.0
                _, _, tid, _ = heapq.heappop(q.heap)
                t = q.tasks[tid]
                t.gen += 1
                if t.kind is not TargetKind.HTTP:
                    self._fail_appengine(t)
                    continue
                self._start_attempt(t)
        except asyncio.CancelledError:
            pass
        except Exception:  # pragma: no cover - keep the failure visible
            log.exception("queue loop crashed", extra={"queue": q.name})

    @staticmethod
    async def _wait(q: Queue, timeout: float) -> None:
        try:
            await asyncio.wait_for(q.wake.wait(), timeout=max(timeout, 0.0005))
        except asyncio.TimeoutError:
            pass

    def _fail_appengine(self, t: Task) -> None:
        """App Engine tasks are stored but cannot be delivered locally: record a failed attempt."""
        now = _now()
        t.dispatch_count += 1
        a = Attempt(schedule_time=t.schedule_time, dispatch_time=now, response_time=now, status="UNIMPLEMENTED",
                    message="cloudtasks emulator: App Engine targets cannot be dispatched locally")
        t.first_attempt = t.first_attempt or Attempt(t.schedule_time, now)
        t.last_attempt = a
        self._record(t, {"attempt": t.dispatch_count, "started": now, "finished": now, "duration_s": 0.0,
                         "status": None, "error": a.message, "duplicate": False})
        self._after_failure(t, None, "UNIMPLEMENTED", now)

    def _build_headers(self, t: Task, sched: float) -> dict:
        h: dict[str, str] = {}
        for k, v in t.headers.items():
            lk = k.lower()
            if lk in RESERVED_HEADERS or lk.startswith(RESERVED_HEADER_PREFIXES):
                continue
            h[k] = v
        h["User-Agent"] = "Google-Cloud-Tasks"
        if t.body and not any(k.lower() == "content-type" for k in h):
            h["Content-Type"] = "application/json"
        q = t.queue
        h["X-CloudTasks-QueueName"] = q.queue_id
        h["X-CloudTasks-TaskName"] = t.task_id
        h["X-CloudTasks-TaskRetryCount"] = str(t.dispatch_count - 1)
        h["X-CloudTasks-TaskExecutionCount"] = str(t.execution_count)
        h["X-CloudTasks-TaskETA"] = f"{sched:.6f}"
        if t.dispatch_count > 1:
            if t.prev_response_code is not None:
                h["X-CloudTasks-TaskPreviousResponse"] = str(t.prev_response_code)
            if t.prev_retry_reason:
                h["X-CloudTasks-TaskRetryReason"] = t.prev_retry_reason
        if t.auth and "oidcToken" in t.auth:
            tok = t.auth["oidcToken"]
            email = tok.get("serviceAccountEmail", "")
            now = int(_now())
            h["Authorization"] = "Bearer " + _fake_jwt({
                "iss": "https://accounts.google.com", "aud": tok.get("audience") or t.url, "email": email,
                "email_verified": True, "sub": email, "iat": now, "exp": now + 3600,
            })
        elif t.auth and "oauthToken" in t.auth:
            h["Authorization"] = "Bearer cloudtasks-emulator-oauth-token"
        return h

    def _start_attempt(self, t: Task) -> None:
        now = _now()
        sched = t.schedule_time
        t.dispatch_count += 1
        attempt_no = t.dispatch_count
        if t.first_attempt is None:
            t.first_attempt = Attempt(schedule_time=sched, dispatch_time=now)
        t.last_attempt = Attempt(schedule_time=sched, dispatch_time=now)
        headers = self._build_headers(t, sched)
        q = t.queue
        q.in_flight += 1
        t.in_flight += 1
        s = self.stat(q.queue_id)
        s["dispatched"] += 1
        s["in_flight"] = q.in_flight
        self._spawn(self._attempt(t, attempt_no, headers))
        dup = self.config["duplicate_deliveries"]
        for i in range(dup):
            s["duplicate_deliveries"] += 1
            self._spawn(self._duplicate(t, attempt_no, headers, i + 1))

    async def _send(self, t: Task, headers: dict) -> Outcome:
        """One HTTP delivery of the task."""
        return await self.delivery.send(t.method, t.url, t.body, headers, t.deadline)

    def _record_delivery(self, t: Task, attempt_no: int, started: float, outcome: Outcome,
                         copy: int | None = None) -> float:
        """Append one delivery (the attempt's own, or duplicate number `copy`) to the history; its end time."""
        finished = _now()
        entry: dict = {"attempt": attempt_no, "duplicate": copy is not None}
        if copy is not None:
            entry["copy"] = copy
        entry.update({"started": started, "finished": finished, "duration_s": round(finished - started, 6),
                      "status": outcome.status, "error": outcome.message or None})
        self._record(t, entry)
        return finished

    def _is_live(self, t: Task) -> bool:
        return t.queue.tasks.get(t.task_id) is t and not t.queue.deleted

    def _succeed(self, t: Task) -> None:
        self._remove_task(t)
        self.stat(t.queue.queue_id)["succeeded"] += 1

    async def _duplicate(self, t: Task, attempt_no: int, headers: dict, copy: int) -> None:
        started = _now()
        outcome = await self._send(t, headers)
        self._record_delivery(t, attempt_no, started, outcome, copy)
        if self.config["duplicate_2xx_ends_task"] and _is_2xx(outcome.status) and self._is_live(t):
            self._succeed(t)

    async def _attempt(self, t: Task, attempt_no: int, headers: dict) -> None:
        q = t.queue
        started = _now()
        try:
            outcome = await self._send(t, headers)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # unexpected: treat as a failed attempt, never crash
            log.exception("dispatch failed unexpectedly", extra={"task": t.name})
            outcome = Outcome(None, "INTERNAL", f"{type(exc).__name__}: {exc}")
        finally:
            q.in_flight -= 1
            t.in_flight -= 1
            self.stat(q.queue_id)["in_flight"] = q.in_flight
            q.wake.set()
        finished = self._record_delivery(t, attempt_no, started, outcome)
        status = outcome.status
        rpc, message = _rpc_status(outcome)
        if t.last_attempt is not None and t.dispatch_count == attempt_no:
            t.last_attempt.response_time = finished
            t.last_attempt.status = rpc
            t.last_attempt.message = message
        if status is not None:
            t.response_count += 1
        if not self._is_live(t):
            return  # deleted or purged while in flight: the outcome no longer matters
        if _is_2xx(status):
            self._succeed(t)
            return
        if status is not None and status < 500:
            t.execution_count += 1
        log.info("attempt failed", extra={"task": t.name, "attempt": attempt_no, "status": status,
                                          "error": outcome.message})
        if t.in_flight > 0:
            return  # a forced run is still going; its outcome decides
        self._after_failure(t, status, rpc if status is None else f"{rpc}({RPC_CODE.get(rpc, 2)}): {message}", finished)

    def _after_failure(self, t: Task, status: int | None, reason: str, now: float) -> None:
        q = t.queue
        t.prev_response_code = status
        t.prev_retry_reason = reason
        cfg = t.effective_retry()
        first = t.first_attempt.dispatch_time if t.first_attempt else now
        if cfg.exhausted(t.dispatch_count, first, now):
            self._remove_task(t)
            s = self.stat(q.queue_id)
            s["exhausted"] += 1
            self.exhausted_log.append({
                "name": t.name, "queue": q.queue_id, "task_id": t.task_id, "attempts": t.dispatch_count,
                "last_status": status, "last_error": t.last_attempt.message if t.last_attempt else None,
                "created": t.create_time, "ended": now,
            })
            log.info("task exhausted", extra={"task": t.name, "attempts": t.dispatch_count})
            return
        t.schedule_time = now + cfg.backoff(t.dispatch_count)
        self.stat(q.queue_id)["retried"] += 1
        self._push(t)
