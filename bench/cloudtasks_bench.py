"""Benchmark the local Cloud Tasks emulator (127.0.0.1 only, bounded to well under 2 minutes).

Phases:
1. official-client creates: N named tasks into a *paused* queue with the official client (REST
   transport) from a thread pool (default) or a process pool -> creates/s;
2. raw-HTTP creates: the same REST call over pooled http.client connections (no proto-plus /
   requests overhead), to separate client overhead from emulator cost;
3. dispatch: resume the queue and time delivery of all tasks to a trivial local HTTP target
   (aiohttp, in a separate process) -> dispatches/s, limited by the queue's rate (default 500/s).

Usage: python bench/cloudtasks_bench.py [--tasks 20000] [--workers 8] [--mode threads|processes]
       [--rate 500] [--raw-tasks 5000] [--host 127.0.0.1:PORT (else one is started)]
The last stdout line is a JSON object with the results.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import http.client
import json
import multiprocessing as mp
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from devstack.cloudtasks import client as emu  # noqa: E402
from devstack.procs import stop_process  # noqa: E402

PARENT = "projects/demo-bench/locations/us-central1"
HARD_LIMIT_S = 110.0


def _target_main(port_q) -> None:
    import asyncio

    from aiohttp import web

    async def ok(_request):
        return web.Response(text="ok")

    async def run():
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", ok)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=2048)
        await site.start()
        port_q.put(site._server.sockets[0].getsockname()[1])
        await asyncio.Event().wait()

    asyncio.run(run())


def _start_emulator() -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "devstack.cloudtasks", "--host", "127.0.0.1", "--port", "0", "--log-level", "WARNING"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    line = proc.stdout.readline()
    if "READY" not in line:
        proc.kill()
        raise RuntimeError(f"emulator failed to start: {line!r}")
    threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
    return proc, line.split()[1].replace("http://", "")


_local = threading.local()


def _create_batch(args) -> int:
    """Worker (thread or process): create tasks [start, stop) with the official client."""
    host, queue, url, start, stop, deadline = args
    from google.cloud import tasks_v2

    from shared.clients import make_tasks_client

    client = getattr(_local, "client", None)
    if client is None:
        client = _local.client = make_tasks_client(host)
    n = 0
    for i in range(start, stop):
        if time.time() > deadline:
            break
        client.create_task(parent=queue, task=tasks_v2.Task(
            name=f"{queue}/tasks/{i:04x}-bench-{i}",
            http_request=tasks_v2.HttpRequest(url=url, body=b'{"i": %d}' % i)))
        n += 1
    return n


def _raw_batch(args) -> int:
    host, queue, url, start, stop, deadline = args
    h, p = host.split(":")
    conn = http.client.HTTPConnection(h, int(p), timeout=10)
    path = f"/v2/{queue}/tasks?%24alt=json%3Benum-encoding%3Dint"
    n = 0
    for i in range(start, stop):
        if time.time() > deadline:
            break
        body = json.dumps({"task": {"name": f"{queue}/tasks/{i:04x}-raw-{i}",
                                    "httpRequest": {"url": url, "httpMethod": 1, "body": "eyJpIjogMX0="}}})
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        if resp.status != 200:
            raise RuntimeError(f"raw create failed: {resp.status}")
        n += 1
    conn.close()
    return n


def _run_pool(fn, host, queue, url, total, workers, mode, deadline) -> tuple[int, float]:
    chunk = (total + workers - 1) // workers
    jobs = [(host, queue, url, s, min(s + chunk, total), deadline) for s in range(0, total, chunk)]
    ex_cls = cf.ProcessPoolExecutor if mode == "processes" else cf.ThreadPoolExecutor
    kwargs = {"mp_context": mp.get_context("spawn")} if mode == "processes" else {}
    t0 = time.perf_counter()
    with ex_cls(max_workers=workers, **kwargs) as ex:
        done = sum(ex.map(fn, jobs))
    return done, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=20_000)
    ap.add_argument("--raw-tasks", type=int, default=5_000)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--mode", choices=["threads", "processes"], default="threads")
    ap.add_argument("--rate", type=float, default=500.0)
    ap.add_argument("--concurrency", type=int, default=1000)
    ap.add_argument("--client-seconds", type=float, default=25.0,
                    help="time budget of the official-client phase; raw HTTP creates the rest")
    ap.add_argument("--host", default="")
    args = ap.parse_args()
    started = time.time()
    client_deadline = started + args.client_seconds

    proc = None
    host = args.host
    if not host:
        proc, host = _start_emulator()
    emu.wait_ready(host, 10)
    port_q: mp.Queue = mp.get_context("spawn").Queue()
    tproc = mp.get_context("spawn").Process(target=_target_main, args=(port_q,), daemon=True)
    tproc.start()
    url = f"http://127.0.0.1:{port_q.get(timeout=15)}/task"

    from google.cloud import tasks_v2

    from shared.clients import make_tasks_client

    client = make_tasks_client(host)
    qid = f"bench-{uuid.uuid4().hex[:8]}"
    queue = f"{PARENT}/queues/{qid}"
    client.create_queue(parent=PARENT, queue=tasks_v2.Queue(
        name=queue, rate_limits=tasks_v2.RateLimits(max_dispatches_per_second=args.rate,
                                                    max_concurrent_dispatches=args.concurrency)))
    client.pause_queue(name=queue)
    result: dict = {"tasks": args.tasks, "workers": args.workers, "mode": args.mode, "rate_limit": args.rate,
                    "cpus": os.cpu_count()}
    try:
        n, dt = _run_pool(_create_batch, host, queue, url, args.tasks, args.workers, args.mode, client_deadline)
        result.update(client_creates=n, client_create_s=round(dt, 3), client_creates_per_s=round(n / dt, 1))
        print(f"official client: {n} creates in {dt:.2f}s = {n / dt:,.0f}/s ({args.mode} x{args.workers})", flush=True)

        # Raw HTTP creates the rest of the tasks into the same queue (ids that cannot collide).
        raw_n = max(args.tasks - n, 0)
        raw_deadline = time.time() + 45
        rn, rdt = _run_pool(_raw_batch, host, queue, url, raw_n, args.workers, "threads", raw_deadline) \
            if raw_n else (0, 1e-9)
        result.update(raw_creates=rn, raw_create_s=round(rdt, 3), raw_creates_per_s=round(rn / rdt, 1) if rn else None)
        print(f"raw HTTP:        {rn} creates in {rdt:.2f}s = {rn / rdt:,.0f}/s (threads x{args.workers})", flush=True)
        n += rn

        t0 = time.perf_counter()
        client.resume_queue(name=queue)
        dispatch_deadline = time.monotonic() + max(10.0, started + HARD_LIMIT_S - time.time())
        succeeded = 0
        while time.monotonic() < dispatch_deadline:
            succeeded = emu.queue_stats(host, qid).get("succeeded", 0)
            if succeeded >= n:
                break
            time.sleep(0.05)
        ddt = time.perf_counter() - t0
        st = emu.queue_stats(host, qid)
        result.update(dispatched=st.get("dispatched"), succeeded=succeeded, dispatch_s=round(ddt, 3),
                      dispatches_per_s=round(succeeded / ddt, 1), retried=st.get("retried"))
        print(f"dispatch:        {succeeded} delivered in {ddt:.2f}s = {succeeded / ddt:,.0f}/s "
              f"(queue rate {args.rate:g}/s)", flush=True)
        client.delete_queue(name=queue)
    finally:
        stop_process(tproc)
        if proc:
            stop_process(proc)
    result["total_s"] = round(time.time() - started, 2)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
