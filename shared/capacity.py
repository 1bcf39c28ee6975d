"""Capacity model: how long a file of N UPCs takes end to end, which limit binds, and what to lift next.

A fluid (rate-based) time-stepped simulation of the pipeline, not a per-item discrete-event one: a
million items would be a million simulated events per run, and naming the binding limit re-runs the
model once per limit. Every stage here is a rate limit or a concurrency limit (Little's law turns the
latter into a rate), so a fluid model is exact up to one item's service time, which is added once.

Stages, as the code runs them (shared/ingest.py, shared/worker/, shared/progress.py):
1. plan: the job document, then the plan task streams the file once (`plan_read_mb_per_s`);
2. fan-out: chunk tasks on the control queue, each chunk on an ingest instance writes its items
   (BatchWrite of 500, born `queued`) and creates one Cloud Task per item on the process's fan-out pool;
3. dispatch: each item queue dispatches at most `queue_dispatches_per_s` and holds at most
   `queue_max_concurrent` in flight; `item_queues` queues (shards) add up;
4. work: a worker slot (instance × thread) holds a delivery for claim txn + handler + complete txn;
   instances beyond `worker_min_instances` are ready `cold_start_s` after the first item arrives;
5. shared limits: the marketplace's request quota; Firestore's ramp on a new key range (every job's
   items are a new key range, `jobs/{job_id}/items/...`) and, without index exemptions, the ~500
   writes/s a collection takes when an indexed field increases monotonically (item timestamps);
   on the local stack, the one host's CPU shared by fan-out and workers;
6. completion: the last item's progress check runs at the end of its `progress_check_s` window and
   counts the job's items (`completion_s`).

Pure: no clients, no Flask; `upcfan capacity` (upcfan_cli/main.py) and bench/capacity_validation.py
call it. docs/capacity.md gives each production default's source.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared.config import CONTROL_QUEUE, ITEM_QUEUE

INF = math.inf

# Each limit the model knows, with what it is. `lifted` removes one; the binding limit is the one
# whose removal saves the most time.
LIMITS: dict[str, str] = {
    "plan_read": "plan task's streaming read of the file",
    "control_queue": "chunk tasks in flight (control queue max concurrent, ingest instances x concurrency)",
    "fanout": "item creates per ingest instance (client CPU, fan-out threads / CreateTask latency)",
    "dispatch_rate": "Cloud Tasks max_dispatches_per_second per item queue x item queues",
    "dispatch_concurrency": "Cloud Tasks max_concurrent_dispatches per item queue / item service time",
    "worker_slots": "worker instances x threads / item service time",
    "worker_cpu": "items per second one worker instance's CPU can process x instances",
    "marketplace_rate": "marketplace request quota / calls per item",
    "firestore_ramp": "Firestore ramp on a new key range (500 ops/s, +50% every 5 min)",
    "firestore_sequential_index": "~500 writes/s to a collection with a monotonically increasing indexed field",
    "host_cpu": "one host's CPU shared by fan-out and workers (local stack only)",
    "cold_start": "worker instances beyond the minimum start after the first item arrives",
    "progress_check": "the last item's progress check at the end of its window, and its count of the items",
}


class CapacityParams(BaseModel):
    """Every input of the model. Defaults are production's (shared/config.py, infra/deploy.py, Google's
    documented limits) or, where no document gives a number, a marked estimate; docs/capacity.md lists
    each with its source."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    upcs: int = Field(gt=0, description="UPC lines in the file (each a distinct GTIN: an item and a task)")
    bytes_per_upc: float = Field(14.0, gt=0, description="bytes per line: 12-13 digits and a newline")

    # plan
    plan_overhead_s: float = Field(1.0, ge=0, description="submit -> plan task running: job document, plan task "
                                                          "create and dispatch (estimate)")
    plan_read_mb_per_s: float = Field(50.0, gt=0, description="plan task's streaming read of the object, MB/s "
                                                              "(estimate for a GCS read from a function)")

    # fan-out (ingest)
    chunk_bytes: int = Field(256 * 1024, gt=0, description="UPCFAN_CHUNK_BYTES: bytes of file per chunk task")
    control_max_concurrent: int = Field(CONTROL_QUEUE.rate.max_concurrent_dispatches, gt=0,
                                        description="control queue max_concurrent_dispatches (chunk tasks in flight)")
    ingest_instances: int = Field(7, gt=0, description="ingest max instances (infra/deploy.py: ceil(20 / 4) + 2)")
    ingest_concurrency: int = Field(4, gt=0, description="chunk deliveries one ingest instance takes at once")
    fanout_threads: int = Field(32, gt=0, description="UPCFAN_FANOUT_THREADS: concurrent CreateTask calls per process")
    create_task_s: float = Field(0.05, gt=0, description="one CreateTask call's latency (estimate)")
    fanout_items_per_s_per_instance: float = Field(
        200.0, gt=0, description="items (BatchWrite share + CreateTask) one ingest instance's CPU fans out per second "
                                 "(estimate: creates are client-CPU-bound; the local bench measures it)")

    # dispatch
    item_queues: int = Field(1, gt=0, description="item queues (UPCFAN_ITEM_QUEUE_SHARDS); tasks spread evenly")
    queue_dispatches_per_s: float = Field(ITEM_QUEUE.rate.max_dispatches_per_second, gt=0,
                                          description="max_dispatches_per_second per item queue (Cloud Tasks max 500)")
    queue_max_concurrent: int = Field(ITEM_QUEUE.rate.max_concurrent_dispatches, gt=0,
                                      description="max_concurrent_dispatches per item queue (Cloud Tasks max 5000)")

    # work
    worker_instances: int | None = Field(None, gt=0, description="worker max instances; default as infra/deploy.py "
                                         "sizes it: ceil((queues x queue max concurrent + control max concurrent) / threads)")
    worker_min_instances: int = Field(1, ge=0, description="worker min instances (warm before the job)")
    worker_threads: int = Field(80, gt=0, description="worker concurrency = gunicorn THREADS per instance")
    worker_items_per_s_per_instance: float = Field(
        150.0, gt=0, description="items one worker instance's CPU processes per second when its threads are busy "
                                 "(estimate: ~7 ms of Python per item on 1 vCPU; the local bench measures it)")
    claim_s: float = Field(0.03, ge=0, description="claim transaction latency (estimate)")
    complete_s: float = Field(0.03, ge=0, description="complete transaction latency (estimate)")
    marketplace_calls_per_item: int = Field(4, ge=0, description="handler calls per item on the happy path "
                                            "(catalog lookup, inventory upsert, offer lookup, offer create)")
    marketplace_call_s: float = Field(0.15, ge=0, description="one marketplace call's latency (estimate)")
    marketplace_rps: float = Field(INF, gt=0, description="marketplace request quota, calls/s (inf = none)")
    cold_start_s: float = Field(5.0, ge=0, description="a new worker instance's cold start (estimate)")

    # Firestore
    firestore_writes_per_item: float = Field(3.0, ge=0, description="item writes: born at fan-out, claim, complete")
    firestore_reads_per_item: float = Field(2.0, ge=0, description="item reads in the claim and complete transactions")
    firestore_ramp: bool = Field(True, description="apply the 500/50/5 ramp to the job's new key range")
    firestore_ramp_start_ops_per_s: float = Field(500.0, gt=0, description="ramp start, operations/s")
    firestore_ramp_growth: float = Field(1.5, ge=1, description="ramp growth per period (+50%)")
    firestore_ramp_period_s: float = Field(300.0, gt=0, description="ramp period (5 minutes)")
    index_exemptions: bool = Field(True, description="item timestamp fields exempt from single-field indexes; "
                                                     "False applies the sequential-index write cap")
    sequential_index_writes_per_s: float = Field(500.0, gt=0, description="writes/s to a collection with a "
                                                 "monotonically increasing indexed field")

    # completion
    progress_check_s: float = Field(5.0, ge=0, description="UPCFAN_PROGRESS_CHECK_S: progress check window")
    progress_check_latency_s: float = Field(0.5, ge=0, description="a progress check's dispatch and run")
    progress_count_s_per_item: float = Field(
        2e-6, ge=0, description="seconds a progress check's counts take per item of the job (estimate: count() "
                                "latency grows with the index entries it scans; the local bench measures it)")

    # local stack only
    host_cpu_shared: bool = Field(False, description="fan-out and workers share one host's CPU (the local stack): "
                                  "fanout/fanout_alone + work/work_alone <= 1")

    @model_validator(mode="after")
    def _check(self) -> CapacityParams:
        if self.worker_instances is not None and self.worker_instances < self.worker_min_instances:
            raise ValueError(f"worker_instances ({self.worker_instances}) is below worker_min_instances "
                             f"({self.worker_min_instances})")
        return self

    @property
    def max_worker_instances(self) -> int:
        if self.worker_instances is not None:
            return self.worker_instances
        return math.ceil((self.item_queues * self.queue_max_concurrent + self.control_max_concurrent)
                         / self.worker_threads)

    @property
    def item_service_s(self) -> float:
        """One delivery's time on a worker thread: claim + handler calls + complete."""
        return self.claim_s + self.marketplace_calls_per_item * self.marketplace_call_s + self.complete_s

    @property
    def upcs_per_chunk(self) -> float:
        return max(1.0, self.chunk_bytes / self.bytes_per_upc)

    @property
    def file_bytes(self) -> float:
        return self.upcs * self.bytes_per_upc


@dataclass(frozen=True)
class Prediction:
    """One run of the model: end-to-end time, per-stage times, and which limits held the work back."""

    total_s: float
    plan_s: float  # submit -> plan done (fan-out may start)
    fanout_done_s: float  # submit -> every item born and its task created
    work_done_s: float  # submit -> last item final
    # Share of the work stage's time each limit was the tightest one (sums to ~1).
    work_bound_by: dict[str, float] = field(default_factory=dict)
    fanout_bound_by: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class LimitEffect:
    limit: str
    what: str
    total_if_lifted_s: float
    saved_s: float


@dataclass(frozen=True)
class CapacityReport:
    """A prediction, the binding limit (lifting it saves the most time) and the next one after it."""

    params: CapacityParams
    prediction: Prediction
    binding: str
    binding_saved_s: float
    next_limit: str | None  # the binding limit once `binding` is lifted
    next_total_s: float  # total with `binding` lifted
    effects: list[LimitEffect]

    def to_dict(self) -> dict:
        p = self.prediction
        return {
            "upcs": self.params.upcs,
            "total_s": round(p.total_s, 1),
            "items_per_s": round(self.params.upcs / p.total_s, 1) if p.total_s > 0 else None,
            "stages_s": {"plan": round(p.plan_s, 1), "fanout_done": round(p.fanout_done_s, 1),
                         "work_done": round(p.work_done_s, 1), "completed": round(p.total_s, 1)},
            "binding_limit": self.binding,
            "binding_limit_is": LIMITS[self.binding],
            "binding_saved_s": round(self.binding_saved_s, 1),
            "next_limit": self.next_limit,
            "total_with_binding_lifted_s": round(self.next_total_s, 1),
            "work_bound_by": {k: round(v, 3) for k, v in p.work_bound_by.items()},
            "fanout_bound_by": {k: round(v, 3) for k, v in p.fanout_bound_by.items()},
            "if_lifted": [{"limit": e.limit, "total_s": round(e.total_if_lifted_s, 1), "saved_s": round(e.saved_s, 1)}
                          for e in self.effects],
            "params": self.params.model_dump(mode="json"),
        }


def firestore_ramp_ops_per_s(p: CapacityParams, since_first_write_s: float) -> float:
    """Operations/s the job's new key range takes `since_first_write_s` after its first write."""
    if not p.firestore_ramp:
        return INF
    periods = math.floor(max(0.0, since_first_write_s) / p.firestore_ramp_period_s)
    return p.firestore_ramp_start_ops_per_s * p.firestore_ramp_growth ** periods


def _rough_s(p: CapacityParams) -> float:
    """A rough length of the run from its tightest constant rate, to size the simulation's step."""
    service_s = max(1e-9, p.item_service_s)
    work = min(p.item_queues * p.queue_dispatches_per_s, p.item_queues * p.queue_max_concurrent / service_s,
               p.max_worker_instances * p.worker_threads / service_s,
               p.max_worker_instances * p.worker_items_per_s_per_instance,
               p.marketplace_rps / p.marketplace_calls_per_item if p.marketplace_calls_per_item else INF,
               p.firestore_ramp_start_ops_per_s / max(1e-9, p.firestore_writes_per_item + p.firestore_reads_per_item)
               if p.firestore_ramp else INF,
               INF if p.index_exemptions else p.sequential_index_writes_per_s / max(1e-9, p.firestore_writes_per_item))
    fan = min(p.ingest_instances, p.control_max_concurrent) * p.fanout_items_per_s_per_instance
    if p.host_cpu_shared:
        return p.upcs / fan + p.upcs / work
    return p.upcs / min(work, fan)


STEPS = 2000  # per run; the step doubles each further STEPS steps, so no parameter set runs long


def simulate(p: CapacityParams) -> Prediction:
    """Run the pipeline once with the parameters as given."""
    n = float(p.upcs)
    plan_s = p.plan_overhead_s + p.file_bytes / (p.plan_read_mb_per_s * 1e6)
    dt = min(1.0, max(0.01, _rough_s(p) / STEPS))
    service_s = p.item_service_s
    per_ingest = min(p.fanout_items_per_s_per_instance,
                     p.fanout_threads / p.create_task_s if p.create_task_s > 0 else INF)
    chunk_slots = min(p.control_max_concurrent, p.ingest_instances * p.ingest_concurrency)
    max_workers = p.max_worker_instances
    ops_fanout = min(1.0, p.firestore_writes_per_item)  # the item's birth: one write at fan-out
    ops_work = (p.firestore_writes_per_item - ops_fanout) + p.firestore_reads_per_item
    writes_work = p.firestore_writes_per_item - ops_fanout

    created = done = 0.0
    t = plan_s
    fanout_done_s = work_done_s = None
    first_item_s = first_write_s = None
    fan_bound: dict[str, float] = {}
    work_bound: dict[str, float] = {}
    steps = 0
    # Items are whole: a stage is done when less than half an item is left (a fluid stage scaled by a
    # joint limit would otherwise approach its last item forever).
    while done < n - 0.5:
        steps += 1
        if steps % STEPS == 0:
            dt *= 2  # the rough length was far off: keep the run's step count bounded
        # fan-out caps
        remaining = n - created
        fan_caps: dict[str, float] = {}
        if remaining > 0:
            chunks_left = math.ceil(remaining / p.upcs_per_chunk - 1e-9)
            in_flight = min(chunk_slots, chunks_left)
            busy_instances = min(p.ingest_instances, in_flight)
            fan_caps["control_queue"] = in_flight * per_ingest  # what the chunks in flight could reach
            fan_caps["fanout"] = busy_instances * per_ingest
            fan_caps["remaining"] = remaining / dt
        fan = min(fan_caps.values()) if fan_caps else 0.0

        # work caps
        if first_item_s is None and created > 0:
            first_item_s = t
        warm = first_item_s is not None and t - first_item_s >= p.cold_start_s
        instances = max_workers if warm else max(p.worker_min_instances, 0)
        backlog = created - done
        work_caps = {
            "dispatch_rate": p.item_queues * p.queue_dispatches_per_s,
            "dispatch_concurrency": p.item_queues * p.queue_max_concurrent / service_s if service_s > 0 else INF,
            "worker_slots": instances * p.worker_threads / service_s if service_s > 0 else INF,
            "worker_cpu": instances * p.worker_items_per_s_per_instance,
            "marketplace_rate": (p.marketplace_rps / p.marketplace_calls_per_item
                                 if p.marketplace_calls_per_item else INF),
        }
        if not warm and instances < max_workers:
            # what holds work back before the other instances are up is their cold start
            work_caps["cold_start"] = min(work_caps["worker_slots"], work_caps["worker_cpu"])
            del work_caps["worker_slots"], work_caps["worker_cpu"]
        work_unbacklogged = min(work_caps.values())
        work = min(work_unbacklogged, backlog / dt + fan)

        # joint limits: scale both stages down by the same factor when one is exceeded
        joint: dict[str, float] = {}
        if first_write_s is None and fan > 0:
            first_write_s = t
        if p.firestore_ramp and first_write_s is not None:
            cap = firestore_ramp_ops_per_s(p, t - first_write_s)
            joint["firestore_ramp"] = (fan * ops_fanout + work * ops_work) / cap
        if not p.index_exemptions:
            joint["firestore_sequential_index"] = (fan * ops_fanout + work * writes_work) / p.sequential_index_writes_per_s
        if p.host_cpu_shared:
            joint["host_cpu"] = (fan / max(1e-9, min(fan_caps.get("fanout", INF), fan_caps.get("control_queue", INF)))
                                 + work / max(1e-9, work_unbacklogged))
        worst = max(joint.items(), key=lambda kv: kv[1], default=(None, 0.0))
        if worst[1] > 1.0:
            fan /= worst[1]
            work /= worst[1]

        if fan > 0:
            tight = worst[0] if worst[1] > 1.0 else min(fan_caps, key=fan_caps.get)
            fan_bound[tight] = fan_bound.get(tight, 0.0) + dt
        if work > 0 or backlog > 0:
            if worst[1] > 1.0:
                tight = worst[0]
            elif work < work_unbacklogged - 1e-9:
                tight = "upstream"  # waiting for items the fan-out has not yet made
            else:
                tight = min(work_caps, key=work_caps.get)
            work_bound[tight] = work_bound.get(tight, 0.0) + dt

        created = min(n, created + fan * dt)
        if created >= n - 0.5:
            created = n
        done = min(created, done + work * dt)
        t += dt
        if fanout_done_s is None and created >= n:
            fanout_done_s = t
    work_done_s = t + service_s  # the last delivery still runs its own service time
    fanout_done_s = fanout_done_s if fanout_done_s is not None else t
    total = work_done_s + completion_s(p)
    return Prediction(total_s=total, plan_s=plan_s, fanout_done_s=fanout_done_s, work_done_s=work_done_s,
                      work_bound_by=_shares(work_bound), fanout_bound_by=_shares(fan_bound))


def completion_s(p: CapacityParams) -> float:
    """Last item final -> job completed. The check asked for by the last item runs at the end of its
    window and counts every item. One check of a job counts at a time (shared/progress.py): when a
    count takes longer than a window, checks run back to back and the last item lands, on average,
    halfway through one that may not see it, so the completing check starts after that one's rest."""
    count_s = p.upcs * p.progress_count_s_per_item
    busy = min(1.0, count_s / p.progress_check_s) if p.progress_check_s > 0 else 1.0
    return p.progress_check_s + p.progress_check_latency_s + count_s * (1.0 + busy / 2.0)


def _shares(seconds: dict[str, float]) -> dict[str, float]:
    total = sum(seconds.values())
    return {} if total <= 0 else dict(sorted(((k, v / total) for k, v in seconds.items()), key=lambda kv: -kv[1]))


def lifted(p: CapacityParams, limit: str) -> CapacityParams:
    """The same parameters with one limit removed (what "more of it" tends to)."""
    big = 1e12
    change: dict[str, object] = {
        "plan_read": {"plan_read_mb_per_s": big},
        "control_queue": {"control_max_concurrent": 10**9, "ingest_concurrency": 10**6},
        "fanout": {"fanout_items_per_s_per_instance": big, "create_task_s": 1e-9, "ingest_instances": 10**6},
        "dispatch_rate": {"queue_dispatches_per_s": big},
        "dispatch_concurrency": {"queue_max_concurrent": 10**9},
        "worker_slots": {"worker_threads": 10**9},
        "worker_cpu": {"worker_items_per_s_per_instance": big},
        "marketplace_rate": {"marketplace_rps": INF},
        "firestore_ramp": {"firestore_ramp": False},
        "firestore_sequential_index": {"index_exemptions": True},
        "host_cpu": {"host_cpu_shared": False},
        "cold_start": {"cold_start_s": 0.0},
        "progress_check": {"progress_check_s": 0.0, "progress_check_latency_s": 0.0, "progress_count_s_per_item": 0.0},
    }[limit]
    if limit == "worker_slots" and p.worker_instances is None:
        change = {**change, "worker_instances": p.max_worker_instances}  # the threads change must not resize
    return p.model_copy(update=change)


def assess(p: CapacityParams) -> CapacityReport:
    """Predict, then lift each limit in turn: the binding limit saves the most; the next is found the same way
    with the binding one lifted."""
    base = simulate(p)
    effects = _effects(p, base)
    binding = effects[0]
    p_next = lifted(p, binding.limit)
    next_effects = _effects(p_next, simulate(p_next), skip={binding.limit})
    next_limit = next_effects[0].limit if next_effects and next_effects[0].saved_s > 0 else None
    return CapacityReport(params=p, prediction=base, binding=binding.limit, binding_saved_s=binding.saved_s,
                          next_limit=next_limit, next_total_s=binding.total_if_lifted_s, effects=effects)


# Limits that add time of their own; every other limit is a cap that changes nothing unless it was the
# tightest one at some step of the run.
_ALWAYS_TRIED = {"plan_read", "cold_start", "progress_check"}


def _effects(p: CapacityParams, run: Prediction, skip: set[str] = frozenset()) -> list[LimitEffect]:
    total_s = run.total_s
    tight = _ALWAYS_TRIED | set(run.work_bound_by) | set(run.fanout_bound_by)
    out = []
    for limit, what in LIMITS.items():
        if limit in skip:
            continue
        t = simulate(lifted(p, limit)).total_s if limit in tight else total_s
        out.append(LimitEffect(limit, what, t, total_s - t))
    return sorted(out, key=lambda e: -e.saved_s)
