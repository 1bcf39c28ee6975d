"""`bench/run --quick` on the shared test stack: every bench runs at tiny sizes, prints its result
line and leaves no process and no job behind, so that no change can break a bench unnoticed (issue 17, item 5).
No timing is asserted: on a shared 2-core machine the figures of a quick run mean nothing."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
RESULTS = REPO_ROOT / "bench" / "results.md"


def _bench_processes() -> list[psutil.Process]:
    """Processes carrying any bench run's tag (bench/runner.py sets it in every bench's environment)."""
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if "UPCFAN_BENCH_RUN" in proc.environ() and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


def test_every_bench_runs_quick_and_leaves_nothing_behind(stack_env):
    results_before = RESULTS.read_text()
    before = {p.pid for p in _bench_processes()}  # another session's bench run is not ours
    jobs_before = set(_jobs_of_bench_files())  # e.g. left by an interrupted run: not this run's
    proc = subprocess.run([str(REPO_ROOT / "bench" / "run"), "--quick"], cwd=REPO_ROOT, env=dict(os.environ),
                          capture_output=True, text=True, timeout=400)
    out = proc.stdout + proc.stderr
    summary = next((json.loads(line.split(" ", 1)[1]) for line in proc.stdout.splitlines()
                    if line.startswith("QUICK_SUMMARY ")), None)
    assert summary is not None, out
    assert summary["broken"] == [] and summary["left_running"] == [], out
    assert sorted(summary["ok"]) == ["capacity", "cloudtasks", "fairness", "ingest", "marketplace", "sweeper", "worker"], out
    assert proc.returncode == 0, out
    for name in summary["ok"]:
        assert f"QUICK {name}: ok" in out, (name, out)
    assert '"emulator": "given (--host)"' in out, out  # the stack's IAM-enforcing emulator, with the token
    # Both create phases of the cloudtasks bench made their tasks (the raw one once made 0 unnoticed).
    assert re.search(r"official client: 200 creates", out) and re.search(r"raw HTTP:\s+200 creates", out), out
    assert [p for p in _bench_processes() if p.pid not in before] == [], out
    assert RESULTS.read_text() == results_before  # a quick run is not a measurement
    assert set(_jobs_of_bench_files()) - jobs_before == set(), out  # every bench deleted the jobs it stored


def _jobs_of_bench_files() -> list[str]:
    """Jobs in the stack's Firestore whose file the benches uploaded (`bench/…` objects)."""
    from google.cloud import firestore

    from shared.clients import firestore_client
    from shared.model import JOBS

    query = (firestore_client().collection(JOBS)
             .where(filter=firestore.FieldFilter("object", ">=", "bench/"))
             .where(filter=firestore.FieldFilter("object", "<", "bench0")))
    return [snap.id for snap in query.stream()]
