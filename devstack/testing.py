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
import time
import uuid
from typing import Iterator

import psutil
import requests

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


def unique_name(prefix: str = "test", suffix: str = ".csv") -> str:
    return f"{prefix}/{uuid.uuid4().hex[:12]}{suffix}"
