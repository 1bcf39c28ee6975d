"""Creating Cloud Tasks with deterministic names: AlreadyExists means "already enqueued", not an error."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from google.api_core import exceptions as gexc
from shared.api_errors import is_already_exists
from shared.clients import tasks_client
from shared.config import BULK_LANE, CONTROL_QUEUE, ITEM_QUEUE, PROGRESS_DISPATCH_DEADLINE_S, QueueSpec, settings
from shared.log import log_event
from shared.retry import TASK_API


@dataclass(frozen=True)
class TaskKind:
    """A kind of task: the queue it goes to, the function and route it calls, its dispatch deadline.

    Every task is created with its kind, so its deadline and its OIDC audience are decided here and
    nowhere else (a task without an explicit deadline gets Cloud Tasks' 10 minutes, far past the
    worker's timeout). `shared/deadlines.py` proves each kind's worst case fits its deadline."""

    name: str
    queue: QueueSpec
    function: str  # the target function; its service URL is the OIDC audience
    route: str  # path under the service URL, "" for its root
    dispatch_deadline_s: int

    def service_url(self) -> str:
        """The target function's URL (UPCFAN_WORKER_URL / UPCFAN_INGEST_URL), no trailing slash."""
        return getattr(settings(), f"{self.function}_url")


ITEM_TASK = TaskKind("item", ITEM_QUEUE, "worker", "", ITEM_QUEUE.dispatch_deadline_s)
# Planning streams the whole file (up to max_lines), so it runs as a task with the chunk deadline,
# never inside the request or event that started the job.
PLAN_TASK = TaskKind("plan", CONTROL_QUEUE, "ingest", "/plan", CONTROL_QUEUE.dispatch_deadline_s)
CHUNK_TASK = TaskKind("chunk", CONTROL_QUEUE, "ingest", "/fanout", CONTROL_QUEUE.dispatch_deadline_s)
PROGRESS_TASK = TaskKind("progress", CONTROL_QUEUE, "worker", "/progress", PROGRESS_DISPATCH_DEADLINE_S)
# A finished job's results manifest (shared/results.py): streams every line record and item once.
RESULTS_TASK = TaskKind("results", CONTROL_QUEUE, "ingest", "/results", CONTROL_QUEUE.dispatch_deadline_s)
TASK_KINDS = (ITEM_TASK, PLAN_TASK, CHUNK_TASK, PROGRESS_TASK, RESULTS_TASK)


@dataclass(frozen=True)
class TaskSpec:
    """One HTTP task to create: its short id, kind, JSON payload and optional schedule.

    `url` defaults to the kind's service URL + route; give it only to aim elsewhere (benchmarks)."""

    task_id: str
    kind: TaskKind
    payload: dict[str, Any]
    schedule_time: dt.datetime | None = None
    url: str = ""

    def __post_init__(self) -> None:
        if not self.url:
            object.__setattr__(self, "url", self.kind.service_url() + self.kind.route)

    def audience(self) -> str:
        """The OIDC `aud`: the target service's URL (Cloud Run checks `aud` against it), i.e. the task
        URL without query and without the kind's route (`…/fanout`, `…/progress`). A gen2 function's
        cloudfunctions.net URL keeps its `/<function>` path: that path is part of the service URL."""
        base = self.url.split("?")[0]
        if self.kind.route and base.endswith(self.kind.route):
            base = base[: -len(self.kind.route)]
        return base.rstrip("/")


def shard_for(task_id: str, shards: int) -> int:
    """Item queue shard for a task: stable hash of its id, so a task always lands in one queue."""
    if shards <= 1:
        return 0
    return int(hashlib.sha256(task_id.encode()).hexdigest()[:8], 16) % shards


def item_queue_for(task_id: str, lane: str = BULK_LANE) -> str:
    """The queue of an item task: its job's lane (`Job.item_lane`), and in the bulk lane the shard
    its name hashes to. Every path that creates or looks up a job's item task passes the job's lane."""
    s = settings()
    return s.lane_queue_path(lane, shard_for(task_id, s.item_queue_shards))


def _build_task(queue_path: str, spec: TaskSpec):
    """The task as the official client's `tasks_v2.Task`, filled in place on its raw protobuf message
    (`Task.wrap` takes it without a copy). Built through proto-plus field by field it cost ~0.15 ms of
    CPU per task, a sixth of a whole create; a fan-out's rate on a small machine is client CPU
    (tests/unit/test_tasks.py checks it against the proto-plus construction)."""
    from google.cloud import tasks_v2

    raw = tasks_v2.Task.pb()()
    raw.name = f"{queue_path}/tasks/{spec.task_id}"
    http = raw.http_request
    http.url = spec.url
    http.http_method = tasks_v2.HttpMethod.POST.value
    http.headers["Content-Type"] = "application/json"
    http.body = json.dumps(spec.payload, separators=(",", ":")).encode()
    sa = settings().task_service_account
    if sa:
        http.oidc_token.service_account_email = sa
        http.oidc_token.audience = spec.audience()
    if spec.schedule_time is not None:
        raw.schedule_time.FromDatetime(spec.schedule_time.astimezone(dt.timezone.utc).replace(tzinfo=None))
    raw.dispatch_deadline.seconds = spec.kind.dispatch_deadline_s
    return tasks_v2.Task.wrap(raw)


def create_task(queue_path: str, spec: TaskSpec) -> bool:
    """Create the named task; True if created now, False if the name exists or is tombstoned.
    Transient API faults are retried in place (`shared.retry.TASK_API`)."""
    task = _build_task(queue_path, spec)
    try:
        TASK_API.call(lambda: tasks_client().create_task(parent=queue_path, task=task))
        return True
    except gexc.Conflict as exc:
        # gRPC raises AlreadyExists; REST raises Conflict for it and for ABORTED alike (api_errors).
        if is_already_exists(exc):
            return False
        raise


def task_exists(queue_path: str, task_id: str) -> bool:
    """Whether the named task is live in the queue (GetTask, BASIC view: needs only
    `cloudtasks.tasks.get`). A task that succeeded, exhausted its retries or was deleted answers
    NotFound, tombstoned or not. Transient API faults are retried (`shared.retry.TASK_API`)."""
    try:
        TASK_API.call(lambda: tasks_client().get_task(name=f"{queue_path}/tasks/{task_id}"))
    except gexc.NotFound:
        return False
    return True


def log_task_created(created: bool, **fields: Any) -> None:
    log_event("task_created" if created else "task_already_exists", **fields)
