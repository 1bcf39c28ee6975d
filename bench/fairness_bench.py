"""Fairness bench on the running local stack (`scripts/dev up`): does a small job still finish
promptly while a large one holds the item queue? (issue 17, item 3; goal: ≤ 2× its solo time)

For each mode, in the same run:
- `before`: the small-jobs lane off (ingest restarted with UPCFAN_SMALL_JOB_MAX_LINES=0): every job's
  item tasks share the bulk item queue, as before the lane existed;
- `after`: the lane on (UPCFAN_SMALL_JOB_MAX_LINES = --threshold): the small job's tasks go to
  `upcfan-items-small`, the large job's to the bulk queue.
it measures
1. the small job solo: upload → job `completed` (the same file size every time, fresh UPCs);
2. the large job: uploaded, then, once it has a backlog in the bulk queue (a quarter of its items
   queued, or its fan-out done), the same small job again: upload → `completed`;
3. the large job's own time, upload → `completed`.
Reported: small-with-large / small-solo per mode (the goal is ≤ 2 with the lane on), and the large
job's time with the lane on / off (what fairness costs the large job).

Both jobs run the `dry_run` handler (object metadata `upcfan-handler: dry_run`): the same claim,
complete and progress path as a marketplace draft without the sandbox marketplace's CPU, so a large
job fits in minutes on a 2-core machine. Ingest is restarted with the stack's own env at the end.
Prints a table and one JSON line (`BENCH_RESULT {...}`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.helpers import QUICK_HELP, delete_jobs, interrupt_on_sigterm  # noqa: E402
from bench.ingest_bench import load_stack_env, make_upcs, queue_task_count  # noqa: E402

RUN_TAG = "UPCFAN_BENCH_RUN"  # bench/runner.py's tag: a process carrying it is "left behind"
DRY_RUN = {"upcfan-handler": "dry_run"}
LANE_VAR = "UPCFAN_SMALL_JOB_MAX_LINES"


@contextlib.contextmanager
def _untagged():
    """The restarted ingest belongs to the stack, not to this bench: it must not carry the bench's tag
    (bench/runner.py ends every tagged process once the bench returns)."""
    tag = os.environ.pop(RUN_TAG, None)
    try:
        yield
    finally:
        if tag is not None:
            os.environ[RUN_TAG] = tag


def restart_ingest(threshold: int | None) -> None:
    """Ingest with the lane threshold `threshold` (None: the stack's own env)."""
    from devstack.testing import bounce_component

    with _untagged():
        bounce_component("ingest", extra_env=None if threshold is None else {LANE_VAR: str(threshold)})


class Jobs:
    def __init__(self) -> None:
        from shared.clients import firestore_client, storage_client

        self.db = firestore_client()
        self.bucket = storage_client().bucket(os.environ["UPCFAN_BUCKET"])
        self.seed = int(time.time())
        self.created: list[str] = []  # stored by this bench and not yet deleted

    def tidy(self) -> int:
        """Delete the jobs uploaded so far: the second mode starts on the same store as the first (the
        emulator's counts scan every stored item), and the bench leaves nothing behind."""
        deleted = delete_jobs(self.created)
        self.created.clear()
        return deleted

    def upload(self, n: int, label: str) -> tuple[str, float]:
        """Upload a fresh n-UPC file (dry run); (job id, monotonic time just before the upload)."""
        from shared.naming import job_id_for

        self.seed += 1
        data = make_upcs(n, seed=self.seed)
        blob = self.bucket.blob(f"bench/fairness-{label}-{n}-{time.time_ns()}.txt")
        blob.metadata = DRY_RUN
        t0 = time.monotonic()
        blob.upload_from_string(data, content_type="text/plain")
        job_id = job_id_for(self.bucket.name, blob.name, blob.generation)
        self.created.append(job_id)
        return job_id, t0

    def doc(self, job_id: str) -> dict:
        from shared.model import JOBS

        snap = self.db.collection(JOBS).document(job_id).get()
        return snap.to_dict() if snap.exists else {}

    def wait_done(self, job_id: str, t0: float, deadline_s: float) -> tuple[float, dict]:
        """Seconds from `t0` until the job is `completed`; (seconds, its document)."""
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            doc = self.doc(job_id)
            if doc.get("status") == "completed":
                return time.monotonic() - t0, doc
            if doc.get("status") in ("failed", "cancelled", "completed_with_failures", "paused"):
                raise SystemExit(f"job {job_id} ended {doc.get('status')}: {doc.get('error')}")
            time.sleep(0.25)
        raise SystemExit(f"job {job_id} not completed within {deadline_s:.0f} s: {self.doc(job_id).get('counts')}")

    def run_small(self, n: int, label: str, deadline_s: float) -> tuple[float, str, dict]:
        """(seconds to completed, lane, its phases: seconds from the job's creation to its fan-out's
        end and to its completing check)."""
        job_id, t0 = self.upload(n, label)
        seconds, doc = self.wait_done(job_id, t0, deadline_s)
        created = doc.get("created_at")
        phases = {name: round((doc[field] - created).total_seconds(), 2)
                  for name, field in (("fanout_done_s", "fanout_done_at"), ("completed_at_s", "completed_at"))
                  if created and doc.get(field)}
        return seconds, doc.get("item_lane") or "bulk", phases

    def wait_backlog(self, job_id: str, n: int, deadline_s: float) -> int:
        """Until a quarter of the large job's items wait in the bulk queue (or its fan-out is done)."""
        from shared.config import settings

        host, queue = os.environ["CLOUD_TASKS_EMULATOR_HOST"], settings().item_queue_path()
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            queued = queue_task_count(host, queue)
            if queued >= n // 4 or self.doc(job_id).get("fanout_done_at"):
                return queued
            time.sleep(0.25)
        raise SystemExit(f"large job {job_id}: no backlog of {n // 4} tasks within {deadline_s:.0f} s")


def measure(jobs: Jobs, mode: str, threshold: int, small: int, large: int, deadline_s: float) -> dict:
    restart_ingest(threshold)
    solo_s, solo_lane, solo_phases = jobs.run_small(small, f"{mode}-solo", deadline_s)
    large_id, large_t0 = jobs.upload(large, f"{mode}-large")
    backlog = jobs.wait_backlog(large_id, large, deadline_s)
    with_s, with_lane, with_phases = jobs.run_small(small, f"{mode}-with-large", deadline_s)
    large_s, large_doc = jobs.wait_done(large_id, large_t0, deadline_s * 4)
    jobs.tidy()
    out = {"threshold": threshold, "solo_s": round(solo_s, 2), "with_large_s": round(with_s, 2),
           "ratio": round(with_s / solo_s, 3), "large_s": round(large_s, 2), "backlog_at_submit": backlog,
           "small_lane": with_lane, "solo_lane": solo_lane, "large_lane": large_doc.get("item_lane") or "bulk",
           "solo_phases": solo_phases, "with_large_phases": with_phases}
    print(f"{mode}: {json.dumps(out)}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", type=int, default=500, help="lines of the small job")
    ap.add_argument("--large", type=int, default=20_000, help="lines of the large job")
    ap.add_argument("--threshold", type=int, default=0,
                    help="UPCFAN_SMALL_JOB_MAX_LINES with the lane on (default: shared.config.SMALL_JOB_MAX_LINES)")
    ap.add_argument("--deadline", type=float, default=600.0, help="seconds a small job (or a backlog) may take")
    ap.add_argument("--quick", action="store_true", help=QUICK_HELP)
    args = ap.parse_args()
    if args.quick:
        args.small, args.large, args.threshold, args.deadline = 5, 40, 10, 120.0
    interrupt_on_sigterm()
    os.environ.update(load_stack_env())
    from shared.config import SMALL_JOB_MAX_LINES

    threshold = args.threshold or SMALL_JOB_MAX_LINES
    if not args.small <= threshold < args.large:
        raise SystemExit(f"--threshold {threshold} must be at least --small {args.small} and below --large {args.large}")
    jobs = Jobs()
    try:
        before = measure(jobs, "before", 0, args.small, args.large, args.deadline)
        after = measure(jobs, "after", threshold, args.small, args.large, args.deadline)
    finally:
        restart_ingest(None)
        jobs.tidy()
    load = os.getloadavg()
    rows = [
        ("lane off: small solo / with large", f"{before['solo_s']:.1f} s / {before['with_large_s']:.1f} s",
         f"{before['ratio']:.2f}"),
        ("lane on:  small solo / with large", f"{after['solo_s']:.1f} s / {after['with_large_s']:.1f} s",
         f"{after['ratio']:.2f} (goal ≤ 2)"),
        ("large job lane on / lane off", f"{after['large_s']:.1f} s / {before['large_s']:.1f} s",
         f"{after['large_s'] / before['large_s']:.2f}"),
    ]
    for r in rows:
        print(f"{r[0]:<36} {r[1]:>24} {r[2]:>16}")
    print("BENCH_RESULT " + json.dumps({
        "bench": "fairness", "small": args.small, "large": args.large, "threshold": threshold,
        "before": before, "after": after, "ratio_before": before["ratio"], "ratio_after": after["ratio"],
        "goal_ratio": 2.0, "large_slowdown": round(after["large_s"] / before["large_s"], 3),
        "load_at_end": [round(x, 1) for x in load]}))


if __name__ == "__main__":
    main()
