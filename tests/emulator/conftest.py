"""Fixtures for the Cloud Tasks emulator conformance suite.

The emulator runs as a subprocess on free 127.0.0.1 ports (REST and gRPC) for the whole session;
tests talk to it only through the official client and the /_emulator inspection API. The client
fixture is parametrized over the transport, so every test that uses it runs over REST (the local
default without CLOUD_TASKS_EMULATOR_GRPC_HOST) and over gRPC (production's transport). Targets are
small servers on 127.0.0.1 that record every delivery: Target (aiohttp, by path) and
ConnectionTarget (raw HTTP/1.1, by connection, for keep-alive behaviour).
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


@pytest.fixture(scope="session")
def emulator_hosts():
    """(REST host:port, gRPC host:port) of the session's emulator."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "devstack.cloudtasks", "--host", "127.0.0.1", "--port", "0", "--grpc-port", "0",
         "--log-level", "WARNING"],
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
        words = line.split()
        host = words[1].replace("http://", "")
        grpc_host = words[2].removeprefix("grpc=")
        emu.wait_ready(host, timeout=5)
        # Drain the emulator's log output so a full pipe never blocks it.
        threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
        yield host, grpc_host
    finally:
        stop_process(proc)


@pytest.fixture(scope="session")
def emulator_host(emulator_hosts):
    """The emulator's REST host:port (also where the /_emulator inspection API is)."""
    return emulator_hosts[0]


@pytest.fixture(scope="session", params=["rest", "grpc"])
def transport(request):
    return request.param


@pytest.fixture(scope="session")
def tasks_client(emulator_hosts, transport):
    """The official client as shared.clients makes it for the local stack, over `transport`."""
    from shared.clients import make_tasks_client

    rest_host, grpc_host = emulator_hosts
    client = make_tasks_client(rest_host, grpc_host=grpc_host if transport == "grpc" else "")
    assert client.transport.kind == transport
    return client


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


class ServerThread:
    """An asyncio server on a thread and event loop of its own, started by the constructor:
    subclasses set their state first, then call super().__init__(); `_serve()` starts listening
    and returns the port, `_stop()` stops."""

    def __init__(self):
        self._lock = threading.Lock()
        self.loop = asyncio.new_event_loop()
        self.port = 0
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        if not ready.wait(10):
            raise RuntimeError(f"{type(self).__name__} did not start")

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.port = self.loop.run_until_complete(self._serve())
        ready.set()
        self.loop.run_forever()

    async def _serve(self) -> int:
        raise NotImplementedError

    async def _stop(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class Target(ServerThread):
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
        super().__init__()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def _serve(self) -> int:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        return site._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        await self.runner.cleanup()

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


@pytest.fixture
def target():
    t = Target()
    yield t
    t.close()


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 keep-alive connection of ConnectionTarget: parses requests, asks the target
    what to do with each, and answers or drops the connection."""

    def __init__(self, target: "ConnectionTarget", index: int):
        self.target = target
        self.index = index
        self.buffer = b""
        self.served = 0  # requests read on this connection so far
        self.idle_since: float | None = None  # end of the last response; None before the first
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.idle_since is not None and not self.buffer:
            idle = time.monotonic() - self.idle_since
            if self.target.closes_idle(idle):
                # The keep-alive timer fired as the request arrived: closed unread, never handled.
                self.target.note("stale_drops")
                self.transport.close()
                return
        self.buffer += data
        while self._handle_one():
            pass

    def _handle_one(self) -> bool:
        head, sep, rest = self.buffer.partition(b"\r\n\r\n")
        if not sep:
            return False
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        if len(rest) < length:
            return False
        self.buffer = rest[length:]
        self.served += 1
        self.target.record({"connection": self.index, "nth_on_connection": self.served,
                            "task": headers.get("x-cloudtasks-taskname"),
                            "retry_count": headers.get("x-cloudtasks-taskretrycount")})
        status = self.target.answer(self.index, self.served)
        if status is None:  # the handler ran, then the process died before answering
            self.transport.close()
            return False
        self.transport.write(f"HTTP/1.1 {status} X\r\nContent-Length: 2\r\n\r\nok".encode())
        self.idle_since = time.monotonic()
        return True


class ConnectionTarget(ServerThread):
    """An HTTP target that sees connections: `closes_idle(idle_s)` says whether a request arriving
    on a connection idle that long finds it already closed; `answer(connection, nth)` gives the
    status for the nth request on a connection (None: close it unanswered after reading)."""

    def __init__(self, closes_idle=lambda idle_s: False, answer=lambda connection, nth: 200):
        self.closes_idle = closes_idle
        self.answer = answer
        self.requests: list[dict] = []
        self.counts = {"connections": 0, "stale_drops": 0}
        super().__init__()

    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def _protocol(self) -> _Connection:
        with self._lock:
            self.counts["connections"] += 1
            return _Connection(self, self.counts["connections"])

    async def _serve(self) -> int:
        self.server = await self.loop.create_server(self._protocol, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        self.server.close()

    def note(self, key: str) -> None:
        with self._lock:
            self.counts[key] += 1

    def record(self, request: dict) -> None:
        with self._lock:
            self.requests.append(request)

    def for_task(self, task_id: str) -> list[dict]:
        with self._lock:
            return [r for r in self.requests if r["task"] == task_id]



@pytest.fixture
def connection_target():
    targets: list[ConnectionTarget] = []

    def make(**kw) -> ConnectionTarget:
        targets.append(ConnectionTarget(**kw))
        return targets[-1]

    yield make
    for t in targets:
        t.close()
