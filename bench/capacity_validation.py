"""Validate the capacity model (shared/capacity.py) against the running local stack, in one run.

1. Measure the stack's limits with a calibration job (default 3,000 UPCs): item queue paused, the file
   dropped in the bucket -> plan time (upload -> job has its plan) and fan-out rate (items born and
   tasks created per second, from the job's own timestamps); then the queue resumed -> the worker's
   drain rate (items final per second, the progress check's window taken out), and what one progress
   check's count of the job's items takes.
2. Run a 5,000- and a 20,000-UPC job end to end with the queue live: upload -> job observed `completed`.
3. Feed (1) to the model (one host: fan-out and workers share its CPU, `host_cpu_shared`; the
   emulators have no Firestore ramp or index cap) and report predicted vs measured. Goal: within 25%.

Measurement and jobs run back to back so the machine's load weighs on both; the load average is in
the output. Needs the local stack (`scripts/dev up`, or bench/run which brings it up). Prints a table
and one `BENCH_RESULT {...}` line. `--quick`: tiny sizes (checks it runs; no figure means anything).
Run: .venv/bin/python bench/capacity_validation.py [--calibrate 3000] [--jobs 5000,20000]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.helpers import QUICK_HELP, delete_jobs, interrupt_on_sigterm  # noqa: E402
from bench.ingest_bench import load_stack_env, make_upcs  # noqa: E402

GOAL_ERROR = 0.25
POLL_S = 0.25  # measurement loop's polling interval (a job doc read per poll)


def _ts(value) -> float | None:
    """A Firestore timestamp (datetime) as epoch seconds."""
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        return value.timestamp()
    return dt.datetime.fromisoformat(str(value)).timestamp()


def _job(job_id: str) -> dict:
    from shared.clients import firestore_client
    from shared.model import JOBS

    return firestore_client().collection(JOBS).document(job_id).get().to_dict() or {}


def _wait(job_id: str, what: str, done, deadline_s: float) -> dict:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        job = _job(job_id)
        if job.get("status") in ("failed", "cancelled"):
            raise SystemExit(f"job {job_id} ended {job.get('status')}: {job.get('error')}")
        if done(job):
            return job
        time.sleep(POLL_S)
    raise SystemExit(f"job {job_id}: {what} not reached in {deadline_s:.0f} s (last: {_job(job_id).get('status')})")


# Jobs this run stored: kept until the end (calibration and validation see the same store), then deleted.
_CREATED: list[str] = []


def _upload(n: int, tag: str) -> tuple[str, float]:
    """Drop an n-UPC file in the stack's bucket; (job id, wall time the upload started)."""
    from shared.clients import storage_client
    from shared.naming import job_id_for

    data = make_upcs(n, seed=time.time_ns() % 2**31)
    blob = storage_client().bucket(os.environ["UPCFAN_BUCKET"]).blob(f"bench/capacity-{tag}-{n}-{time.time_ns()}.txt")
    started = time.time()
    blob.upload_from_string(data, content_type="text/plain")
    job_id = job_id_for(blob.bucket.name, blob.name, blob.generation)
    _CREATED.append(job_id)
    return job_id, started


def calibrate(n: int, deadline_s: float) -> dict:
    """The stack's limits from one job: plan time, fan-out rate with the item queue paused, drain rate."""
    from shared.clients import tasks_client
    from shared.config import settings

    s = settings()
    queues = [s.item_queue_path(i) for i in range(s.item_queue_shards)]
    for q in queues:
        tasks_client().pause_queue(name=q)
    try:
        job_id, started = _upload(n, "calibrate")
        _wait(job_id, "plan", lambda j: j.get("plan"), deadline_s)
        plan_seen = time.time()
        fanned = _wait(job_id, "fan-out done", lambda j: j.get("fanout_done_at"), deadline_s)
        fanout_done = _ts(fanned["fanout_done_at"])
    finally:
        for q in queues:
            tasks_client().resume_queue(name=q)
    resumed = time.time()
    done = _wait(job_id, "completed", lambda j: j.get("status") == "completed", deadline_s)
    completed = _ts(done["completed_at"])
    items = int((fanned.get("totals") or {}).get("items") or n)
    count_s = _time_progress_count(job_id)
    plan_s = plan_seen - started
    # Fan-out starts when the plan is done (every process here shares one host clock).
    fanout_work_s = max(1e-3, fanout_done - started - plan_s)
    tail_s = s.progress_check_s  # the completion check runs at the end of the last item's window (mean: half)
    drain_s = completed - resumed  # `completed_at` is the completing check's start: its count is not in it
    drain_work_s = max(1e-3, drain_s - tail_s / 2)
    return {
        "job_id": job_id, "upcs": n, "items": items,
        "plan_s": round(plan_s, 2), "fanout_s": round(fanout_work_s, 2),
        "fanout_items_per_s": round(items / fanout_work_s, 1),
        "drain_s": round(drain_s, 2), "worker_items_per_s": round(items / drain_work_s, 1),
        "progress_check_s": tail_s, "progress_count_s": round(count_s, 3),
        "progress_count_s_per_item": count_s / max(1, items), "item_queues": len(queues),
    }


def _time_progress_count(job_id: str, repeats: int = 3) -> float:
    """What one progress check's counts of this job's items take on this emulator (best of `repeats`:
    the stack is idle between jobs here; under a job's load the completing check runs after its work)."""
    from shared.store import default_store

    store = default_store()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        store.count_items_by_status(job_id)
        best = min(best, time.perf_counter() - t0)
    return best


def run_job(n: int, deadline_s: float) -> dict:
    """Upload -> the job observed `completed` (what an operator sees). The job's `completed_at` is when the
    completing progress check started, before its count of the items, so it is kept apart as
    `completed_at_s`."""
    job_id, started = _upload(n, "job")
    done = _wait(job_id, "completed", lambda j: j.get("status") == "completed", deadline_s)
    observed = time.time()
    completed = _ts(done["completed_at"])
    fanout_done = _ts(done.get("fanout_done_at"))
    return {"job_id": job_id, "upcs": n, "measured_s": round(observed - started, 2),
            "completed_at_s": round(completed - started, 2),
            "fanout_done_s": round(fanout_done - started, 2) if fanout_done else None}


def local_params(n: int, cal: dict):
    """The model's parameters for the local stack, from the calibration."""
    from shared.capacity import CapacityParams
    from shared.config import ITEM_QUEUE

    return CapacityParams(
        upcs=n,
        plan_overhead_s=cal["plan_s"], plan_read_mb_per_s=1e6,  # the measured plan time covers the read
        # One ingest process's rate as measured (a 20k job's second chunk shares the same 2 CPUs).
        ingest_instances=1, fanout_items_per_s_per_instance=cal["fanout_items_per_s"],
        item_queues=cal["item_queues"], queue_dispatches_per_s=ITEM_QUEUE.rate.max_dispatches_per_second,
        queue_max_concurrent=ITEM_QUEUE.local_max_concurrent_dispatches,
        worker_instances=1, worker_min_instances=1, cold_start_s=0.0,
        worker_items_per_s_per_instance=cal["worker_items_per_s"],
        # the emulators: no ramp, no index cap; latencies are local (the measured rates carry the cost)
        firestore_ramp=False, index_exemptions=True,
        claim_s=0.01, complete_s=0.01, marketplace_call_s=0.005,
        progress_check_s=cal["progress_check_s"] / 2, progress_check_latency_s=0.5,
        progress_count_s_per_item=cal.get("progress_count_s_per_item", 0.0),
        host_cpu_shared=True,
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calibrate", type=int, default=3000, help="UPCs in the calibration job")
    ap.add_argument("--jobs", default="5000,20000", help="comma-separated UPC counts of the validated jobs")
    ap.add_argument("--deadline-s", type=float, default=1500.0, help="per job phase")
    ap.add_argument("--quick", action="store_true", help=QUICK_HELP)
    args = ap.parse_args(argv)
    if args.quick:
        args.calibrate, args.jobs = 100, "200"
    interrupt_on_sigterm()
    load_stack_env()
    os.environ.setdefault("UPCFAN_LOG_LEVEL", "WARNING")
    try:
        return _validate(args)
    finally:
        print(f"tidied: {len(_CREATED)} jobs, {delete_jobs(_CREATED):,} documents deleted", flush=True)


def _validate(args) -> int:
    from shared.capacity import assess

    load_before = os.getloadavg()
    cal = calibrate(args.calibrate, args.deadline_s)
    print(f"calibration ({cal['upcs']:,} UPCs): plan {cal['plan_s']} s, fan-out {cal['fanout_items_per_s']}/s, "
          f"workers {cal['worker_items_per_s']}/s, progress count {cal['progress_count_s']} s", flush=True)
    jobs = []
    for n in (int(x) for x in args.jobs.split(",") if x.strip()):
        measured = run_job(n, args.deadline_s)
        report = assess(local_params(n, cal))
        predicted = report.prediction.total_s
        error = (predicted - measured["measured_s"]) / measured["measured_s"]
        jobs.append({**measured, "predicted_s": round(predicted, 1),
                     "predicted_fanout_done_s": round(report.prediction.fanout_done_s, 1),
                     "error": round(error, 3), "binding_limit": report.binding, "next_limit": report.next_limit})
        print(f"{n:>7,} UPCs: measured {measured['measured_s']:.1f} s, predicted {predicted:.1f} s "
              f"({error:+.0%}), binding {report.binding}", flush=True)
    load_after = os.getloadavg()
    worst = max((abs(j["error"]) for j in jobs), default=math.nan)
    print(f"load average 1/5/15 min before {load_before[0]:.1f}/{load_before[1]:.1f}/{load_before[2]:.1f}, "
          f"after {load_after[0]:.1f}/{load_after[1]:.1f}/{load_after[2]:.1f}; worst error {worst:.0%} "
          f"(goal within {GOAL_ERROR:.0%})")
    print("BENCH_RESULT " + json.dumps({
        "bench": "capacity", "quick": args.quick, "calibration": cal, "jobs": jobs,
        "worst_abs_error": None if math.isnan(worst) else round(worst, 3), "goal_abs_error": GOAL_ERROR,
        "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in load_after],
        "cpus": os.cpu_count()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
