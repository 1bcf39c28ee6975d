"""bench/runner.py: a process a bench leaves running is found and ended; `--only` keeps the other results."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import uuid
from pathlib import Path


RUNNER = Path(__file__).resolve().parents[2] / "bench" / "runner.py"
spec = importlib.util.spec_from_file_location("bench_runner", RUNNER)
runner = sys.modules["bench_runner"] = importlib.util.module_from_spec(spec)  # dataclasses look it up
spec.loader.exec_module(runner)


def test_a_process_left_by_a_bench_is_reported_and_ended():
    run_id = uuid.uuid4().hex
    # Started the way a bench's helper is: inherits the run tag; its parent returns without stopping it.
    left = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                            env={**os.environ, runner.RUN_TAG: run_id})
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                             env={**os.environ, runner.RUN_TAG: "another-run"})
    try:
        reported = runner.leftover_processes(run_id)
        assert reported == [f"pid {left.pid} ({sys.executable} -c import time; time.sleep(120))"]
        assert left.wait(timeout=10) is not None
        assert other.poll() is None  # another run's process is not touched
        assert runner.leftover_processes(run_id) == []
    finally:
        for p in (left, other):
            p.kill()
            p.wait()


def test_only_reruns_keep_the_other_benches_results(tmp_path):
    kept = runner.BenchRun("marketplace", {"bench": "marketplace", "req_per_s": 3481}, 0, 2.0, "", "2026-11-23 14:22 UTC")
    fresh = runner.BenchRun("cloudtasks", {"client_creates_per_s": 300.0, "raw_creates_per_s": 1800.0,
                                           "dispatches_per_s": 520.0, "rate_limit": 500.0}, 0, 50.0, "",
                            "2026-11-24 09:00 UTC")
    path = tmp_path / "results.md"
    runs = [fresh, kept]
    path.write_text(runner.results_md(runs, runner.results_table(runs), ["marketplace"], []))

    previous = runner.previous_runs(path)
    assert previous["marketplace"].result == kept.result
    assert previous["marketplace"].measured_at == "2026-11-23 14:22 UTC"
    assert previous["marketplace"].took_s == 2.0
    assert previous["cloudtasks"].measured_at == "2026-11-24 09:00 UTC"
    table = runner.results_table(list(previous.values()))
    assert [r[1] for r in table[1:]] == [
        "official-client creates (REST) vs raw-HTTP creates", "dispatch rate vs queue max_dispatches_per_second",
        "sandbox marketplace req/s (3,000 requests, 50 clients)"]



def test_stop_group_ends_a_helper_and_what_it_started():
    sys.path.insert(0, str(RUNNER.parents[1]))
    from bench.helpers import start_group, stop_group

    # A helper whose own child ignores SIGTERM: stopping the helper must still end its whole group.
    code = ("import subprocess, sys, time; "
            "c = subprocess.Popen([sys.executable, '-c', "
            "'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print(1, flush=True); time.sleep(120)'],"
            " stdout=subprocess.PIPE); c.stdout.readline(); print(c.pid, flush=True); time.sleep(120)")
    helper = start_group([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    import psutil

    grandchild = psutil.Process(int(helper.stdout.readline()))
    stop_group(helper, grace_s=2)
    assert helper.poll() is not None
    try:  # the SIGKILL is delivered asynchronously: wait for it (bounded), do not sleep
        grandchild.wait(timeout=10)
    except psutil.TimeoutExpired:
        assert grandchild.status() == psutil.STATUS_ZOMBIE, "a helper's child survived stop_group"
    except psutil.NoSuchProcess:
        pass


def test_a_bench_past_its_time_limit_is_interrupted_and_its_helper_stopped(tmp_path, monkeypatch):
    """bench/run's time limit SIGINTs the bench; its cleanup stops its helper; nothing is left."""
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "slow_bench.py").write_text(
        "import subprocess, sys, time\n"
        "from bench.helpers import interrupt_on_sigterm, start_group, stop_group\n"
        "interrupt_on_sigterm()\n"
        "helper = start_group([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        "try:\n    print('started', flush=True)\n    time.sleep(120)\nfinally:\n    stop_group(helper)\n")
    monkeypatch.setattr(runner, "ROOT", tmp_path)
    run_id = uuid.uuid4().hex
    env = {**os.environ, "PYTHONPATH": str(RUNNER.parents[1]), runner.RUN_TAG: run_id}
    run = runner.run_bench("slow", 3.0, env)
    assert run.code == "timeout" and run.result is None
    assert "started" in run.tail
    assert runner.leftover_processes(run_id) == []


def test_quick_report_fails_on_a_broken_bench_or_a_process_left():
    ok = runner.BenchRun("worker", {"ratio": 0.1}, 0, 5.0, "", "now")
    broken = runner.BenchRun("sweeper", None, 1, 5.0, "Traceback ...", "now")
    assert runner.quick_report({"worker": ok}, []) == 0
    assert runner.quick_report({"worker": ok, "sweeper": broken}, []) == 1
    assert runner.quick_report({"worker": ok}, ["pid 1 (x)"]) == 1


def test_capacity_rows_compare_prediction_and_measurement_against_the_25_percent_goal():
    result = {"bench": "capacity", "calibration": {"fanout_items_per_s": 90.0, "worker_items_per_s": 30.0},
              "jobs": [{"upcs": 5000, "measured_s": 200.0, "predicted_s": 220.0, "error": 0.1},
                       {"upcs": 20000, "measured_s": 600.0, "predicted_s": 900.0, "error": 0.5}],
              "goal_abs_error": 0.25, "load_before": [3.0, 2.0, 1.0]}
    rows = runner.rows_for("capacity", result)
    assert [r[3] for r in rows] == ["1.10", "1.50"]
    assert rows[0][4].endswith("ok") and rows[1][4].endswith("MISSED")
    assert runner.SCRIPTS["capacity"] == "capacity_validation.py" and "capacity" in runner.BENCHES
