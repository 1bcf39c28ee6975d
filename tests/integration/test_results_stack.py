"""Issue 16, items 2 and 3 on the full local stack: a job of valid, invalid and duplicate lines finishes;
its results task (ingest `/results`, as upcfan-ingest through the GCS gate) writes
gs://{bucket}/results/{job_id}.csv with one row per data line; `upcfan export` prints the same bytes;
the events route lists the job's history from `created` through an operator's pause and resume to
`results_written`, each with its actor.
The module's IAM audit (tests/integration/conftest.py) checks ingest's object create was granted.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
from pathlib import Path

import pytest

from devstack.identity import OPERATOR_EMAIL
from devstack.testing import fresh_upcs, gtin14, poll, wait_job
from shared.model import JOBS
from shared.naming import job_id_for
from shared.results import COLUMNS

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

REPO_ROOT = Path(__file__).resolve().parents[2]
UPCFAN = REPO_ROOT / ".venv" / "bin" / "upcfan"
FAULT_KEYS = ("error_rate", "latency_ms", "status", "error_after_effect_rate")


@pytest.fixture
def slow_gtin(marketplace):
    """slow(gtin, ms): the marketplace answers that GTIN late (this test's entry removed at the end)."""
    mine: list[str] = []

    def slow(gtin: str, ms: int) -> None:
        current = marketplace.faults()
        spec = {k: current[k] for k in FAULT_KEYS}
        marketplace.faults(**spec, fail_gtins=current["fail_gtins"], latency_gtins={**current["latency_gtins"], gtin: ms})
        mine.append(gtin)

    yield slow
    current = marketplace.faults()
    spec = {k: current[k] for k in FAULT_KEYS}
    marketplace.faults(**spec, fail_gtins=current["fail_gtins"],
                       latency_gtins={g: v for g, v in current["latency_gtins"].items() if g not in mine})


def test_a_finished_job_has_its_results_manifest_export_and_history(
        stack_env, operator, upload, storage_client, firestore_db, slack_sink, slow_gtin, tmp_path):
    api = stack_env["UPCFAN_API_URL"].rstrip("/")
    upcs = fresh_upcs(3)
    slow_gtin(gtin14(upcs[1]), 4000)  # keeps the job open while an operator pauses and resumes it
    # Lines: 1-3 items, 4 invalid (letters), 5 a duplicate of line 1, 6 invalid with a quote.
    text = "\n".join([*upcs, "12AB5", upcs[0], '12"AB']) + "\n"
    bucket, name, generation = upload(text, content_type="text/plain")
    job_id = job_id_for(bucket, name, generation)
    poll(lambda: firestore_db.collection(JOBS).document(job_id).get().exists, 60, 0.05, "the job document")
    r = operator.post(f"{api}/api/batch/jobs/{job_id}/pause", json={"reason": "checking the history"}, timeout=30)
    assert r.status_code == 200, r.text
    r = operator.post(f"{api}/api/batch/jobs/{job_id}/resume", timeout=30)
    assert r.status_code == 200, r.text
    job = wait_job(firestore_db, job_id, {"completed", "completed_with_failures"}, timeout_s=180)

    # The manifest lands in the watched bucket; its job status links it.
    status = poll(lambda: (s := operator.get(f"{api}/api/batch/status/{job_id}", timeout=30).json()).get("results")
                  and s, 120, 0.5, "results recorded on the job")
    results = status["results"]
    assert results["path"] == f"gs://{bucket}/results/{job_id}.csv"
    blob = storage_client.bucket(bucket).blob(f"results/{job_id}.csv")
    stored = blob.download_as_text()
    rows = list(csv.reader(io.StringIO(stored)))
    assert rows[0] == list(COLUMNS)
    assert len(rows) - 1 == status["totals"]["lines"] == job["totals"]["lines"] == results["rows"] == 6
    assert results["lines_missing"] == 0
    by_line = {int(r[0]): r for r in rows[1:]}
    assert [by_line[n][3] for n in range(1, 7)] == ["succeeded", "succeeded", "succeeded", "invalid", "duplicate",
                                                    "invalid"]
    assert by_line[1][2] == gtin14(upcs[0]) and by_line[1][6]  # the marketplace's offer id
    assert by_line[5][2] == gtin14(upcs[0]) and by_line[5][4] == "duplicate_in_file"
    assert by_line[6][1] == '12"AB'  # quoted on write, whole on read

    # The job-finished note links it.
    note = poll(lambda: [m for m in slack_sink.messages() if job_id in json.dumps(m) and "INFO" in json.dumps(m)
                         and not (m.get("text") or "").startswith(f"INFO: upcfan job {job_id} started")],
                60, 0.5, "the job-finished note")
    assert results["path"] in json.dumps(note[0])

    # `upcfan export` streams the same CSV from the store.
    env_file = tmp_path / "stack.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in stack_env.items()))
    cli_env = {k: v for k, v in os.environ.items() if k != "UPCFAN_LOCAL_DIR"} | {"COLUMNS": "250", "NO_COLOR": "1"}
    out_file = tmp_path / "export.csv"
    out = subprocess.run([str(UPCFAN), "--env-file", str(env_file), "export", job_id, "-o", str(out_file)],
                         cwd=REPO_ROOT, env=cli_env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out_file.read_text() == stored
    r = operator.get(f"{api}/api/batch/jobs/{job_id}/results.csv", timeout=60)
    assert r.status_code == 200 and r.text == stored

    # The history, oldest first, from created to the manifest, with who did each.
    events = operator.get(f"{api}/api/batch/jobs/{job_id}/events", timeout=30).json()["events"]
    actors = {e["type"]: e["actor"] for e in events}
    types = [e["type"] for e in events]
    for expected in ("created", "planned", "fanout_done", "completed", "job_finished_note", "results_written"):
        assert expected in types, types
    assert types[0] == "created" and types.index("completed") < types.index("results_written")
    assert actors["planned"] == "ingest" and actors["completed"] == "progress_check"
    assert actors["results_written"] == "ingest" and actors["created"].startswith("event:")
    assert actors["paused"] == actors["resumed"] == OPERATOR_EMAIL
    assert types.index("paused") < types.index("resumed") < types.index("completed")
    assert [e["at"] for e in events] == sorted(e["at"] for e in events)

    # Paging with a cursor walks the same history.
    first = operator.get(f"{api}/api/batch/jobs/{job_id}/events?limit=2", timeout=30).json()
    rest = operator.get(f"{api}/api/batch/jobs/{job_id}/events",
                        params={"cursor": first["next_cursor"], "limit": 100}, timeout=30).json()
    assert [e["id"] for e in first["events"] + rest["events"]] == [e["id"] for e in events]
