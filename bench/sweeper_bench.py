"""Sweeper cost on the Firestore emulator: 10k jobs (100 stalled) seeded, then timed sweeps and billed reads.

Usage: python bench/sweeper_bench.py [--jobs 10000] [--stalled 100]
Uses FIRESTORE_EMULATOR_HOST if set, else starts the emulator JAR on a free 127.0.0.1 port
(and stops it at the end). Each run seeds a fresh `demo-sweepbench-<uuid>` project. Slack posts
go to an in-process sink on 127.0.0.1. Prints a table and one JSON line.
Goals (issue 17): the first sweep within 1.5x the same-run cost of its own queries, counts, writes
and posts done bare (the "bare sweep": the same I/O with no rules, planning or outbox, on a second
project seeded identically), and documents read <= 3 x stalled jobs.

Besides the sweeps it times each scan query alone (and a few other formulations of the stall
query, and `jobs.limit(1)` as the emulator's floor for any query on a 10k-document collection):
the emulator has no composite indexes and walks the collection, so its query times say how it
scans, not what the index-served production query costs. The 1-minute load average is printed
before and after: other processes on the machine change the times a lot; run it twice.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.helpers import QUICK_HELP, interrupt_on_sigterm, start_group, stop_group, wipe_emulator_project  # noqa: E402
from shared.naming import lease_shard_for  # noqa: E402

NOW = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.timezone.utc)
MIN = dt.timedelta(minutes=1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_emulator() -> subprocess.Popen | None:
    if os.environ.get("FIRESTORE_EMULATOR_HOST"):
        return None
    root = subprocess.run(["gcloud", "info", "--format=value(installation.sdk_root)"], capture_output=True,
                          text=True, timeout=60).stdout.strip() or "/usr/lib/google-cloud-sdk"
    jar = Path(root) / "platform" / "cloud-firestore-emulator" / "cloud-firestore-emulator.jar"
    port = _free_port()
    proc = start_group([shutil.which("java") or "java", "-cp", str(jar),
                             "com.google.cloud.datastore.emulator.firestore.CloudFirestore",
                             "--host=127.0.0.1", f"--port={port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 150  # a JVM start on a loaded 2-core machine took over a minute
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1):
                break
        except OSError:
            if proc.poll() is not None:
                raise SystemExit("Firestore emulator exited")
            time.sleep(0.1)  # readiness poll, bounded by the deadline
    else:
        stop_group(proc)
        raise SystemExit("Firestore emulator not ready in 150 s")
    os.environ["FIRESTORE_EMULATOR_HOST"] = f"127.0.0.1:{port}"
    return proc


class Sink:
    def __init__(self):
        self.posts = 0
        sink = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                sink.posts += 1
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def seed(db, n_jobs: int, n_stalled: int, items_per_stalled: int) -> float:
    """Batched writes (≤ 500 per batch, several batches in flight). Returns seconds spent."""
    started = time.monotonic()
    stalled_every = max(1, n_jobs // max(1, n_stalled))
    docs: list[tuple[str, dict]] = []
    stalled_ids = []
    for i in range(n_jobs):
        job_id = f"bench-{i:06d}"
        is_stalled = i % stalled_every == 0 and len(stalled_ids) < n_stalled
        if is_stalled:
            stalled_ids.append(job_id)
            status, last = "running", NOW - 25 * MIN
        elif i % 3 == 0:
            status, last = "running", NOW - 2 * MIN
        else:
            status, last = ("completed" if i % 3 == 1 else "completed_with_failures"), NOW - 600 * MIN
        running = status == "running"
        # As ingest writes jobs now: items born `queued` at fan-out (`item_birth`), so a running job's
        # counts hold its queued items and the sweeper's never-claimed answer needs one count.
        docs.append((f"jobs/{job_id}", {
            "job_id": job_id, "gcs_path": f"gs://bench/{job_id}.txt", "status": status,
            "created_at": NOW - 700 * MIN, "updated_at": last, "fanout_done_at": NOW - 690 * MIN,
            "last_progress_at": last, "totals": {"lines": 10, "items": 10},
            "counts": {"queued": 5 if running else 0, "processing": 0, "succeeded": 5 if running else 10,
                       "failed": 0, "cancelled": 0}, "round": 1, "stall": None, "chunks_total": 1,
            "item_birth": "fanout",
        }))
    for job_id in stalled_ids:
        for k in range(items_per_stalled):
            docs.append((f"jobs/{job_id}/items/{k:014d}", {"job_id": job_id, "gtin": f"{k:014d}", "attempt": 0,
                                                             "status": "queued", "lease_expires_at": None,
                                                             "lease_shard": lease_shard_for(f"{k:014d}")}))

    def write(chunk):
        batch = db.batch()
        for path, data in chunk:
            batch.set(db.document(path), data)
        batch.commit()

    chunks = [docs[i:i + 500] for i in range(0, len(docs), 500)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(write, chunks))
    return time.monotonic() - started


def warm_up(db, cfg, at) -> None:
    """Streams every scan query once (reads only), so neither the sweep nor the bare sweep pays the
    emulator's first-touch costs alone."""
    from shared.sweeper.engine import scan_queries
    from shared.sweeper.store import FirestoreSweepStore

    store = FirestoreSweepStore(db)
    for q in scan_queries().values():
        list(store.firestore_query(q, at, cfg).stream())


def bare_sweep(db, cfg, at, url: str, posts: int, deferred: int) -> dict:
    """The first sweep's I/O with nothing around it: its scan queries (concurrently, as the sweep runs
    them), one never-claimed count per stalled job (16 at a time), four writes per flagged job in
    <= 500-op batches (flag, job event, stall event, alert state) and the systemic record, the
    systemic count and reads, `posts` Slack posts, and the notify outcomes in one batch. Returns ms."""
    from google.cloud.firestore_v1.base_query import FieldFilter

    from shared import alerts
    from shared.sweeper.engine import scan_queries
    from shared.sweeper.store import FirestoreSweepStore

    store = FirestoreSweepStore(db)
    started = time.monotonic()
    queries = {name: store.firestore_query(q, at, cfg) for name, q in scan_queries().items()}
    with ThreadPoolExecutor(max_workers=len(queries)) as pool:
        res = dict(zip(queries, pool.map(lambda q: list(q.stream()), queries.values())))
    stalled = [d.id for d in res["running"]]

    def count(job_id):
        q = (db.collection(f"jobs/{job_id}/items").where(filter=FieldFilter("status", "==", "queued"))
             .where(filter=FieldFilter("attempt", "==", 0)))
        return q.count().get()[0][0].value

    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(count, stalled))
    event_ids = []
    writes = []
    for job_id in stalled:
        event_id = uuid.uuid4().hex[:20]
        event_ids.append(event_id)
        writes += [("update", f"jobs/{job_id}", {"stall": {"kind": "no_progress", "flagged_at": at}}),
                   ("set", f"jobs/{job_id}/events/{uuid.uuid4().hex[:20]}", {"type": "stall_flagged", "at": at}),
                   ("set", f"stall_events/{event_id}", {"job_id": job_id, "detected_at": at,
                                                         "notify_state": "pending", "message_json": "{}"}),
                   ("set", f"alert_state/{job_id}", {"job_id": job_id, "episode_at": at, "updated_at": at})]

    def commit(chunk):
        batch = db.batch()
        for op, path, data in chunk:
            getattr(batch, op)(db.document(path), data, **({"merge": True} if path.startswith("alert_state") else {}))
        batch.commit()

    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(commit, [writes[i:i + 500] for i in range(0, len(writes), 500)]))
    # systemic: count the episodes, read its state, list ten, record it
    episodes = db.collection("alert_state").where(filter=FieldFilter("episode_at", ">=", at - 60 * MIN))
    episodes.count().get()
    db.document("alert_state/systemic").get()
    list(episodes.limit(10).stream())
    commit([("set", f"stall_events/{uuid.uuid4().hex[:20]}", {"job_id": "systemic", "detected_at": at}),
            ("set", "alert_state/systemic", {"updated_at": at, "last_alert_at": at})])
    message = alerts.SlackMessage(text="bare sweep post", blocks=[])
    for _ in range(posts):
        alerts.post_message(message, webhook_url=url)
    outcomes = event_ids[:posts + deferred]
    for i in range(0, len(outcomes), 500):
        commit([("update", f"stall_events/{e}", {"notify_state": "sent", "notified": True})
                for e in outcomes[i:i + 500]])
    return {"ms": round((time.monotonic() - started) * 1000, 1), "stalled_found": len(stalled)}


def time_queries(db, cfg, at, reps: int = 3) -> dict:
    """Each query alone, sequentially: (min ms, median ms, documents)."""
    import statistics

    from google.cloud.firestore_v1.base_query import FieldFilter

    from shared.sweeper.engine import scan_queries
    from shared.sweeper.store import FirestoreSweepStore

    store = FirestoreSweepStore(db)
    queries = {name: store.firestore_query(q, at, cfg) for name, q in scan_queries().items()}
    jobs = db.collection("jobs")
    cutoff = at - dt.timedelta(minutes=min(cfg.stall_minutes, cfg.queued_stall_minutes))
    running = jobs.where(filter=FieldFilter("status", "==", "running"))
    queries["alt: running order_by+limit"] = (running.where(filter=FieldFilter("last_progress_at", "<", cutoff))
                                              .order_by("last_progress_at").limit(1000))
    queries["alt: running end_before cursor"] = (running.order_by("last_progress_at")
                                                 .end_before({"last_progress_at": cutoff}).limit(1000))
    queries["floor: jobs.limit(1)"] = jobs.limit(1)
    out = {}
    for name, q in queries.items():
        times, n = [], 0
        for _ in range(reps):
            t = time.monotonic()
            n = len(list(q.stream()))
            times.append((time.monotonic() - t) * 1000)
        out[name] = {"min_ms": round(min(times), 1), "median_ms": round(statistics.median(times), 1), "docs": n}
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=10_000)
    ap.add_argument("--stalled", type=int, default=100)
    ap.add_argument("--items-per-stalled", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help=QUICK_HELP)
    args = ap.parse_args()
    if args.quick:
        args.jobs, args.stalled = 60, 5
    interrupt_on_sigterm()
    proc = start_emulator()
    projects: list[str] = []  # seeded by this run, dropped at the end from a shared emulator
    try:
        from google.cloud import firestore

        from shared import sweeper
        from shared.config import load_settings

        run_id = uuid.uuid4().hex[:8]
        project = f"demo-sweepbench-{run_id}"
        projects[:] = [project, f"demo-sweepbare-{run_id}"]
        db = firestore.Client(project=project)
        bare_db = firestore.Client(project=projects[1])  # the same data, for the bare sweep
        cfg = load_settings().replace(project=project, stall_minutes=15, stall_critical_minutes=60,
                                  queued_stall_minutes=30, alert_cooldown_minutes=60, systemic_threshold=3)
        sink = Sink()
        seed_s = seed(db, args.jobs, args.stalled, args.items_per_stalled)
        seed(bare_db, args.jobs, args.stalled, args.items_per_stalled)
        warm_up(db, cfg, NOW)
        warm_up(bare_db, cfg, NOW)
        load_before = os.getloadavg()[0]
        rows = []
        for label, at in (("first sweep (all new)", NOW), ("steady (in cooldown)", NOW + 2 * MIN)):
            r = sweeper.run_sweep(now=at, settings=cfg, db=db, webhook_url=sink.url)
            rows.append({"sweep": label, "ms": r.ms, "documents_read": r.documents_read, "checked": r.checked,
                         "flagged": r.flagged, "alerted": r.alerted, "suppressed": r.suppressed,
                         "deferred": r.notify_failed, "systemic": r.systemic, "phases_ms": r.phases_ms,
                         "queries_ms": r.queries_ms})
        first = rows[0]
        bare = bare_sweep(bare_db, cfg, NOW, sink.url, first["alerted"], first["deferred"])
        first["bare_ms"] = bare["ms"]
        first["vs_bare"] = round(first["ms"] / bare["ms"], 2)
        alone = time_queries(db, cfg, NOW + 2 * MIN)
        load_after = os.getloadavg()[0]
        budget = 3 * args.stalled
        print(f"seeded {args.jobs} jobs ({args.stalled} stalled) in {seed_s:.1f} s; read budget {budget}; "
              f"load average {load_before:.1f} before, {load_after:.1f} after ({os.cpu_count()} CPUs)")
        print(f"{'sweep':24} {'ms':>8} {'reads':>6} {'checked':>7} {'flagged':>7} {'alerted':>7} "
              f"{'suppr':>5} {'defer':>5} systemic  goal")
        print(f"bare sweep (the first sweep's queries, counts, writes and posts alone): {bare['ms']:.0f} ms; "
              f"first sweep / bare = {first['vs_bare']:.2f} (goal <= 1.5)")
        for row in rows:
            ok = row["documents_read"] <= budget and row.get("vs_bare", 0) <= 1.5
            print(f"{row['sweep']:24} {row['ms']:8.0f} {row['documents_read']:6d} {row['checked']:7d} "
                  f"{row['flagged']:7d} {row['alerted']:7d} {row['suppressed']:5d} {row['deferred']:5d} "
                  f"{str(row['systemic']):8}  {'ok' if ok else 'MISSED'}")
            print(f"    phases ms {row['phases_ms']}")
            print(f"    scan queries ms (concurrent) {row['queries_ms']}")
        print("each query alone (ms: min / median of 3, documents):")
        for name, q in alone.items():
            print(f"    {name:32} {q['min_ms']:8.1f} {q['median_ms']:8.1f} {q['docs']:6d}")
        floor = alone["floor: jobs.limit(1)"]["min_ms"]
        print(f"note: on the emulator any query on the {args.jobs}-document jobs collection costs >= {floor:.0f} ms "
              f"(limit(1) above): it walks the collection. In production the stall queries are served by the "
              f"(status, last_progress_at) / (status, created_at) / single-field indexes; these emulator times "
              f"are not a production estimate.")
        print(json.dumps({"bench": "sweeper", "jobs": args.jobs, "stalled": args.stalled, "seed_s": round(seed_s, 1),
                          "bare_ms": bare["ms"], "first_vs_bare": first["vs_bare"],
                          "read_budget": budget, "load_before": round(load_before, 2),
                          "load_after": round(load_after, 2), "queries_alone_ms": alone, "sweeps": rows}))
        sink.server.shutdown()
        return 0
    finally:
        if proc is not None:
            stop_group(proc)
        else:
            for name in projects:
                wipe_emulator_project(os.environ["FIRESTORE_EMULATOR_HOST"], name)


if __name__ == "__main__":
    raise SystemExit(main())
