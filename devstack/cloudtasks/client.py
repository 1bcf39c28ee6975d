"""Small stdlib-only helpers for tests and tools: wait for the emulator and use its inspection API."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request


def _base(host: str) -> str:
    host = host.rstrip("/")
    return host if host.startswith("http") else f"http://{host}"


def _call(host: str, method: str, path: str, body: dict | None = None, timeout: float = 5.0):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(_base(host) + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read() or b"{}")


def wait_ready(host: str, timeout: float = 10.0) -> dict:
    """Poll GET /_emulator/health until it answers or `timeout` seconds pass (then raise)."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            return _call(host, "GET", "/_emulator/health", timeout=1.0)
        except (OSError, urllib.error.URLError, ValueError) as exc:
            last = exc
            time.sleep(0.05)
    raise TimeoutError(f"Cloud Tasks emulator at {host} not ready after {timeout}s: {last}")


def health(host: str) -> dict:
    return _call(host, "GET", "/_emulator/health")


def get_config(host: str) -> dict:
    return _call(host, "GET", "/_emulator/config")


def set_config(host: str, **settings) -> dict:
    """e.g. set_config(host, tombstone_seconds=2, duplicate_deliveries=1, min_dispatch_deadline_seconds=1)."""
    return _call(host, "POST", "/_emulator/config", settings)


def attempts(host: str, queue_id: str, task_id: str) -> list[dict]:
    """Dispatch history of one task ([] if it was never dispatched)."""
    try:
        return _call(host, "GET", f"/_emulator/tasks/{queue_id}/{task_id}/attempts")["attempts"]
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return []
        raise


def exhausted(host: str) -> list[dict]:
    return _call(host, "GET", "/_emulator/exhausted")["exhausted"]


def stats(host: str) -> dict:
    return _call(host, "GET", "/_emulator/stats")


def queue_stats(host: str, queue_id: str) -> dict:
    return stats(host)["queues"].get(queue_id, {})


def reset(host: str) -> dict:
    return _call(host, "POST", "/_emulator/reset", {})
