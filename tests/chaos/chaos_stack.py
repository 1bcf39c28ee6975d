"""Chaos helpers: a private local stack, worker kill/restart through devstack, fault knobs.

Fault injection is global to a stack (emulator duplicate deliveries, marketplace 5xx, a killed
worker), so by default the chaos suite runs on its own stack under `.local/chaos`
(`UPCFAN_LOCAL_DIR`, free ports, its own process tag) and never disturbs the stack other
sessions share. `UPCFAN_CHAOS_LOCAL_DIR` picks another directory; the stack is stopped at the
end if this session started it (`UPCFAN_KEEP_STACK=1` keeps it).

Kill and restart go through `devstack.testing.kill_component` / `restart_component` (devstack
has no restart command: the component is started again through devstack's Python API in a
subprocess that sees the same `UPCFAN_LOCAL_DIR`, and its new pid is recorded as `up` does).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

from devstack.testing import component_alive, component_info, kill_component, restart_component

REPO_ROOT = Path(__file__).resolve().parents[2]

# The stack does not set UPCFAN_LEASE_S (60 s default, 15 s heartbeats). The chaos worker runs with
# a short lease so "latency beyond the lease" and "a killed worker's lease expires" happen within
# the suite's time budget; heartbeats keep a slow but live delivery's lease.
CHAOS_WORKER_ENV = {"UPCFAN_LEASE_S": "5", "UPCFAN_HEARTBEAT_S": "1.5"}
# The item queue's backoff on the chaos stack, scaled like the lease (production: 1 s to 300 s).
CHAOS_ITEM_RETRY = {"min_backoff_s": 0.5, "max_backoff_s": 10.0, "max_doublings": 4}


@dataclass
class ChaosStack:
    local_dir: Path
    env: dict[str, str]
    started_here: bool
    kills: list[dict] = field(default_factory=list)

    def pid_info(self, name: str) -> dict:
        return component_info(name, self.local_dir)

    def kill(self, name: str) -> int:
        """SIGKILL the component's whole process group (functions-framework and its workers)."""
        pid = kill_component(name, self.local_dir)
        self.kills.append({"name": name, "pid": pid, "at": time.time()})
        return pid

    def restart(self, name: str, extra_env: dict[str, str] | None = None) -> int:
        return restart_component(name, extra_env, self.local_dir)

    def worker_alive(self) -> bool:
        return component_alive("worker", self.local_dir)

    # ---------------------------------------------------------------- knobs

    def emulator_config(self, **knobs) -> dict:
        url = f"http://{self.env['CLOUD_TASKS_EMULATOR_HOST']}/_emulator/config"
        if not knobs:
            return requests.get(url, timeout=10).json()
        resp = requests.post(url, json=knobs, timeout=10)
        resp.raise_for_status()
        return resp.json()

    def emulator_stats(self) -> dict:
        return requests.get(f"http://{self.env['CLOUD_TASKS_EMULATOR_HOST']}/_emulator/stats", timeout=10).json()

    def update_queue_retry(self, queue: str, **retry_s) -> None:
        """Change a queue's retry backoff with UpdateQueue, as an operator could (scales time for CI)."""
        self._update_queue(queue, retry_s)

    def restore_queue_retry(self, queue: str) -> None:
        """The queue's retry config as the product declares it (shared.config)."""
        from shared.config import CONTROL_QUEUE, ITEM_QUEUE

        spec = {q.name: q for q in (ITEM_QUEUE, CONTROL_QUEUE)}[queue].retry
        self._update_queue(queue, {"min_backoff_s": spec.min_backoff_s, "max_backoff_s": spec.max_backoff_s,
                                   "max_doublings": spec.max_doublings})

    def _update_queue(self, queue: str, retry_s: dict) -> None:
        from google.cloud import tasks_v2
        from google.oauth2.credentials import Credentials
        from google.protobuf import duration_pb2, field_mask_pb2

        from shared.clients import make_tasks_client

        def duration(seconds: float) -> duration_pb2.Duration:
            return duration_pb2.Duration(seconds=int(seconds), nanos=int(seconds % 1 * 1e9))

        client = make_tasks_client(self.env["CLOUD_TASKS_EMULATOR_HOST"],
                                   credentials=Credentials(token=self.env["UPCFAN_OPERATOR_TOKEN"]),
                                   grpc_host=self.env.get("CLOUD_TASKS_EMULATOR_GRPC_HOST", ""))
        name = f"{self.env['UPCFAN_QUEUE'].rsplit('/queues/', 1)[0]}/queues/{queue}"
        retry = tasks_v2.RetryConfig(min_backoff=duration(retry_s["min_backoff_s"]),
                                     max_backoff=duration(retry_s["max_backoff_s"]),
                                     max_doublings=int(retry_s["max_doublings"]))
        client.update_queue(queue=tasks_v2.Queue(name=name, retry_config=retry),
                            update_mask=field_mask_pb2.FieldMask(paths=["retry_config.min_backoff",
                                                                         "retry_config.max_backoff",
                                                                         "retry_config.max_doublings"]))

    def market(self, path: str, body: dict | None = None):
        url = self.env["UPCFAN_MARKETPLACE_URL"] + path
        resp = requests.post(url, json=body, timeout=10) if body is not None else requests.get(url, timeout=30)
        resp.raise_for_status()
        return resp.json()

