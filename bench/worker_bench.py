"""Worker overhead bench: bare claim+complete transactions vs `process_item_delivery`, same emulator.

(a) baseline: per item one create-if-absent claim transaction and one complete transaction,
    nothing else, from N threads;
(b) the worker core: `process_item_delivery` with a no-op handler (job cache, pydantic payload,
    lease + history, heartbeat thread, JSON logs to /dev/null) over the same number of items.
Prints a table and one JSON line; the goal is ratio = b/a >= 0.7 (issue 17). Bounded: each phase stops at
--max-phase-s. Run: .venv/bin/python bench/worker_bench.py [--items 10000] [--threads 16]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.helpers import QUICK_HELP, interrupt_on_sigterm, start_group, stop_group, wipe_emulator_project  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_emulator() -> tuple[subprocess.Popen, str]:
    sdk = subprocess.run(["gcloud", "info", "--format=value(installation.sdk_root)"], capture_output=True, text=True).stdout.strip()
    jar = Path(sdk or "/usr/lib/google-cloud-sdk") / "platform" / "cloud-firestore-emulator" / "cloud-firestore-emulator.jar"
    java = shutil.which("java")
    if not jar.exists() or not java:
        raise SystemExit("Firestore emulator JAR or java not found")
    port = _free_port()
    proc = start_group(
        [java, "-cp", str(jar), "com.google.cloud.datastore.emulator.firestore.CloudFirestore", "--host=127.0.0.1", f"--port={port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    host = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://{host}/", timeout=1):
                return proc, host
        except OSError:
            time.sleep(0.2)
    stop_group(proc)
    raise SystemExit("Firestore emulator did not start")


def _gtin(n: int) -> str:
    body = f"{n:011d}"
    total = sum(int(d) * (3 if i % 2 == 0 else 1) for i, d in enumerate(body))
    return (body + str((10 - total % 10) % 10)).zfill(14)


def _run(items: int, threads: int, max_s: float, fn) -> tuple[int, float]:
    """Run fn(i) for i in range(items) on `threads` threads until done or `max_s`; (done, seconds)."""
    stop_at = time.monotonic() + max_s
    done = 0
    lock = threading.Lock()
    counter = iter(range(items))

    def loop():
        nonlocal done
        while time.monotonic() < stop_at:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            fn(i)
            with lock:
                done += 1

    started = time.monotonic()
    with ThreadPoolExecutor(threads) as pool:
        for f in [pool.submit(loop) for _ in range(threads)]:
            f.result()
    return done, time.monotonic() - started


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=10_000)
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--max-phase-s", type=float, default=60.0)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--quick", action="store_true", help=QUICK_HELP)
    args = ap.parse_args(argv)
    if args.quick:
        args.items, args.threads, args.warmup, args.max_phase_s = 40, 4, 5, 20.0
    interrupt_on_sigterm()

    # A running emulator is used when one is named (a test stack; its own project keeps it apart), as
    # sweeper_bench does; otherwise its own, so nothing else's load is measured.
    proc, host = (None, os.environ["FIRESTORE_EMULATOR_HOST"]) if os.environ.get("FIRESTORE_EMULATOR_HOST") \
        else _start_emulator()
    try:
        os.environ["FIRESTORE_EMULATOR_HOST"] = host
        os.environ["GOOGLE_CLOUD_PROJECT"] = f"demo-bench-{uuid.uuid4().hex[:6]}"
        os.environ.pop("UPCFAN_WORKER_URL", None)
        from google.cloud import firestore

        from shared import worker
        from shared.clients import firestore_client, reset_clients
        from shared.store import TXN_COUNTER
        from shared.store.firestore import FirestoreStore
        from shared.handlers import ItemContext, ItemHandler
        from shared.log import JsonFormatter

        reset_clients()
        # Realistic logging cost: JSON lines at INFO, written to /dev/null.
        sink = logging.StreamHandler(open(os.devnull, "w"))
        sink.setFormatter(JsonFormatter())
        root = logging.getLogger()
        root.handlers[:] = [sink]
        root.setLevel(logging.INFO)
        db = firestore_client()

        # (a) baseline
        base_job = f"bench-base-{uuid.uuid4().hex[:6]}"
        items_col = db.collection("jobs").document(base_job).collection("items")

        @firestore.transactional
        def bare_claim(tx, ref, owner):
            snap = ref.get(transaction=tx)
            if not snap.exists:
                tx.create(ref, {"status": "processing", "lease_owner": owner, "attempt": 1})

        @firestore.transactional
        def bare_complete(tx, ref, owner):
            snap = ref.get(transaction=tx)
            if snap.exists and snap.get("lease_owner") == owner:
                tx.update(ref, {"status": "succeeded", "result": {}})

        def bare(i):
            ref = items_col.document(_gtin(i))
            owner = f"o{i}"
            bare_claim(db.transaction(), ref, owner)
            bare_complete(db.transaction(), ref, owner)

        # Warm the emulator's JIT and the client's channels so neither phase pays for it.
        _run(args.warmup, args.threads, 30.0, lambda i: bare(args.items + i))
        base_done, base_s = _run(args.items, args.threads, args.max_phase_s, bare)

        # (b) worker core
        job_id = f"bench-core-{uuid.uuid4().hex[:6]}"
        db.collection("jobs").document(job_id).set(
            {"job_id": job_id, "status": "running", "options": {"test_mode": True}, "totals": {"items": args.items},
             "created_at": dt.datetime.now(dt.timezone.utc)}
        )

        class NoOp(ItemHandler):
            name = "noop"

            def handle(self, item: ItemContext) -> dict:
                return {}

        noop = NoOp()
        store = FirestoreStore(db)
        TXN_COUNTER.reset()
        statuses: dict[int, int] = {}
        slock = threading.Lock()

        def core(i):
            g = _gtin(i)
            out = worker.process_item_delivery(
                {"job_id": job_id, "gtin": g, "upc": g[2:], "line": i + 1, "round": 1},
                {"X-CloudTasks-TaskName": f"t{i}", "X-CloudTasks-TaskRetryCount": "0"},
                handler=noop,
                store=store,
            )
            with slock:
                statuses[out.http_status] = statuses.get(out.http_status, 0) + 1

        core_done, core_s = _run(args.items, args.threads, args.max_phase_s, core)
        txns = TXN_COUNTER.snapshot()
    finally:
        if proc is not None:
            stop_group(proc)
        else:  # a shared emulator: leave none of this run's documents in it
            wipe_emulator_project(host, os.environ["GOOGLE_CLOUD_PROJECT"])

    base_rate = base_done / base_s if base_s else 0.0
    core_rate = core_done / core_s if core_s else 0.0
    ratio = core_rate / base_rate if base_rate else 0.0
    rows = [
        ("bare claim+complete txns", base_done, base_s, base_rate),
        ("process_item_delivery (no-op handler)", core_done, core_s, core_rate),
    ]
    print(f"{'phase':<40} {'items':>7} {'seconds':>8} {'items/s':>9}")
    for name, n, s, r in rows:
        print(f"{name:<40} {n:>7} {s:>8.1f} {r:>9.1f}")
    print(f"ratio core/baseline = {ratio:.2f} (goal >= 0.7); threads={args.threads}; txns={txns}; http={statuses}")
    print(
        json.dumps(
            {
                "bench": "worker",
                "threads": args.threads,
                "items_requested": args.items,
                "baseline_items": base_done,
                "baseline_items_per_s": round(base_rate, 1),
                "core_items": core_done,
                "core_items_per_s": round(core_rate, 1),
                "ratio": round(ratio, 3),
                "transactions": txns,
                "transactions_per_item": round(sum(txns.values()) / core_done, 3) if core_done else None,
                "http_statuses": statuses,
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
