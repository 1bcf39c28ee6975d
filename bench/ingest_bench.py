"""Ingest benchmark on the running local stack (`scripts/dev up`).

1. Fan-out speed: an N-UPC file (default 100k) dropped in the bucket → time until all N item
   tasks exist in the (paused) item queue, against a bare concurrent CreateTask loop with the
   official client on the same emulator in the same run. Goal: ratio ≥ 0.9 (issue 17). Then
   --raw-tasks raw REST creates on the same emulator (the emulator's own create rate, next to no
   client cost). Goal: fan-out rate ≥ 0.5 of it.
2. Memory: peak RSS of a process running the real ingest code (plan + every chunk) on 1M
   lines vs 10k lines. Goal: ≤ 1.2×. Creating 1M items and tasks would take ~15 min on this
   machine, so the RSS runs classify every line with the enqueue step only counting (no item or
   task creates); the 100k fan-out above measures the item- and task-creating path, and chunk
   size bounds its memory.

Prints a table and one JSON line (`BENCH_RESULT {...}`). About 10 min at the defaults on a quiet
2-core machine (two 100k create runs of ~4-5 min each); `--rss-only` skips the fan-out part.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.helpers import delete_jobs  # noqa: E402


def load_stack_env() -> dict:
    from devstack import paths
    from shared.envfile import load_env_file

    if not paths.STACK_ENV.exists():
        sys.exit("the local stack is not running: scripts/dev up")
    return load_env_file(paths.STACK_ENV)


def make_upcs(n: int, seed: int) -> bytes:
    from stdnum import ean

    rng = random.Random(seed)
    seen, out = set(), []
    while len(out) < n:
        body = f"{rng.randrange(10**11):011d}"
        if body in seen:
            continue
        seen.add(body)
        out.append(body + ean.calc_check_digit(body))
    return ("\n".join(out) + "\n").encode()


def emulator_stats(host: str) -> dict:
    with urllib.request.urlopen(f"http://{host}/_emulator/stats", timeout=10) as resp:
        return json.loads(resp.read())


def queue_task_count(host: str, queue_path: str) -> int:
    stats = emulator_stats(host)
    queues = stats.get("queues", stats)
    q = queues.get(queue_path) or queues.get(queue_path.rsplit("/", 1)[-1]) or {}
    return int(q.get("tasks", 0))


def stack_cpu_s() -> dict[str, float]:
    """CPU seconds (user + system) each stack component's processes have used so far, children
    included, plus this bench process ("bench", the baseline's client): the difference over a phase
    says where that phase's CPU went on a machine whose cores everything shares."""
    import psutil

    from devstack import procs

    out = {"bench": sum(psutil.Process().cpu_times()[:2])}
    for name, info in procs.read_pids().items():
        proc = procs._same_process(info["pid"], info.get("create_time", 0.0))
        if proc is None:
            continue
        total = 0.0
        for p in [proc, *proc.children(recursive=True)]:
            try:
                total += sum(p.cpu_times()[:2])
            except psutil.Error:
                continue
        out[name] = total
    return out


def cpu_spent(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    spent = {k: round(after[k] - before.get(k, 0.0), 2) for k in after}
    return {k: v for k, v in sorted(spent.items(), key=lambda kv: -kv[1]) if v >= 0.05}


def baseline_create_loop(n: int, threads: int, queue_path: str) -> float:
    """Bare concurrent CreateTask loop with the official client: the ceiling for fan-out."""
    from shared.tasks import ITEM_TASK, TaskSpec, create_task

    specs = [TaskSpec(task_id=f"base-{os.getpid()}-{i}", kind=ITEM_TASK, url="http://127.0.0.1:9/none",
                      payload={"job_id": "baseline", "gtin": f"{i:014d}", "upc": "x", "line": i, "round": 1})
             for i in range(n)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        created = sum(pool.map(lambda s: create_task(queue_path, s), specs))
    elapsed = time.perf_counter() - t0
    assert created == n, f"baseline created {created} of {n}"
    return elapsed


def raw_create_rate(n: int, threads: int, queue_path: str) -> tuple[int, float]:
    """(creates, seconds) of raw REST creates on the stack's emulator, with the caller's local token:
    the emulator's own create rate with next to no client cost (bench/cloudtasks_bench.py's raw phase)."""
    from bench.cloudtasks_bench import _raw_batch, _run_pool

    host = os.environ["CLOUD_TASKS_EMULATOR_HOST"]
    done, wall, _cpu = _run_pool(_raw_batch, host, queue_path, "http://127.0.0.1:9/none", n, threads, "threads",
                                 time.time() + 300)
    if done != n:
        raise SystemExit(f"raw creates: {done} of {n}")
    return done, wall


def fanout_through_stack(n: int, deadline_s: float, created: list[str]) -> tuple[float, str]:
    """Upload → finalize event → ingest → chunk tasks → item tasks, timed until all N exist; the job's
    id is added to `created`."""
    from google.cloud import tasks_v2

    from shared.clients import firestore_client, storage_client, tasks_client
    from shared.config import settings
    from shared.naming import job_id_for

    s = settings()
    host = os.environ["CLOUD_TASKS_EMULATOR_HOST"]
    item_queue = s.item_queue_path()
    tasks_client().pause_queue(name=item_queue)  # keep tasks in the queue so they can be counted
    try:
        before = queue_task_count(host, item_queue)
        data = make_upcs(n, seed=int(time.time()))
        blob = storage_client().bucket(os.environ["UPCFAN_BUCKET"]).blob(f"bench/ingest-{n}-{time.time_ns()}.txt")
        t0 = time.perf_counter()
        blob.upload_from_string(data, content_type="text/plain")
        job_id = job_id_for(blob.bucket.name, blob.name, blob.generation)
        created.append(job_id)
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            if queue_task_count(host, item_queue) - before >= n:
                break
            time.sleep(0.5)  # polling interval of a measurement loop; the stats call itself costs the emulator
        else:
            raise SystemExit(f"fan-out of {n} did not finish in {deadline_s}s")
        elapsed = time.perf_counter() - t0
        job = firestore_client().collection("jobs").document(job_id).get().to_dict() or {}
        return elapsed, f"{job_id} totals={job.get('totals')}"
    finally:
        tasks_client().purge_queue(name=item_queue)
        tasks_client().resume_queue(name=item_queue)
        _ = tasks_v2


def rss_child(name: str) -> None:
    """Run plan + all chunks of an uploaded object in this process for a cancelled job; print peak RSS
    in KiB. The parent generated and uploaded the file, so its size never touches this process."""
    load_stack_env()
    from shared import ingest
    from shared.clients import firestore_client
    from shared.config import settings
    from shared.gcs import GcsObject
    from shared.model import JOBS
    from shared.naming import job_id_for

    obj = GcsObject.stat(os.environ["UPCFAN_BUCKET"] + "-bench", name)
    plan = ingest.plan_file(obj, settings().chunk_bytes, 5_000_000)
    job_id = job_id_for(obj.bucket, name, obj.generation)
    firestore_client().collection(JOBS).document(job_id).set(
        {"job_id": job_id, "status": "cancelled", "plan": {"format": plan.format.to_dict()},
         # chunks read the object their job names (issue 14's trust boundary), not their payload's
         "bucket": obj.bucket, "object": name, "generation": str(obj.generation)})

    # Classification only: since issue 15 even a cancelled job's chunk writes one item per UPC, and the
    # enqueue path (an item create and a task per UPC) is what the fan-out run measures; its memory is
    # bounded by the chunk size. Here it only counts.
    def count_only(store, chunk, candidates, result, on_task, *, cancelled, lane):
        result.items += len(candidates)
        return []

    ingest._enqueue_items = count_only
    for c in plan.chunks:
        ingest.process_chunk({"job_id": job_id, "bucket": obj.bucket, "object": name,
                              "generation": str(obj.generation), "start": c.start, "end": c.end,
                              "first_line": c.first_line, "index": c.index})
    print(json.dumps({"lines": plan.raw_lines, "chunks": len(plan.chunks), "maxrss_kib": peak_rss_kib(),
                      "job_id": job_id}))


def peak_rss_kib() -> int:
    """This process's own peak RSS (VmHWM). Not getrusage's ru_maxrss: Linux carries that across
    fork and exec, so a child of a big parent reports the parent's peak (which once made this
    bench report 277 vs 116 MiB for what are really 70 MiB processes)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def measure_rss(lines: int) -> dict:
    from shared.clients import storage_client

    name = f"bench/rss-{lines}-{time.time_ns()}.txt"
    storage_client().bucket(os.environ["UPCFAN_BUCKET"] + "-bench").blob(name).upload_from_string(
        make_upcs(lines, seed=lines))
    out = subprocess.run([sys.executable, __file__, "--rss-child", name], capture_output=True, text=True,
                         timeout=900, env={**os.environ, "UPCFAN_LOG_LEVEL": "WARNING"})
    if out.returncode != 0:
        raise SystemExit(f"rss child failed: {out.stderr[-2000:]}")
    return json.loads([ln for ln in out.stdout.splitlines() if ln.startswith("{\"lines\"")][-1])


def _num(value: float, digits: int) -> float | None:
    """JSON has no NaN: a skipped measurement is null."""
    return None if math.isnan(value) else round(value, digits)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--upcs", type=int, default=100_000)
    ap.add_argument("--threads", type=int, default=32)
    ap.add_argument("--rss-small", type=int, default=10_000)
    ap.add_argument("--rss-large", type=int, default=1_000_000)
    ap.add_argument("--rss-child", default="")
    ap.add_argument("--raw-tasks", type=int, default=20_000, help="raw REST creates: the emulator's own rate")
    ap.add_argument("--rss-only", action="store_true", help="skip the fan-out measurement")
    ap.add_argument("--quick", action="store_true",
                    help="a few seconds at tiny sizes: proves the bench runs and reports; no figure means anything")
    args = ap.parse_args()
    if args.quick:
        args.upcs, args.threads, args.rss_small, args.rss_large, args.raw_tasks = 200, 8, 1_000, 5_000, 200
    if args.rss_child:
        return rss_child(args.rss_child)

    load_stack_env()
    from google.cloud import tasks_v2

    from shared.clients import storage_client, tasks_client
    from shared.config import settings

    s = settings()
    parent = f"projects/{s.project}/locations/{s.location}"
    base_queue = f"{parent}/queues/bench-baseline-{os.getpid()}"
    tasks_client().create_queue(parent=parent, queue=tasks_v2.Queue(name=base_queue))
    tasks_client().pause_queue(name=base_queue)
    try:
        storage_client().create_bucket(os.environ["UPCFAN_BUCKET"] + "-bench")
    except Exception:  # noqa: BLE001 - exists from an earlier run
        pass

    created: list[str] = []  # the jobs this run stored, deleted at the end
    try:
        _measure_and_report(args, base_queue, created)
    finally:
        tasks_client().delete_queue(name=base_queue)
        deleted = delete_jobs(created)
        print(f"tidied: {len(created)} jobs, {deleted:,} documents deleted", flush=True)


def _measure_and_report(args, base_queue: str, created: list[str]) -> None:
    from shared.clients import tasks_client

    if args.rss_only:
        base_s = fan_s = float("nan")
        base_cpu, fan_cpu = {}, {}
        raw_n, raw_s = 0, float("nan")
        detail = "fan-out skipped (--rss-only)"
    else:
        cpu0 = stack_cpu_s()
        base_s = baseline_create_loop(args.upcs, args.threads, base_queue)
        cpu1 = stack_cpu_s()
        fan_s, detail = fanout_through_stack(args.upcs, deadline_s=600, created=created)
        cpu2 = stack_cpu_s()
        base_cpu, fan_cpu = cpu_spent(cpu0, cpu1), cpu_spent(cpu1, cpu2)
        tasks_client().purge_queue(name=base_queue)
        raw_n, raw_s = raw_create_rate(args.raw_tasks, 4, base_queue)
    small = measure_rss(args.rss_small)
    created.append(small["job_id"])
    large = measure_rss(args.rss_large)
    created.append(large["job_id"])

    ratio = base_s / fan_s
    raw_rate = raw_n / raw_s if raw_n else float("nan")
    raw_ratio = (args.upcs / fan_s) / raw_rate if raw_n else float("nan")
    rss_ratio = large["maxrss_kib"] / small["maxrss_kib"]
    rows = [
        ("bare CreateTask loop", f"{args.upcs:,} tasks", f"{base_s:.1f} s", f"{args.upcs / base_s:,.0f}/s"),
        ("ingest fan-out (upload→all tasks)", f"{args.upcs:,} tasks", f"{fan_s:.1f} s", f"{args.upcs / fan_s:,.0f}/s"),
        ("ratio (goal ≥ 0.9)", "", f"{ratio:.2f}", ""),
        ("raw REST creates (emulator's own rate)", f"{raw_n:,} tasks", f"{raw_s:.1f} s", f"{raw_rate:,.0f}/s"),
        ("fan-out rate / raw rate (goal ≥ 0.5)", "", f"{raw_ratio:.2f}", ""),
        (f"ingest peak RSS {args.rss_small:,} lines", f"{small['chunks']} chunks", f"{small['maxrss_kib'] / 1024:.0f} MiB", ""),
        (f"ingest peak RSS {args.rss_large:,} lines", f"{large['chunks']} chunks", f"{large['maxrss_kib'] / 1024:.0f} MiB", ""),
        ("RSS ratio (goal ≤ 1.2)", "", f"{rss_ratio:.2f}", ""),
    ]
    for r in rows:
        print(f"{r[0]:<40} {r[1]:>16} {r[2]:>10} {r[3]:>10}")
    print(f"job: {detail}")
    ncpu = os.cpu_count() or 1
    for label, spent, wall in (("bare loop", base_cpu, base_s), ("fan-out", fan_cpu, fan_s)):
        if spent:
            total = sum(spent.values())
            print(f"CPU of {label}: {total:.1f} s over {wall:.1f} s wall on {ncpu} CPUs "
                  f"({1000 * total / args.upcs:.2f} ms per task): {spent}")
    # On a machine whose cores the whole stack shares, a phase cannot finish faster than its CPU
    # seconds / cores: the bare loop over the fan-out CPU is the ratio that CPU alone allows.
    cpu_bound_ratio = (sum(base_cpu.values()) / sum(fan_cpu.values())) if base_cpu and fan_cpu else None
    if cpu_bound_ratio:
        print(f"CPU ratio (bare loop CPU / fan-out CPU): {cpu_bound_ratio:.2f}")
    print("BENCH_RESULT " + json.dumps({
        "bench": "ingest", "upcs": args.upcs, "baseline_s": _num(base_s, 2), "fanout_s": _num(fan_s, 2),
        "ratio": _num(ratio, 3), "goal_ratio": 0.9, "raw_creates": raw_n, "raw_s": _num(raw_s, 2),
        "raw_ratio": _num(raw_ratio, 3), "goal_raw_ratio": 0.5, "rss_small_kib": small["maxrss_kib"],
        "rss_large_kib": large["maxrss_kib"], "rss_ratio": round(rss_ratio, 3), "goal_rss_ratio": 1.2,
        "cpu_s": {"baseline": base_cpu, "fanout": fan_cpu},
        "cpu_ratio": _num(cpu_bound_ratio, 3) if cpu_bound_ratio else None, "load": os.getloadavg()[0]}))


if __name__ == "__main__":
    main()
