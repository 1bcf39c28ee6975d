"""Issue 8 on the full local stack: the `upcfan` CLI as an operator runs it (`.venv/bin/upcfan` subprocesses
with `--env-file` naming this stack), its output and its documented exit codes; `status --watch` in a
real terminal under tmux (`capture-pane`), and the same renderables recorded by rich in-process.

Files are uploaded by the CLI itself; scenarios that need failures or a job that stays running use
fresh random UPCs and per-GTIN marketplace faults (merged into the current faults, removed afterwards).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
import requests

from devstack.testing import fresh_upcs, gtin14, operator_headers, poll

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

REPO_ROOT = Path(__file__).resolve().parents[2]
UPCFAN = REPO_ROOT / ".venv" / "bin" / "upcfan"
SMALL_SAMPLE = REPO_ROOT / "samples" / "small-upcs.txt"  # 20 valid, 1 bad check digit, 1 duplicate
FINAL = {"completed", "completed_with_failures", "cancelled", "failed"}
EXIT_OK, EXIT_NOT_FOUND, EXIT_CONFLICT, EXIT_FAILURES, EXIT_FAILED_OR_CANCELLED = 0, 2, 3, 4, 5


class Cli:
    """Runs `.venv/bin/upcfan --env-file <this stack> ...` and returns the CompletedProcess."""

    def __init__(self, env_file: Path, api_url: str) -> None:
        self.env_file = env_file
        self.api_url = api_url.rstrip("/")
        self.env = {k: v for k, v in os.environ.items() if k != "UPCFAN_LOCAL_DIR"}
        self.env.update({"COLUMNS": "200", "NO_COLOR": "1", "PYTHONPATH": str(REPO_ROOT)})

    def argv(self, *args: str) -> list[str]:
        return [str(UPCFAN), "--env-file", str(self.env_file), *args]

    def __call__(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(*args), cwd=REPO_ROOT, env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def submit(self, path: Path, *extra: str) -> str:
        r = self("submit", str(path), *extra)
        assert r.returncode == 0, r.stdout + r.stderr
        return re.search(r"; job (\S+)", r.stdout).group(1)

    def view(self, job_id: str) -> dict | None:
        r = requests.get(f"{self.api_url}/api/batch/status/{job_id}", headers=operator_headers(), timeout=10)
        return r.json() if r.status_code == 200 else None

    def wait(self, job_id: str, statuses=FINAL, timeout_s: float = 120.0) -> dict:
        def reached():
            v = self.view(job_id)
            return v if v and v["status"] in statuses and not v["counts"]["processing"] else None

        return poll(reached, timeout_s, 0.3, f"job {job_id} to reach {statuses}")


@pytest.fixture(scope="module")
def cli(stack_env, tasks_client, tmp_path_factory) -> Cli:
    from google.cloud import tasks_v2

    if not UPCFAN.exists():
        pytest.fail(f"{UPCFAN} is missing: run scripts/bootstrap")
    if tasks_client.get_queue(name=stack_env["UPCFAN_QUEUE"]).state == tasks_v2.Queue.State.PAUSED:
        pytest.fail(f"the item queue {stack_env['UPCFAN_QUEUE']} of this stack is PAUSED (a bench parks tasks "
                    "there), so no job can finish; run on a stack of your own: UPCFAN_LOCAL_DIR=.local/mine")
    env_file = tmp_path_factory.mktemp("cli") / "stack.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in stack_env.items()))
    return Cli(env_file, stack_env["UPCFAN_API_URL"])


@pytest.fixture
def gtin_faults(marketplace):
    """gtin_faults(fail={gtin: status}, latency={gtin: ms}): merged into the current faults; removed at the end."""
    mine: dict[str, set[str]] = {"fail_gtins": set(), "latency_gtins": set()}
    keep = ("error_rate", "latency_ms", "status", "error_after_effect_rate")

    def apply(fail: dict | None = None, latency: dict | None = None) -> None:
        current = marketplace.faults()
        spec = {k: current[k] for k in keep}
        spec["fail_gtins"] = {**current["fail_gtins"], **(fail or {})}
        spec["latency_gtins"] = {**current["latency_gtins"], **(latency or {})}
        mine["fail_gtins"].update(fail or {})
        mine["latency_gtins"].update(latency or {})
        marketplace.faults(**spec)

    yield apply
    current = marketplace.faults()
    spec = {k: current[k] for k in keep}
    for key in ("fail_gtins", "latency_gtins"):
        spec[key] = {g: v for g, v in current[key].items() if g not in mine[key]}
    marketplace.faults(**spec)


def write_upcs(tmp_path: Path, upcs: list[str], extra: list[str] = ()) -> Path:
    path = tmp_path / f"cli-{uuid.uuid4().hex[:10]}.txt"
    path.write_text("\n".join([*upcs, *extra]) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# submit --watch, status, jobs


@pytest.fixture(scope="module")
def small_job(cli) -> tuple[str, subprocess.CompletedProcess]:
    """`upcfan submit samples/small-upcs.txt --handler dry_run --watch` (no marketplace drafts)."""
    r = cli("submit", str(SMALL_SAMPLE), "--handler", "dry_run", "--watch", "--interval", "0.3", timeout=180)
    match = re.search(r"; job (\S+)", r.stdout)
    assert match, r.stdout + r.stderr
    return match.group(1), r


def test_submit_watch_exits_0_and_prints_the_summary(small_job):
    job_id, r = small_job
    assert r.returncode == EXIT_OK, r.stdout + r.stderr
    assert "uploaded gs://" in r.stdout and "small-upcs.txt" in r.stdout
    summary = r.stdout[r.stdout.index(f"summary of {job_id} (completed)"):]
    for col in ("lines", "succeeded", "failed", "invalid", "duplicate", "cancelled"):
        assert col in summary, col
    # lines 22, succeeded 20, failed 0, invalid 1, duplicate 1, cancelled 0
    assert re.search(r"22\s*│\s*20\s*│\s*0\s*│\s*1\s*│\s*1\s*│\s*0", summary), summary


def test_status_json_and_plain(cli, small_job):
    job_id, _ = small_job
    r = cli("status", job_id, "--json")
    assert r.returncode == EXIT_OK, r.stderr
    view = json.loads(r.stdout)
    assert view["job_id"] == job_id and view["status"] == "completed" and view["final"] is True
    assert view["outcome"] == {"lines": 22, "succeeded": 20, "failed": 0, "invalid": 1, "duplicate": 1,
                               "cancelled": 0, "pending": 0}
    assert view["options"] == {"handler": "dry_run"}
    plain = cli("status", job_id)
    assert plain.returncode == EXIT_OK
    assert f"job {job_id}" in plain.stdout and "100.0%" in plain.stdout and "20/20 items" in plain.stdout
    assert "stall: no" in plain.stdout
    # the mode of dropped files (issue 14, defect 9): the local stack deploys marketplace_draft
    assert view["dropped_files"] == {"mode": "live", "default_handler": "marketplace_draft"}
    assert "dropped files: LIVE (default handler marketplace_draft)" in plain.stdout


def test_jobs_lists_the_job(cli, small_job):
    job_id, _ = small_job
    r = cli("jobs", "--limit", "100")
    assert r.returncode == EXIT_OK and "jobs (newest first)" in r.stdout and job_id in r.stdout, r.stdout
    page = json.loads(cli("jobs", "--json", "--status", "completed", "--limit", "100").stdout)
    assert job_id in [j["job_id"] for j in page["jobs"]]
    assert all(j["status"] == "completed" for j in page["jobs"])
    bad = cli("jobs", "--status", "exploded")
    assert bad.returncode == 1 and "status must be one of" in bad.stderr


def test_items_lists_invalid_and_duplicate_lines_with_reasons(cli, small_job):
    job_id, _ = small_job
    r = cli("items", job_id, "--status", "invalid", "--csv")
    assert r.returncode == EXIT_OK, r.stderr
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert len(rows) == 1 and rows[0]["code"] == "bad_check_digit" and "check digit" in rows[0]["reason"]
    dup = list(csv.DictReader(io.StringIO(cli("items", job_id, "--status", "duplicate", "--csv").stdout)))
    assert len(dup) == 1 and dup[0]["outcome"] == "duplicate" and dup[0]["duplicate_of_line"]


def test_submit_deprecated_test_mode_flag_is_still_a_dry_run(cli, tmp_path):
    job_id = cli.submit(write_upcs(tmp_path, fresh_upcs(2)), "--test-mode")
    view = cli.wait(job_id)
    assert view["status"] == "completed" and view["options"] == {"handler": "dry_run"}


def test_submit_unknown_handler_exits_1_naming_the_known_ones(cli, tmp_path):
    r = cli("submit", str(write_upcs(tmp_path, fresh_upcs(1))), "--handler", "nope")
    assert r.returncode == 1 and "unknown handler 'nope'" in r.stderr, r.stdout + r.stderr
    assert "dry_run" in r.stderr and "marketplace_draft" in r.stderr
    assert "uploaded" not in r.stdout


# ---------------------------------------------------------------------------------------------
# failures, retry-failed, cancel, exit codes


def test_failed_items_csv_then_retry_failed(cli, tmp_path, gtin_faults, marketplace):
    upcs = fresh_upcs(5)
    bad = gtin14(upcs[0])
    gtin_faults(fail={bad: 400})
    job_id = cli.submit(write_upcs(tmp_path, upcs))
    r = cli("status", job_id, "--watch", "--json", "--interval", "0.3", timeout=180)
    assert r.returncode == EXIT_FAILURES, r.stdout + r.stderr  # completed_with_failures
    assert json.loads(r.stdout)["outcome"]["failed"] == 1

    r = cli("items", job_id, "--status", "failed", "--csv")
    assert r.returncode == EXIT_OK, r.stderr
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert [row["gtin"] for row in rows] == [bad]
    assert rows[0]["status"] == "failed" and rows[0]["error_code"]
    assert "rejects this product" in rows[0]["error_message"]
    assert list(rows[0]) == ["gtin", "upc", "line", "status", "round", "attempt", "error_code", "error_message"]

    # Still failing in round 2: the CLI follows the round and exits 4 again; only that item ran again.
    r = cli("retry-failed", job_id, "--watch", "--interval", "0.3", timeout=180)
    assert r.returncode == EXIT_FAILURES, r.stdout + r.stderr
    assert f"retry round 2 started for {job_id}: 1 failed items queued, 1 tasks created" in r.stdout
    assert f"summary of {job_id} (completed_with_failures)" in r.stdout
    items = json.loads(cli("items", job_id, "--json").stdout)["items"]
    assert {i["gtin"]: i["round"] for i in items} == {**{gtin14(u): 1 for u in upcs[1:]}, bad: 2}
    for u in upcs[1:]:
        assert len(marketplace.listings(gtin14(u))) == 1


def test_refused_retry_exits_3_and_unknown_job_exits_2(cli, small_job):
    job_id, _ = small_job
    r = cli("retry-failed", job_id)  # nothing failed
    assert r.returncode == EXIT_CONFLICT and "no failed items" in r.stderr, r.stdout + r.stderr
    r = cli("cancel", job_id)  # finished
    assert r.returncode == EXIT_CONFLICT and "cannot be cancelled" in r.stderr
    for command in ("pause", "resume"):  # finished
        r = cli(command, job_id)
        assert r.returncode == EXIT_CONFLICT and "completed; only a" in r.stderr, (command, r.stdout, r.stderr)
    missing = f"no-such-job-{uuid.uuid4().hex[:8]}"
    for args in (("status", missing), ("status", missing, "--json"), ("items", missing),
                 ("cancel", missing), ("retry-failed", missing), ("pause", missing), ("resume", missing)):
        r = cli(*args)
        assert r.returncode == EXIT_NOT_FOUND, (args, r.stdout, r.stderr)
        assert missing in r.stderr and "not found" in r.stderr
    assert cli("frobnicate").returncode == 1  # usage error is 1, never the "not found" 2


def test_cancel_is_idempotent_and_exits_5_when_watched(cli, tmp_path, gtin_faults):
    upcs = fresh_upcs(6)
    # One item's marketplace calls outlast the handler's read timeout, so it fails retryably attempt
    # after attempt and the job runs until it is cancelled, however slow the CLI calls are (a 24 s slow
    # item once lost this race to the job's completion under a load of 13 on 2 cores).
    from shared.handlers.marketplace_draft import READ_TIMEOUT_S

    gtin_faults(latency={gtin14(upcs[0]): int((READ_TIMEOUT_S + 5) * 1000)})
    job_id = cli.submit(write_upcs(tmp_path, upcs))
    cli.wait(job_id, {"running"}, 120)
    paused = cli("pause", job_id, "--reason", "look first")  # issue 15: a paused job can be cancelled
    assert paused.returncode == EXIT_OK and f"job {job_id} paused" in paused.stdout, paused.stdout + paused.stderr
    shown = cli("status", job_id)
    assert shown.returncode == EXIT_OK and "PAUSED (operator): look first" in shown.stdout, shown.stdout
    first = cli("cancel", job_id)
    assert first.returncode == EXIT_OK and f"job {job_id} cancelled" in first.stdout, first.stdout + first.stderr
    again = cli("cancel", job_id)
    assert again.returncode == EXIT_OK and "already cancelled" in again.stdout
    r = cli("retry-failed", job_id)
    assert r.returncode == EXIT_CONFLICT and "cancelled" in r.stderr
    r = cli("status", job_id, "--watch", "--interval", "0.3", timeout=120)
    assert r.returncode == EXIT_FAILED_OR_CANCELLED and f"summary of {job_id} (cancelled)" in r.stdout


def test_sweep_prints_its_report(cli):
    r = cli("sweep")
    assert r.returncode == EXIT_OK, r.stdout + r.stderr
    assert "sweep at" in r.stdout and "checked" in r.stdout
    report = json.loads(cli("sweep", "--json").stdout)
    assert {"checked", "flagged", "alerted"} <= set(report)


# ---------------------------------------------------------------------------------------------
# status --watch as a human sees it


def test_status_watch_in_a_real_terminal_under_tmux(cli, tmp_path, gtin_faults):
    tmux = shutil.which("tmux")
    if not tmux:
        pytest.skip("tmux is not installed (apt-get install -y tmux); the rich-recording test covers the rendering")
    upcs = fresh_upcs(6)
    gtin_faults(latency={gtin14(upcs[0]): 3000})  # ~12 s: keeps the job running while we look at the bar
    job_id = cli.submit(write_upcs(tmp_path, upcs))
    socket = str(tmp_path / "tmux.sock")  # a private server, its socket removed with tmp_path
    script = tmp_path / "watch.sh"
    script.write_text(
        "#!/bin/sh\n"
        f"cd {REPO_ROOT}\n"
        f"{' '.join(_sh(a) for a in cli.argv('status', job_id, '--watch', '--interval', '0.3'))}\n"
        'echo "EXIT=$?"\n'
        "exec cat\n")  # keeps the pane (and its last screen) until the session is killed
    script.chmod(0o755)
    env = {**cli.env, "TERM": "xterm-256color"}
    env.pop("COLUMNS", None)
    env.pop("NO_COLOR", None)

    def capture() -> str:
        return subprocess.run([tmux, "-S", socket, "capture-pane", "-p", "-t", "watch"], capture_output=True,
                              text=True, timeout=10, env=env).stdout

    subprocess.run([tmux, "-S", socket, "new-session", "-d", "-s", "watch", "-x", "120", "-y", "30", str(script)],
                   check=True, env=env, timeout=10)
    try:
        live = poll(lambda: (lambda s: s if f"job {job_id}" in s and "items" in s else None)(capture()),
                    60, 0.2, "the live status screen")
        assert "queued" in live and "succeeded" in live and "never_claimed" in live
        assert ("━" in live or "%" in live or "planning" in live), live
        done = poll(lambda: (lambda s: s if "EXIT=" in s else None)(capture()), 120, 0.3, "the watch to end")
        assert "EXIT=0" in done and f"summary of {job_id} (completed)" in done, done
        assert "100.0%" in done and "6/6 items" in done, done
    finally:
        subprocess.run([tmux, "-S", socket, "kill-server"], capture_output=True, timeout=10, env=env)


def _sh(arg: str) -> str:
    return "'" + arg.replace("'", "'\\''") + "'"


def test_status_rendering_recorded_by_rich(cli, small_job):
    """The same renderables `status --watch` redraws, recorded by rich (no terminal needed)."""
    from rich.console import Console

    from upcfan_cli.main import render_status, render_summary

    job_id, _ = small_job
    view = json.loads(cli("status", job_id, "--json").stdout)
    console = Console(record=True, width=120, force_terminal=True, color_system="truecolor")
    console.print(render_status(view))
    console.print(render_summary(view))
    text = console.export_text(clear=False)
    assert f"job {job_id}" in text and "completed" in text and "100.0%" in text and "20/20 items" in text
    assert "━" in text  # the progress bar
    assert re.search(r"queued\s+processing\s+succeeded\s+failed\s+cancelled\s+never_claimed\s+invalid\s+duplicate",
                     text), text
    assert "stall: no" in text and f"summary of {job_id} (completed)" in text
    assert "\x1b[" in console.export_text(styles=True, clear=False)  # colours when the terminal has them
    svg = console.export_svg(title="upcfan status")
    assert svg.startswith("<svg") and "small-upcs" in svg
