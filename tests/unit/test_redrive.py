"""Operator re-drive (`shared.operations.redrive_job`) on the in-memory store with a fake Cloud Tasks
client: which items are chosen, the new tasks' names and shards, what is never touched, refusals, and
that a dry run writes nothing. Issue 15, item 5 (no operator action for a stranded open item)."""

from __future__ import annotations

import copy
import datetime as dt
import json

import pytest
from google.api_core import exceptions as gexc

from shared import operations, tasks
from shared.config import settings
from shared.exceptions import BadRequestError, ConflictError, NotFoundError
from shared.model import JobStatus
from shared.naming import redrive_task_name_for, task_name_for
from shared.store.memory import MemoryStore

NOW = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.timezone.utc)
JOB = "redrive-job-0123456789ab"
ACTOR = "ops@example.com"


class FakeTasks:
    """CloudTasksClient's get_task/create_task: `live` task paths, `ended` names (tombstones: GetTask
    NotFound, create AlreadyExists), an optional fault for creates."""

    def __init__(self) -> None:
        self.live: dict[str, dict] = {}
        self.ended: set[str] = set()
        self.gets: list[str] = []
        self.creates: list[str] = []
        self.fail_create: Exception | None = None
        self.on_get = None

    def get_task(self, name=None, request=None):
        name = name or request.name
        self.gets.append(name)
        if self.on_get:
            self.on_get(name)
        if name not in self.live:
            raise gexc.NotFound(f"Task {name} does not exist")
        return self.live[name]

    def create_task(self, parent, task):
        self.creates.append(task.name)
        if self.fail_create is not None:
            raise self.fail_create
        if task.name in self.live or task.name in self.ended:
            raise gexc.AlreadyExists(f"task {task.name} exists")
        self.live[task.name] = {"parent": parent, "payload": json.loads(task.http_request.body)}
        return task

    def put(self, task_id: str) -> None:
        self.live[path(task_id)] = {}

    def finish(self, task_id: str) -> None:
        self.live.pop(path(task_id), None)
        self.ended.add(path(task_id))


def path(task_id: str) -> str:
    return f"{tasks.item_queue_for(task_id)}/tasks/{task_id}"


@pytest.fixture
def env(monkeypatch):
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "demo-unit")
    monkeypatch.setenv("UPCFAN_WORKER_URL", "http://127.0.0.1:9/worker")
    monkeypatch.setenv("UPCFAN_ITEM_QUEUE_SHARDS", "3")  # items and their re-drives land in different shards
    settings.cache_clear()
    store, fake = MemoryStore(), FakeTasks()
    monkeypatch.setattr(operations, "_store", lambda: store)
    monkeypatch.setattr(tasks, "tasks_client", lambda: fake)
    yield store, fake
    settings.cache_clear()


def gtin(n: int) -> str:
    body = f"{n:013d}"
    total = sum(int(d) * (3 if i % 2 == 0 else 1) for i, d in enumerate(body))
    return body + str((10 - total % 10) % 10)


def seed(store: MemoryStore, status: str = "running", round_: int = 1, **job) -> None:
    store.jobs[JOB] = {"job_id": JOB, "status": status, "round": round_, "gcs_path": f"gs://b/{JOB}.txt",
                       "totals": {"items": 0}, "created_at": NOW - dt.timedelta(hours=1), **job}


def add_item(store: MemoryStore, n: int, status: str, *, lease_s: float | None = None, round_: int = 1,
             task_name: str | None = "default") -> str:
    g = gtin(n)
    doc = {"job_id": JOB, "gtin": g, "upc": g[1:], "line": n, "status": status, "attempt": 1, "round": round_,
           "lease_owner": "x:0:abc" if status == "processing" else None,
           "lease_expires_at": NOW + dt.timedelta(seconds=lease_s) if lease_s is not None else None,
           "history": [{"status": status, "attempt": 1, "owner": "x:0:abc", "at": NOW, "error_code": None}],
           "created_at": NOW, "updated_at": NOW}
    if task_name is not None:
        doc["task_name"] = task_name_for(JOB, g, round_) if task_name == "default" else task_name
    store.items.setdefault(JOB, {})[g] = (next(store._versions), doc)
    return g


def item(store: MemoryStore, g: str) -> dict:
    return store.items[JOB][g][1]


def events(store: MemoryStore, type_: str) -> list[dict]:
    return [d for _, d in store.events.get(JOB, []) if d["type"] == type_]


def redrive(dry_run: bool = False, **kw) -> dict:
    return operations.redrive_job(JOB, ACTOR, dry_run=dry_run, now=NOW, **kw)


def test_chooses_only_open_items_whose_task_is_gone(env):
    store, fake = env
    seed(store)
    queued_gone = add_item(store, 1, "queued")
    queued_live = add_item(store, 2, "queued")
    fake.put(task_name_for(JOB, queued_live, 1))
    lapsed_gone = add_item(store, 3, "processing", lease_s=-30)
    lapsed_live = add_item(store, 4, "processing", lease_s=-30)
    fake.put(task_name_for(JOB, lapsed_live, 1))
    leased = add_item(store, 5, "processing", lease_s=30)  # a delivery at work: never even checked
    finals = [add_item(store, 6 + i, s) for i, s in enumerate(("succeeded", "failed", "cancelled"))]
    before = {g: copy.deepcopy(store.items[JOB][g]) for g in (leased, queued_live, lapsed_live, *finals)}

    out = redrive()

    assert out["redrive"] == 1 and out["examined"] == 4 and out["stranded"] == 2
    assert {r["gtin"]: r["reason"] for r in out["items"]} == {
        queued_gone: operations.STRANDED_QUEUED, lapsed_gone: operations.STRANDED_LEASE_LAPSED}
    assert out["tasks_created"] == 2 and out["already_enqueued"] == out["moved_meanwhile"] == out["tasks_failed"] == 0
    checked = {name.rsplit("/", 1)[-1] for name in fake.gets}
    assert checked == {task_name_for(JOB, g, 1) for g in (queued_gone, queued_live, lapsed_gone, lapsed_live)}
    for g in (queued_gone, lapsed_gone):
        name = redrive_task_name_for(JOB, g, 1, 1)
        assert name == f"{task_name_for(JOB, g, 1)}-d1"
        assert path(name) in fake.live, "created in the new name's own shard"
        assert fake.live[path(name)]["payload"] == {"job_id": JOB, "gtin": g, "upc": g[1:], "line": int(g[:13]),
                                                    "round": 1}
        doc = item(store, g)
        assert doc["task_name"] == name and doc["redrive"]["n"] == 1
        assert doc["redrive"]["previous_task_name"] == task_name_for(JOB, g, 1)
        assert doc["status"] in ("queued", "processing")  # status, attempt, history: the worker's to change
    assert {g: store.items[JOB][g] for g in before} == before, "final, leased and live-task items untouched"
    assert len(fake.creates) == 2
    job = store.jobs[JOB]
    assert job["redrive"]["n"] == 1 and job["redrive"]["actor"] == ACTOR and job["status"] == "running"
    [event] = events(store, "redrive")
    assert event["actor"] == ACTOR and event["details"]["n"] == 1 and event["details"]["items"] == 2


def test_a_second_redrive_finds_nothing_and_a_third_checks_the_new_tasks(env):
    store, fake = env
    seed(store)
    g = add_item(store, 1, "queued")
    assert redrive()["tasks_created"] == 1

    again = redrive()
    assert again["redrive"] is None and again["items"] == [] and again["stranded"] == 0
    assert len(events(store, "redrive")) == 1 and store.jobs[JOB]["redrive"]["n"] == 1, "nothing found: no write"
    assert fake.gets[-1] == path(redrive_task_name_for(JOB, g, 1, 1)), "checks the re-drive's task, in its shard"

    fake.finish(redrive_task_name_for(JOB, g, 1, 1))  # that task ended too, the item still open
    third = redrive()
    assert third["redrive"] == 2 and item(store, g)["task_name"] == redrive_task_name_for(JOB, g, 1, 2)
    assert third["items"][0]["task_name"] == redrive_task_name_for(JOB, g, 1, 1)
    assert path(redrive_task_name_for(JOB, g, 1, 2)) in fake.live


def test_the_redrive_name_follows_the_items_round(env):
    store, fake = env
    seed(store, round_=3)
    g = add_item(store, 1, "queued", round_=3)
    legacy = add_item(store, 2, "queued", round_=3, task_name=None)  # no task recorded: its round's task
    out = redrive()
    assert {r["gtin"]: r["task_name"] for r in out["items"]} == {
        g: task_name_for(JOB, g, 3), legacy: task_name_for(JOB, legacy, 3)}
    assert item(store, g)["task_name"].endswith(f"-{g}-r3-d1")
    assert fake.live[path(redrive_task_name_for(JOB, g, 3, 1))]["payload"]["round"] == 3


@pytest.mark.parametrize("status", [s.value for s in JobStatus if s.is_final])
def test_a_finished_job_is_refused_and_nothing_is_read_or_written(env, status):
    store, fake = env
    seed(store, status=status)
    add_item(store, 1, "queued")
    before = copy.deepcopy((store.jobs, store.items))
    for dry_run in (True, False):
        with pytest.raises(ConflictError) as exc:
            redrive(dry_run=dry_run)
        assert exc.value.code == "job_finished" and status in exc.value.message and "never re-driven" in exc.value.message
    assert (store.jobs, store.items) == before and fake.gets == [] and fake.creates == []


def test_ingesting_and_enqueuing_retry_round_are_refused_paused_is_allowed(env):
    store, fake = env
    seed(store, status="ingesting")
    with pytest.raises(ConflictError) as exc:
        redrive(dry_run=True)
    assert exc.value.code == "job_ingesting"
    seed(store, status="running", round_=2, retry={"round": 2, "state": "enqueuing"})
    with pytest.raises(ConflictError) as exc:
        redrive(dry_run=True)
    assert exc.value.code == "retry_round_enqueuing" and "retry-failed" in exc.value.message
    seed(store, status="paused")
    g = add_item(store, 1, "queued")
    assert redrive()["tasks_created"] == 1 and store.jobs[JOB]["status"] == "paused"
    assert item(store, g)["task_name"].endswith("-d1")


def test_unknown_job_and_bad_arguments(env):
    with pytest.raises(NotFoundError):
        redrive(dry_run=True)
    with pytest.raises(NotFoundError):
        operations.redrive_job("a/b", ACTOR, dry_run=True)
    seed(env[0])
    with pytest.raises(BadRequestError, match="limit"):
        redrive(dry_run=True, limit=0)
    with pytest.raises(BadRequestError, match="cursor"):
        redrive(dry_run=True, cursor="..")


def test_dry_run_lists_and_writes_nothing(env):
    store, fake = env
    seed(store)
    g = add_item(store, 1, "queued")
    lapsed = add_item(store, 2, "processing", lease_s=-90)
    before = copy.deepcopy((store.jobs, store.items, store.events))
    out = redrive(dry_run=True)
    assert out["dry_run"] is True and out["redrive"] is None and out["tasks_created"] == 0
    rows = {r["gtin"]: r for r in out["items"]}
    assert set(rows) == {g, lapsed}
    assert rows[g]["line"] == 1 and rows[g]["status"] == "queued" and rows[g]["task_name"] == task_name_for(JOB, g, 1)
    assert "no longer exists" in rows[g]["why"]
    assert rows[lapsed]["status"] == "processing" and "lapsed 90 s ago" in rows[lapsed]["why"]
    assert "new_task_name" not in rows[g]
    assert (store.jobs, store.items, store.events) == before and fake.creates == []


def test_an_item_that_moves_during_the_scan_is_left_alone(env):
    store, fake = env
    seed(store)
    moving = add_item(store, 1, "queued")
    still = add_item(store, 2, "queued")

    def claim_meanwhile(name):  # a late delivery claims the item while its task is being checked
        if name.endswith(task_name_for(JOB, moving, 1)):
            store.transact_item("test", JOB, moving, lambda i: (None, operations.item_state.Update(
                {"status": "processing", "lease_expires_at": NOW + dt.timedelta(seconds=60)})))

    fake.on_get = claim_meanwhile
    out = redrive()
    assert out["stranded"] == 2 and out["moved_meanwhile"] == 1 and out["tasks_created"] == 1
    assert item(store, moving)["task_name"] == task_name_for(JOB, moving, 1) and "redrive" not in item(store, moving)
    assert not any(moving in name for name in fake.creates)
    assert item(store, still)["task_name"].endswith("-d1")
    rows = {r["gtin"]: r for r in out["items"]}
    assert rows[moving]["outcome"] == "moved_meanwhile" and rows[moving]["new_task_name"] is None


def test_already_exists_counts_as_enqueued_and_a_failed_create_is_found_again(env):
    store, fake = env
    seed(store)
    g = add_item(store, 1, "queued")
    fake.ended.add(path(redrive_task_name_for(JOB, g, 1, 1)))  # the same re-drive's create, repeated
    out = redrive()
    assert out["already_enqueued"] == 1 and out["tasks_created"] == 0 and out["items"][0]["outcome"] == "already_enqueued"

    h = add_item(store, 2, "queued")
    fake.fail_create = gexc.PermissionDenied("lacks cloudtasks.tasks.create")
    out = redrive()
    assert out["redrive"] == 2 and out["tasks_failed"] == 2  # g's d1 is gone (tombstoned) too
    assert item(store, h)["task_name"] == redrive_task_name_for(JOB, h, 1, 2)
    fake.fail_create = None
    out = redrive()
    assert out["redrive"] == 3 and out["tasks_created"] == 2
    assert {r["task_name"] for r in out["items"]} == {redrive_task_name_for(JOB, x, 1, 2) for x in (g, h)}


def test_bounded_pages_with_a_cursor(env):
    store, fake = env
    seed(store)
    gs = sorted(add_item(store, n, "queued" if n % 2 else "processing", lease_s=-5) for n in range(1, 6))
    first = redrive(dry_run=True, limit=2)
    assert [r["gtin"] for r in first["items"]] == gs[:2] and first["next_cursor"] == gs[1]
    second = redrive(dry_run=True, limit=2, cursor=first["next_cursor"])
    third = redrive(dry_run=True, limit=2, cursor=second["next_cursor"])
    assert [r["gtin"] for r in second["items"] + third["items"]] == gs[2:] and third["next_cursor"] is None
    assert len(redrive(limit=5)["items"]) == 5


def test_a_small_jobs_redrive_looks_and_creates_in_the_small_lane(env):
    """Issue 17, item 3: GetTask and CreateTask go to the job's lane (`item_lane`), not a bulk shard."""
    store, fake = env
    seed(store, item_lane="small")
    small = settings().lane_queue_path("small")
    live, gone = add_item(store, 1, "queued"), add_item(store, 2, "queued")
    fake.live[f"{small}/tasks/{task_name_for(JOB, live, 1)}"] = {}
    out = redrive()
    assert [row["gtin"] for row in out["items"]] == [gone] and out["tasks_created"] == 1
    assert all(name.startswith(small + "/tasks/") for name in fake.gets)
    assert fake.creates == [f"{small}/tasks/{redrive_task_name_for(JOB, gone, 1, 1)}"]
