"""Chaos helpers: a private local stack, worker kill/restart through devstack, fault knobs.

Fault injection is global to a stack (emulator duplicate deliveries, marketplace 5xx, a killed
worker), so by default the chaos suite runs on its own stack under `.local/chaos`
(`UPCFAN_LOCAL_DIR`, free ports, its own process tag) and never disturbs the stack other
sessions share. `UPCFAN_CHAOS_LOCAL_DIR` picks another directory; the stack is stopped at the
end if this session started it (`UPCFAN_KEEP_STACK=1` keeps it).

devstack has no restart/supervise command, so `ChaosStack.restart(name)` restarts a component
through devstack's Python API (`stack.build_components(...)[name].start(...)`) in a subprocess
that sees the same `UPCFAN_LOCAL_DIR`; the new pid is recorded in the pid file as `up` does.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import requests

REPO_ROOT = Path(__file__).resolve().parents[2]

# The stack does not set UPCFAN_LEASE_S (60 s default, 15 s heartbeats). The chaos worker runs with
# a short lease so "latency beyond the lease" and "a killed worker's lease expires" happen within
# the suite's time budget; heartbeats keep a slow but live delivery's lease.
CHAOS_WORKER_ENV = {"UPCFAN_LEASE_S": "5", "UPCFAN_HEARTBEAT_S": "1.5"}

_RESTART = r"""
import json, sys, time
from devstack import paths, stack
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
st["components"][name]["pid"] = c.proc.pid
paths.STATE_FILE.write_text(json.dumps(st, indent=2))
print(c.proc.pid)
"""


@dataclass
class ChaosStack:
    local_dir: Path
    env: dict[str, str]
    started_here: bool
    kills: list[dict] = field(default_factory=list)

    def _proc_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.endswith("_EMULATOR_HOST")}
        env["UPCFAN_LOCAL_DIR"] = str(self.local_dir)
        env["PYTHONPATH"] = str(REPO_ROOT)
        return env

    def pid_info(self, name: str) -> dict:
        return json.loads((self.local_dir / "run" / f"{name}.pid").read_text())

    def kill(self, name: str) -> int:
        """SIGKILL the component's whole process group (functions-framework and its workers)."""
        info = self.pid_info(name)
        pgid = info.get("pgid", info["pid"])
        proc = psutil.Process(info["pid"])
        if abs(proc.create_time() - info.get("create_time", proc.create_time())) > 1.0:
            raise AssertionError(f"pid {info['pid']} of {name} was reused; refusing to kill it")
        os.killpg(pgid, signal.SIGKILL)
        gone, alive = psutil.wait_procs([proc], timeout=10)
        assert not alive, f"{name} pid {info['pid']} survived SIGKILL"
        self.kills.append({"name": name, "pid": info["pid"], "at": time.time()})
        return info["pid"]

    def restart(self, name: str, extra_env: dict[str, str] | None = None) -> int:
        out = subprocess.run([sys.executable, "-c", _RESTART, name, json.dumps(extra_env or {})],
                             env=self._proc_env(), cwd=str(REPO_ROOT), capture_output=True, text=True,
                             timeout=90)
        if out.returncode != 0:
            raise AssertionError(f"restart of {name} failed: {out.stderr[-2000:]}")
        return int(out.stdout.strip().splitlines()[-1])

    def worker_alive(self) -> bool:
        try:
            info = self.pid_info("worker")
            return psutil.Process(info["pid"]).is_running()
        except (OSError, ValueError, psutil.Error):
            return False

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

    def market(self, path: str, body: dict | None = None):
        url = self.env["UPCFAN_MARKETPLACE_URL"] + path
        resp = requests.post(url, json=body, timeout=10) if body is not None else requests.get(url, timeout=30)
        resp.raise_for_status()
        return resp.json()


def _devstack(args: list[str], local_dir: Path, timeout: float) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.endswith("_EMULATOR_HOST")}
    env.update(UPCFAN_LOCAL_DIR=str(local_dir), PYTHONPATH=str(REPO_ROOT))
    return subprocess.run([sys.executable, "-m", "devstack", *args], env=env, cwd=str(REPO_ROOT),
                          capture_output=True, text=True, timeout=timeout)
