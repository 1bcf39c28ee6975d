"""Fixtures for the Cloud Tasks emulator conformance suite.

The emulator runs as a subprocess on a free 127.0.0.1 port for the whole session; tests talk to it
only through the official client (REST transport) and the /_emulator inspection API. Targets are
small aiohttp servers on 127.0.0.1 that record every delivery.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from aiohttp import web

from devstack.cloudtasks import client as emu
from devstack.procs import stop_process

ROOT = Path(__file__).resolve().parents[2]
PROJECT = "demo-emulator"
LOCATION = "us-central1"
PARENT = f"projects/{PROJECT}/locations/{LOCATION}"


def poll(fn, timeout: float = 10.0, interval: float = 0.02, what: str = "condition"):
    """Call fn until it returns a truthy value; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@pytest.fixture(scope="session")
def emulator_host():
    proc = subprocess.Popen(
        [sys.executable, "-m", "devstack.cloudtasks", "--host", "127.0.0.1", "--port", "0", "--log-level", "WARNING"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        line = ""
        deadline = time.monotonic() + 15
        while "CLOUDTASKS_EMULATOR_READY" not in line:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"emulator did not start: {line!r}")
            line = proc.stdout.readline()
        host = line.split()[1].replace("http://", "")
        emu.wait_ready(host, timeout=5)
        # Drain the emulator's log output so a full pipe never blocks it.
        threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
        yield host
    finally:
        stop_process(proc)


@pytest.fixture(scope="session")
def tasks_client(emulator_host):
    from shared.clients import make_tasks_client

    return make_tasks_client(emulator_host)


@pytest.fixture
def emu_config(emulator_host):
    """Change emulator config for one test; restored afterwards."""
    original = emu.get_config(emulator_host)

    def set_(**kw):
        return emu.set_config(emulator_host, **kw)

    yield set_
    emu.set_config(emulator_host, **original)


@pytest.fixture
def make_queue(tasks_client):
    from google.cloud import tasks_v2

    created = []

    def make(retry: dict | None = None, rate: dict | None = None, paused: bool = False) -> str:
        qid = f"q-{uuid.uuid4().hex[:10]}"
        name = f"{PARENT}/queues/{qid}"
        tasks_client.create_queue(parent=PARENT, queue=tasks_v2.Queue(
            name=name, retry_config=tasks_v2.RetryConfig(**(retry or {})),
            rate_limits=tasks_v2.RateLimits(**(rate or {})),
        ))
        if paused:
            tasks_client.pause_queue(name=name)
        created.append(name)
        return name

    yield make
    for name in created:
        try:
            tasks_client.delete_queue(name=name)
        except Exception:
            pass


class Target:
    """A recording HTTP target. Behaviour per path:
    /ok -> 200; /fail -> 500; /status/{code} -> code; /slow/{seconds} -> sleep then 200;
    /hold/{seconds} -> sleep then 200 while tracking concurrency;
    /script/{key} -> the next status from self.scripts[key] (a list; 200 when empty);
    /slowfirst/{seconds} -> the first request for a task sleeps, later ones answer 200.
    """

    def __init__(self):
        self.requests: list[dict] = []
        self.scripts: dict[str, list] = {}
        self.concurrent = 0
        self.max_concurrent = 0
        self._seen: set[str] = set()
        self._lock = threading.Lock()
        self.loop = asyncio.new_event_loop()
        self.port = 0
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        ready.wait(10)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]
        ready.set()
        self.loop.run_forever()

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        rec = {"t": time.time(), "mono": time.monotonic(), "method": request.method, "path": request.path,
               "headers": dict(request.headers), "body": body}
        with self._lock:
            self.requests.append(rec)
        parts = request.path.strip("/").split("/")
        kind = parts[0]
        status = 200
        if kind == "fail":
            status = 500
        elif kind == "status":
            status = int(parts[1])
        elif kind == "slow":
            await asyncio.sleep(float(parts[1]))
        elif kind == "hold":
            with self._lock:
                self.concurrent += 1
                self.max_concurrent = max(self.max_concurrent, self.concurrent)
            try:
                await asyncio.sleep(float(parts[1]))
            finally:
                with self._lock:
                    self.concurrent -= 1
        elif kind == "script":
            with self._lock:
                script = self.scripts.get(parts[1], [])
                status = script.pop(0) if script else 200
        elif kind == "slowfirst":
            tname = request.headers.get("X-CloudTasks-TaskName", "")
            with self._lock:
                first = tname not in self._seen
                self._seen.add(tname)
            if first:
                await asyncio.sleep(float(parts[1]))
        rec["status"] = status
        return web.Response(status=status, text="ok" if status < 300 else "nope")

    def for_task(self, task_id: str) -> list[dict]:
        with self._lock:
            return [r for r in self.requests if r["headers"].get("X-CloudTasks-TaskName") == task_id]

    def count(self, prefix: str = "") -> int:
        with self._lock:
            return sum(1 for r in self.requests if r["path"].startswith(prefix))

    def close(self) -> None:
        async def stop():
            await self.runner.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def target():
    t = Target()
    yield t
    t.close()
