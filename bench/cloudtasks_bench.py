"""Benchmark the local Cloud Tasks emulator (127.0.0.1 only, bounded to well under 2 minutes).

Phases:
1. official-client creates: up to N named tasks into a *paused* queue with the official client from
   a thread pool (default) or a process pool, for --client-seconds each over both transports:
   REST, then gRPC (production's transport; the emulator's gRPC port) -> creates/s each;
2. raw-HTTP creates: --raw-tasks more with the same REST call over pooled http.client connections
   (no proto-plus / requests overhead), to separate client overhead from emulator cost;
   every create phase also reports the client's CPU per create (process CPU time of the bench and
   its pool, emulator excluded, / creates): what limits a fan-out on a small machine;
3. dispatch: resume the queue and time delivery of all tasks to a trivial local HTTP target
   (aiohttp, in a separate process) -> dispatches/s, limited by the queue's rate (default 500/s).

Every process it starts (emulator, target, process pool) runs in its own process group and is
stopped (with its group) before it returns: on success, on an error and on Ctrl-C / SIGTERM.

Which emulator: by default its own, open (`--iam-policy none`): the phases then measure the
emulator's create cost and the client's overhead, nothing else, and no other session's load on a
shared stack. With `--host` (e.g. the stack's emulator, which enforces IAM) both phases send the
caller's local token (UPCFAN_OPERATOR_TOKEN / UPCFAN_LOCAL_ACCESS_TOKEN, as the official client
does through shared.clients.local_credentials) and the queue goes in GOOGLE_CLOUD_PROJECT, so the
raw figure is the create rate a fan-out on that stack can reach, token check included; its gRPC
phase needs `--grpc-host` (else it is skipped). `--quick` uses CLOUD_TASKS_EMULATOR_HOST and
CLOUD_TASKS_EMULATOR_GRPC_HOST when they are set (a test stack), so that path is exercised as well.

Usage: python bench/cloudtasks_bench.py [--tasks 20000] [--workers 4] [--mode threads|processes]
       [--rate 500] [--raw-tasks 5000] [--host 127.0.0.1:PORT --grpc-host 127.0.0.1:PORT
       (else one is started)] [--quick]
The last stdout line is a JSON object with the results.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import http.client
import json
import multiprocessing as mp
import os
import resource
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from devstack.cloudtasks import client as emu  # noqa: E402
from bench.helpers import QUICK_HELP, interrupt_on_sigterm, start_group, stop_group  # noqa: E402
from shared.clients import LOCAL_IDENTITY_VARS  # noqa: E402

PARENT = "projects/demo-bench/locations/us-central1"
HARD_LIMIT_S = 110.0
RAW_PHASE_S = 45.0
TARGET_READY = "BENCH_TARGET_READY"


def serve_target() -> None:
    """The dispatch target (`--serve-target`): answers 200 to anything; prints its ready line."""
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
        print(f"{TARGET_READY} http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}", flush=True)
        await asyncio.Event().wait()

    asyncio.run(run())


def start_helper(cleanup: contextlib.ExitStack, argv: list[str], ready_word: str) -> list[str]:
    """Start a helper process that is stopped when `cleanup` closes; return the words of its ready
    line after the ready word (the URL first)."""
    proc = start_group(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    cleanup.callback(stop_group, proc)
    line = proc.stdout.readline()
    if ready_word not in line:
        raise RuntimeError(f"{argv[1:3]} failed to start: {line!r}")
    threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # never a full pipe
    return line.split()[1:]


_local = threading.local()


def _create_batch(args) -> int:
    """Worker (thread or process): create tasks [start, stop) with the official client; `host` is
    "rest:HOST:PORT" or "grpc:HOST:PORT" (one client per thread and transport, as shared.clients
    makes it: gRPC clients share one channel)."""
    host, queue, url, start, stop, deadline = args
    from google.cloud import tasks_v2

    from shared.clients import make_tasks_client

    transport, address = host.split(":", 1)
    clients = getattr(_local, "clients", None)
    if clients is None:
        clients = _local.clients = {}
    client = clients.get(host)
    if client is None:
        client = clients[host] = (make_tasks_client(grpc_host=address) if transport == "grpc"
                                  else make_tasks_client(address))
    n = 0
    for i in range(start, stop):
        if time.time() > deadline:
            break
        client.create_task(parent=queue, task=tasks_v2.Task(
            name=f"{queue}/tasks/{i:04x}-{transport}-{i}",
            http_request=tasks_v2.HttpRequest(url=url, body=b'{"i": %d}' % i)))
        n += 1
    return n


def local_token() -> str:
    """The caller's local token (what shared.clients.local_credentials sends), or ""."""
    return next((os.environ[v] for v in LOCAL_IDENTITY_VARS if os.environ.get(v)), "")


def _raw_batch(args) -> int:
    host, queue, url, start, stop, deadline = args
    headers = {"Content-Type": "application/json"}
    if token := local_token():  # an emulator that enforces IAM answers 401 without it
        headers["Authorization"] = f"Bearer {token}"
    h, p = host.split(":")
    conn = http.client.HTTPConnection(h, int(p), timeout=10)
    path = f"/v2/{queue}/tasks?%24alt=json%3Benum-encoding%3Dint"
    n = 0
    for i in range(start, stop):
        if time.time() > deadline:
            break
        body = json.dumps({"task": {"name": f"{queue}/tasks/{i:04x}-raw-{i}",
                                    "httpRequest": {"url": url, "httpMethod": 1, "body": "eyJpIjogMX0="}}})
        conn.request("POST", path, body=body, headers=headers)
        resp = conn.getresponse()
        answer = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"raw create failed: HTTP {resp.status} {answer[:300]!r}")
        n += 1
    conn.close()
    return n


def _cpu_s() -> float:
    """CPU seconds of this process and of its reaped children (a process pool, once shut down); the
    emulator and the target are children never reaped before the end, so they do not count."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def _run_pool(fn, host, queue, url, total, workers, mode, deadline) -> tuple[int, float, float]:
    """(creates, wall seconds, client CPU seconds) of one create phase."""
    chunk = (total + workers - 1) // workers
    jobs = [(host, queue, url, s, min(s + chunk, total), deadline) for s in range(0, total, chunk)]
    ex_cls = cf.ProcessPoolExecutor if mode == "processes" else cf.ThreadPoolExecutor
    kwargs = {"mp_context": mp.get_context("spawn")} if mode == "processes" else {}
    cpu0, t0 = _cpu_s(), time.perf_counter()
    with ex_cls(max_workers=workers, **kwargs) as ex:
        done = sum(ex.map(fn, jobs))
    return done, time.perf_counter() - t0, _cpu_s() - cpu0


def _cpu_ms(cpu_s: float, n: int) -> float:
    return round(1000 * cpu_s / n, 3)


def _parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=20_000)
    ap.add_argument("--raw-tasks", type=int, default=5_000)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--mode", choices=["threads", "processes"], default="threads")
    ap.add_argument("--rate", type=float, default=500.0)
    ap.add_argument("--concurrency", type=int, default=1000)
    ap.add_argument("--client-seconds", type=float, default=20.0,
                    help="time budget of each official-client phase (REST, gRPC)")
    ap.add_argument("--host", default="", help="an emulator to use (its IAM, if any, gets the local token)")
    ap.add_argument("--grpc-host", default="", help="that emulator's gRPC address (with --host; else no gRPC phase)")
    ap.add_argument("--quick", action="store_true", help=QUICK_HELP)
    ap.add_argument("--serve-target", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.tasks, args.raw_tasks, args.client_seconds, args.workers = 200, 200, 10.0, 2
        # A quick run on a stack uses the stack's emulator, so the IAM path (token on both phases) is
        # exercised too: without the token the raw phase got 401s and made 0 creates unnoticed.
        if not args.host:
            args.host = os.environ.get("CLOUD_TASKS_EMULATOR_HOST", "")
            args.grpc_host = os.environ.get("CLOUD_TASKS_EMULATOR_GRPC_HOST", "")
    return args


def measure(args, host: str, grpc_host: str, url: str, started: float, cleanup: contextlib.ExitStack) -> dict:
    """The phases on a fresh paused queue (deleted when `cleanup` closes)."""
    from google.cloud import tasks_v2

    from shared.clients import make_tasks_client

    client = make_tasks_client(host)
    qid = f"bench-{uuid.uuid4().hex[:8]}"
    parent = PARENT
    if args.host:  # an IAM-enforcing emulator grants only in its own project
        project = os.environ.get("GOOGLE_CLOUD_PROJECT", "demo-bench")
        parent = f"projects/{project}/locations/{os.environ.get('UPCFAN_LOCATION', 'us-central1')}"
    queue = f"{parent}/queues/{qid}"
    client.create_queue(parent=parent, queue=tasks_v2.Queue(
        name=queue, rate_limits=tasks_v2.RateLimits(max_dispatches_per_second=args.rate,
                                                    max_concurrent_dispatches=args.concurrency)))
    cleanup.callback(_delete_queue, client, queue)
    client.pause_queue(name=queue)
    result: dict = {"quick": args.quick, "emulator": "given (--host)" if args.host else "own, open", "tasks": args.tasks, "raw_tasks": args.raw_tasks, "workers": args.workers, "mode": args.mode,
                    "rate_limit": args.rate, "cpus": os.cpu_count()}

    # Its time budget starts with the phase: counted from the bench's start, the emulator's and the
    # target's start-up ate it (a quick run once made 0 creates).
    def client_phase(transport: str, target: str, prefix: str) -> int:
        n, dt, cpu = _run_pool(_create_batch, target, queue, url, args.tasks, args.workers, args.mode,
                               time.time() + args.client_seconds)
        if n == 0:
            raise RuntimeError(f"the official-client {transport} phase created no task: nothing to compare")
        result.update({f"{prefix}_creates": n, f"{prefix}_create_s": round(dt, 3),
                       f"{prefix}_creates_per_s": round(n / dt, 1), f"{prefix}_cpu_ms_per_create": _cpu_ms(cpu, n)})
        print(f"official client: {n} creates in {dt:.2f}s = {n / dt:,.0f}/s ({args.mode} x{args.workers}, "
              f"{transport}), client CPU {1000 * cpu / n:.2f} ms/create", flush=True)
        return n

    n = client_phase("REST", f"rest:{host}", "client")
    gn = 0
    if grpc_host:  # ids of its own (…-grpc-…), so the same range never collides with the REST phase's
        gn = client_phase("gRPC", f"grpc:{grpc_host}", "grpc")

    # Its own task count (ids that cannot collide with the client's), not what the client phase left.
    rn, rdt, rcpu = _run_pool(_raw_batch, host, queue, url, args.raw_tasks, args.workers, "threads",
                              time.time() + RAW_PHASE_S)
    if rn == 0:
        raise RuntimeError("the raw-HTTP phase created no task: no baseline for the client's creates")
    result.update(raw_creates=rn, raw_create_s=round(rdt, 3), raw_creates_per_s=round(rn / rdt, 1),
                  raw_cpu_ms_per_create=_cpu_ms(rcpu, rn))
    print(f"raw HTTP:        {rn} creates in {rdt:.2f}s = {rn / rdt:,.0f}/s (threads x{args.workers}), "
          f"client CPU {1000 * rcpu / rn:.2f} ms/create", flush=True)

    result.update(dispatch(client, host, queue, qid, n + gn + rn, started))
    print(f"dispatch:        {result['succeeded']} delivered in {result['dispatch_s']:.2f}s = "
          f"{result['dispatches_per_s']:,.0f}/s (queue rate {args.rate:g}/s)", flush=True)
    return result


def _delete_queue(client, queue: str) -> None:
    with contextlib.suppress(Exception):  # best effort: must not hide the error that ended the bench
        client.delete_queue(name=queue)


def dispatch(client, host: str, queue: str, qid: str, total: int, started: float) -> dict:
    """Resume the queue and time until all `total` tasks were delivered (or the hard limit)."""
    t0 = time.perf_counter()
    client.resume_queue(name=queue)
    deadline = time.monotonic() + max(10.0, started + HARD_LIMIT_S - time.time())
    succeeded = 0
    while time.monotonic() < deadline:
        succeeded = emu.queue_stats(host, qid).get("succeeded", 0)
        if succeeded >= total:
            break
        time.sleep(0.05)
    elapsed = time.perf_counter() - t0
    st = emu.queue_stats(host, qid)
    return {"dispatched": st.get("dispatched"), "succeeded": succeeded, "dispatch_s": round(elapsed, 3),
            "dispatches_per_s": round(succeeded / elapsed, 1), "retried": st.get("retried")}


def main() -> int:
    args = _parse_args()
    if args.serve_target:
        serve_target()
        return 0
    interrupt_on_sigterm()
    started = time.time()
    with contextlib.ExitStack() as cleanup:  # closes in reverse: queue deleted, then target and emulator stopped
        host, grpc_host = args.host, args.grpc_host
        if not host:
            ready = start_helper(cleanup, [sys.executable, "-m", "devstack.cloudtasks", "--host", "127.0.0.1",
                                           "--port", "0", "--grpc-port", "0", "--log-level", "WARNING"], "READY")
            host, grpc_host = ready[0].replace("http://", ""), ready[1].removeprefix("grpc=")
        emu.wait_ready(host, 10)
        url = start_helper(cleanup, [sys.executable, __file__, "--serve-target"], TARGET_READY)[0] + "/task"
        result = measure(args, host, grpc_host, url, started, cleanup)
    result["total_s"] = round(time.time() - started, 2)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
