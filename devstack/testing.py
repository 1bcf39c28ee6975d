"""Test-side helpers for the local stack: share one stack between sessions, and thin HTTP helpers.

`stack_session()` reuses a healthy stack or starts one. Several test sessions (several engineers)
may use the same checkout's stack at once: each registers itself under .local/users/<pid>, and the
last session to leave stops the stack only if a test session started it (a stack started by
`scripts/dev up` is left running). UPCFAN_KEEP_STACK=1 leaves a test-started stack running too.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from dataclasses import dataclass
from typing import Callable, Iterator

import psutil
import requests
from stdnum import ean

from devstack import paths, stack


def _register_user() -> str:
    paths.USERS_DIR.mkdir(parents=True, exist_ok=True)
    me = psutil.Process()
    f = paths.USERS_DIR / f"{me.pid}"
    f.write_text(json.dumps({"pid": me.pid, "create_time": me.create_time()}))
    return str(f)


def _live_users() -> list[int]:
    out = []
    if not paths.USERS_DIR.exists():
        return out
    for f in paths.USERS_DIR.iterdir():
        try:
            info = json.loads(f.read_text())
            proc = psutil.Process(info["pid"])
            if abs(proc.create_time() - info["create_time"]) < 1.0:
                out.append(info["pid"])
                continue
        except (OSError, ValueError, KeyError, psutil.Error):
            pass
        f.unlink(missing_ok=True)  # a session that died without cleaning up
    return out


@contextlib.contextmanager
def stack_session(log=print) -> Iterator[dict[str, str]]:
    """Yield the stack.env values of a healthy stack; stop it afterwards when tests started it and nobody uses it."""
    marker = paths.LOCAL / "started-by-tests"
    with stack.stack_lock():
        st = stack.status()
        if st["up"] and not st["skip"]:
            env = stack.read_env_file() or {}
        else:
            env = stack._up(set(), 120.0, log)
            marker.write_text(str(os.getpid()))
        user_file = _register_user()
    try:
        yield env
    finally:
        with stack.stack_lock():
            os.unlink(user_file) if os.path.exists(user_file) else None
            others = [p for p in _live_users() if p != os.getpid()]
            if marker.exists() and not others and os.environ.get("UPCFAN_KEEP_STACK") != "1":
                stack._down(log)
                marker.unlink(missing_ok=True)


def poll(fn, timeout_s: float = 30.0, interval_s: float = 0.1, what: str = "condition"):
    """Call fn until it returns a truthy value (returned) or the deadline passes (AssertionError)."""
    deadline = time.monotonic() + timeout_s
    last = None
    while True:
        last = fn()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}; last value: {last!r}")
        time.sleep(interval_s)


# ---------------------------------------------------------------- calling the functions
# Every function is private (devstack/gate.py, as Cloud Run with --no-allow-unauthenticated): a caller
# from outside the stack sends the local operator's token, as an engineer sends
# `gcloud auth print-identity-token`. Tests, benches and scripts call function URLs only through these.

OPERATOR_TOKEN = "UPCFAN_OPERATOR_TOKEN"


def operator_headers(env: dict[str, str] | None = None) -> dict[str, str]:
    """`Authorization: Bearer <UPCFAN_OPERATOR_TOKEN>` of this stack (`env`, else os.environ)."""
    token = (env if env is not None else os.environ).get(OPERATOR_TOKEN)
    if not token:
        raise RuntimeError(f"{OPERATOR_TOKEN} is not set: is the stack up (.local/stack.env)?")
    return {"Authorization": f"Bearer {token}"}


def operator_session(env: dict[str, str] | None = None) -> requests.Session:
    """A requests.Session that calls the stack's functions as the local operator (one per thread:
    Sessions are not thread-safe)."""
    session = requests.Session()
    session.headers.update(operator_headers(env))
    return session


class Scheduler:
    """The local Cloud Scheduler's control routes (devstack/scheduler.py): the sweeper job."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def run(self, timeout_s: float = 330.0) -> dict:
        """Run the sweeper job now (as `gcloud scheduler jobs run`) and return its outcome:
        {"status": the sweeper's HTTP status, "response": its body, "duration_s", ...}."""
        resp = requests.post(f"{self.url}/_run", timeout=timeout_s)
        resp.raise_for_status()
        return resp.json()

    def job(self) -> dict:
        return requests.get(f"{self.url}/_job", timeout=10).json()

    def runs(self) -> list[dict]:
        return requests.get(f"{self.url}/_runs", timeout=10).json()["runs"]

    def pause(self) -> dict:
        return requests.post(f"{self.url}/_pause", timeout=10).json()

    def resume(self) -> dict:
        return requests.post(f"{self.url}/_resume", timeout=10).json()

    def watchdog(self, period_s: float | None = None) -> dict:
        """The watchdog's state; with `period_s`, arm it with that period first (0 disarms)."""
        if period_s is None:
            return requests.get(f"{self.url}/_watchdog", timeout=10).json()
        resp = requests.post(f"{self.url}/_watchdog", json={"period_s": period_s}, timeout=10)
        resp.raise_for_status()
        return resp.json()


def wait_job(db, job_id: str, statuses: set[str], timeout_s: float = 120.0) -> dict:
    """The job document once its status is one of `statuses` (AssertionError past the deadline)."""
    from shared.model import JOBS

    def get():
        snap = db.collection(JOBS).document(job_id).get()
        doc = snap.to_dict() if snap.exists else None
        return doc if doc and doc.get("status") in statuses else None

    return poll(get, timeout_s, 0.2, f"job {job_id} to reach {statuses}")


class Marketplace:
    """The sandbox marketplace's control routes."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def stats(self) -> dict:
        return requests.get(f"{self.url}/_stats", timeout=10).json()

    def faults(self, **spec) -> dict:
        """No arguments: current faults. Otherwise replace them, e.g. faults(error_rate=0.3)."""
        if not spec:
            return requests.get(f"{self.url}/_faults", timeout=10).json()
        resp = requests.post(f"{self.url}/_faults", json=spec, timeout=10)
        resp.raise_for_status()
        return resp.json()

    def config(self, **knobs) -> dict:
        if not knobs:
            return requests.get(f"{self.url}/_config", timeout=10).json()
        return requests.post(f"{self.url}/_config", json=knobs, timeout=10).json()

    def listings(self, sku: str | None = None) -> list[dict]:
        params = {"sku": sku} if sku else None
        return requests.get(f"{self.url}/_listings", params=params, timeout=10).json()["listings"]

    def reset(self) -> None:
        requests.post(f"{self.url}/_reset", timeout=10).raise_for_status()


class SlackSink:
    """The local Slack webhook sink."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def messages(self) -> list[dict]:
        return requests.get(f"{self.url}/", timeout=10).json()["messages"]

    def fail(self, status: int = 500, count: int = 1, retry_after: float = 1) -> dict:
        spec = {"status": status, "count": count, "retry_after": retry_after}
        return requests.post(f"{self.url}/_fail", json=spec, timeout=10).json()

    def reset(self) -> None:
        requests.post(f"{self.url}/_reset", timeout=10).raise_for_status()


class Bridge:
    """The finalize → CloudEvent bridge's delivery log."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def deliveries(self, name: str | None = None) -> list[dict]:
        params = {"name": name} if name else None
        return requests.get(f"{self.url}/_deliveries", params=params, timeout=10).json()["deliveries"]


def fresh_upcs(n: int) -> list[str]:
    """n distinct random UPC-A codes: SKUs no other test (or earlier run) has listed."""
    rng = random.Random(uuid.uuid4().int)
    out: set[str] = set()
    while len(out) < n:
        body = f"{rng.randrange(10**10, 10**11)}"
        out.add(body + ean.calc_check_digit(body))
    return sorted(out)


def gtin14(upc: str) -> str:
    return upc.zfill(14)


def unique_name(prefix: str = "test", suffix: str = ".csv") -> str:
    return f"{prefix}/{uuid.uuid4().hex[:12]}{suffix}"


# ---------------------------------------------------------------- kill / restart a component
#
# devstack has no restart/supervise command: a component is restarted through devstack's Python
# API (`stack.build_components(...)[name].start(...)`) in a subprocess that sees the stack's
# UPCFAN_LOCAL_DIR, and its new pid is recorded as `up` does. `extra_env` overrides the
# component's environment for that run (e.g. a worker with a short UPCFAN_LEASE_S).

_RESTART = r"""
import json, sys, time
from devstack import paths, procs, stack
name, extra = sys.argv[1], json.loads(sys.argv[2])
st = stack.read_state()
env = stack.read_env_file()
comps = {c.name: c for c in stack.build_components(st["ports"], env, set(st.get("skip", [])))}
c = comps[name]
c.env.update(extra)
c.start(stack.base_process_env())
deadline = time.monotonic() + 60
while not c.ready():
    if c.proc.poll() is not None or time.monotonic() > deadline:
        raise SystemExit(f"{name} did not come back: see {c.log}")
    time.sleep(0.1)
procs.record_children(name)
st["components"][name]["pid"] = c.proc.pid
paths.STATE_FILE.write_text(json.dumps(st, indent=2))
print(c.proc.pid)
"""


def _local(local_dir: str | Path | None) -> Path:
    return Path(local_dir).resolve() if local_dir else paths.LOCAL.resolve()


def component_info(name: str, local_dir: str | Path | None = None) -> dict:
    """The component's pid record (`pid`, `pgid`, `create_time`, `argv`, `children`)."""
    return json.loads((_local(local_dir) / "run" / f"{name}.pid").read_text())


def component_alive(name: str, local_dir: str | Path | None = None) -> bool:
    try:
        info = component_info(name, local_dir)
        proc = psutil.Process(info["pid"])
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except (OSError, ValueError, KeyError, psutil.Error):
        return False


def component_env(name: str, local_dir: str | Path | None = None) -> dict[str, str]:
    """The environment the component's live process runs with ({} when it is not running)."""
    try:
        return dict(psutil.Process(component_info(name, local_dir)["pid"]).environ())
    except (OSError, ValueError, KeyError, psutil.Error):
        return {}


def kill_component(name: str, local_dir: str | Path | None = None) -> int:
    """SIGKILL the component's whole process group (e.g. functions-framework and its workers); returns the pid."""
    info = component_info(name, local_dir)
    pgid = info.get("pgid", info["pid"])
    proc = psutil.Process(info["pid"])
    if abs(proc.create_time() - info.get("create_time", proc.create_time())) > 1.0:
        raise AssertionError(f"pid {info['pid']} of {name} was reused; refusing to kill it")
    os.killpg(pgid, signal.SIGKILL)
    _, alive = psutil.wait_procs([proc], timeout=10)
    # A killed process that nobody has reaped yet is a zombie: dead, but psutil still finds it. An
    # orphan's reaper is whatever adopted it (PID 1 here need not reap at once), so a zombie counts as gone.
    alive = [p for p in alive if not _is_zombie(p)]
    assert not alive, f"{name} pid {info['pid']} survived SIGKILL"
    return info["pid"]


def _is_zombie(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def restart_component(name: str, extra_env: dict[str, str] | None = None,
                      local_dir: str | Path | None = None, timeout_s: float = 90.0) -> int:
    """Start the (stopped) component again through devstack; returns its new pid once it is ready."""
    env = {k: v for k, v in os.environ.items() if not k.endswith(("_EMULATOR_HOST", "_EMULATOR_GRPC_HOST"))}
    env["UPCFAN_LOCAL_DIR"] = str(_local(local_dir))
    env["PYTHONPATH"] = str(paths.REPO_ROOT)
    out = subprocess.run([sys.executable, "-c", _RESTART, name, json.dumps(extra_env or {})], env=env,
                         cwd=str(paths.REPO_ROOT), capture_output=True, text=True, timeout=timeout_s)
    if out.returncode != 0:
        raise AssertionError(f"restart of {name} failed: {out.stderr[-2000:]}")
    return int(out.stdout.strip().splitlines()[-1])


@contextlib.contextmanager
def stack_env_applied(env: dict[str, str], unset: tuple[str, ...] = ()) -> Iterator[dict[str, str]]:
    """Point this process at a stack: its env in os.environ (`unset` keys removed) and fresh lazy
    clients; both restored on exit (so a private stack's clients never leak into the next module)."""
    from shared.clients import reset_clients

    saved = {k: os.environ.get(k) for k in (*env, *unset)}
    for k in unset:
        os.environ.pop(k, None)
    os.environ.update(env)
    reset_clients()
    try:
        yield dict(env)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        reset_clients()


def stack_lock_for(local_dir: str | Path | None = None, timeout_s: float = 300.0):
    """The stack's up/down lock (`devstack.stack.stack_lock`) for any UPCFAN_LOCAL_DIR."""
    return stack.stack_lock(timeout_s, lock_file=_local(local_dir) / "stack.lock")


def bounce_component(name: str, extra_env: dict[str, str] | None = None, local_dir: str | Path | None = None,
                     while_down: Callable[[], None] | None = None) -> tuple[int, int]:
    """SIGKILL a component, run `while_down()`, restart it (with `extra_env`); returns (old pid, new pid).

    Holds the stack lock from the kill to the restart, so a test session that starts meanwhile waits
    instead of seeing a half-dead shared stack (which it would stop and start afresh).
    """
    with stack_lock_for(local_dir):
        old = kill_component(name, local_dir)
        try:
            if while_down is not None:
                while_down()
        finally:
            new = restart_component(name, extra_env, local_dir)
    return old, new


# ---------------------------------------------------------------- a private stack


def run_devstack(args: list[str], local_dir: str | Path, timeout_s: float) -> subprocess.CompletedProcess:
    """`python -m devstack ARGS` for the stack under `local_dir` (its own UPCFAN_LOCAL_DIR)."""
    env = {k: v for k, v in os.environ.items() if not k.endswith(("_EMULATOR_HOST", "_EMULATOR_GRPC_HOST"))}
    env.update(UPCFAN_LOCAL_DIR=str(_local(local_dir)), PYTHONPATH=str(paths.REPO_ROOT))
    return subprocess.run([sys.executable, "-m", "devstack", *args], env=env, cwd=str(paths.REPO_ROOT),
                          capture_output=True, text=True, timeout=timeout_s)


@dataclass
class LocalStack:
    local_dir: Path
    env: dict[str, str]
    started_here: bool


@contextlib.contextmanager
def private_stack(local_dir: str | Path, up_timeout_s: float = 300.0) -> Iterator[LocalStack]:
    """A stack of its own under `local_dir` (free ports, own logs and process tag), for tests whose
    faults are global to a stack (killed functions, emulator knobs, a paused queue, marketplace error
    rates). Reused when healthy; otherwise started here and stopped at the end unless
    UPCFAN_KEEP_STACK=1."""
    local_dir = _local(local_dir)
    started = run_devstack(["status"], local_dir, 60).returncode != 0
    if started:
        up = run_devstack(["up"], local_dir, up_timeout_s)
        if up.returncode != 0:  # a cold emulator can time out its setup on a loaded machine: once more
            up = run_devstack(["up"], local_dir, up_timeout_s)
        if up.returncode != 0:
            raise RuntimeError(f"stack under {local_dir} did not start:\n{up.stdout[-1500:]}\n{up.stderr[:3000]}")
    env = stack.read_env_file(local_dir / "stack.env")
    if not env:
        raise RuntimeError(f"no stack.env under {local_dir}")
    try:
        yield LocalStack(local_dir, env, started)
    finally:
        if started and os.environ.get("UPCFAN_KEEP_STACK") != "1":
            run_devstack(["down"], local_dir, 120)
