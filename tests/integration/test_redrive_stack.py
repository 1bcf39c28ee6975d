"""Issue 15, item 5 on the full local stack: an open item whose task is gone stays `queued` forever (the
job never completes) until an operator re-drives it.

The item is stranded for real: its marketplace calls fail retryably (503 for its GTIN only), so the
worker re-queues it, and its task is then deleted through the Cloud Tasks emulator (as a task ends
when its retries run out or a 409 hand-off ends it). Another item is kept busy (its calls outlast the
handler's read timeout) so the job stays running through both re-drives. Then: the dry run (API and
CLI) lists exactly the stranded item and changes nothing; the re-drive creates `…-r1-d1` in the
item's shard; the item succeeds through that task with one listing; a second re-drive finds nothing;
the `redrive` event names the operator. The module's IAM audit (tests/integration/conftest.py) checks
the api's GetTask was granted.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from devstack.cloudtasks import client as ct
from devstack.identity import OPERATOR_EMAIL
from devstack.testing import fresh_upcs, gtin14, poll
from shared.handlers import marketplace_draft
from shared.model import EVENTS, ITEMS, JOBS
from shared.naming import job_id_for, redrive_task_name_for, task_name_for
from shared.tasks import item_queue_for, task_exists

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

REPO_ROOT = Path(__file__).resolve().parents[2]
UPCFAN = REPO_ROOT / ".venv" / "bin" / "upcfan"
STALLED_CALL_MS = int((marketplace_draft.READ_TIMEOUT_S + 5) * 1000)
FAULT_KEYS = ("error_rate", "latency_ms", "status", "error_after_effect_rate")


@pytest.fixture
def gtin_faults(marketplace):
    """Per-GTIN faults merged into the current ones; this test's removed at the end."""
    mine: dict[str, set[str]] = {"fail_gtins": set(), "latency_gtins": set()}

    def apply(fail: dict | None = None, latency: dict | None = None, clear: list | None = None) -> None:
        current = marketplace.faults()
        spec = {k: current[k] for k in FAULT_KEYS}
        spec["fail_gtins"] = {k: v for k, v in {**current["fail_gtins"], **(fail or {})}.items() if k not in (clear or ())}
        spec["latency_gtins"] = {**current["latency_gtins"], **(latency or {})}
        mine["fail_gtins"].update(fail or {})
        mine["latency_gtins"].update(latency or {})
        marketplace.faults(**spec)

    yield apply
    current = marketplace.faults()
    spec = {k: current[k] for k in FAULT_KEYS}
    for key in ("fail_gtins", "latency_gtins"):
        spec[key] = {g: v for g, v in current[key].items() if g not in mine[key]}
    marketplace.faults(**spec)


def test_a_queued_item_without_a_task_is_listed_redriven_once_and_completes(
        stack_env, operator, upload, gtin_faults, marketplace, tasks_client, firestore_db, tmp_path):
    api = stack_env["UPCFAN_API_URL"].rstrip("/")
    upcs = fresh_upcs(4)
    stuck, busy = gtin14(upcs[0]), gtin14(upcs[1])
    gtin_faults(fail={stuck: 503}, latency={busy: STALLED_CALL_MS})
    bucket, name, generation = upload("\n".join(upcs) + "\n", content_type="text/plain")
    job_id = job_id_for(bucket, name, generation)
    job_ref = firestore_db.collection(JOBS).document(job_id)
    item_ref = job_ref.collection(ITEMS).document(stuck)

    # The stuck item failed retryably at least once and waits, queued, for its task's next attempt.
    def requeued():
        snap = item_ref.get()
        doc = snap.to_dict() if snap.exists else None
        return doc if doc and doc["status"] == "queued" and doc["attempt"] >= 1 else None

    first = poll(requeued, 90, 0.2, f"{stuck} re-queued after a 503")
    assert first["task_name"] == task_name_for(job_id, stuck, 1)
    original = first["task_name"]
    tasks_client.delete_task(name=f"{item_queue_for(original)}/tasks/{original}")
    gtin_faults(clear=[stuck])  # the marketplace is fine again: only the missing task holds the item

    # An attempt in flight at the deletion still completes (and re-queues); then nothing moves it.
    def stranded():
        doc = item_ref.get().to_dict()
        return doc if doc["status"] == "queued" and not task_exists(item_queue_for(original), original) else None

    before = poll(stranded, 60, 0.3, f"{stuck} queued with no task")
    assert job_ref.get().to_dict()["status"] == "running"

    # Dry run over HTTP: exactly the stuck item, with why; nothing written.
    r = operator.post(f"{api}/api/batch/jobs/{job_id}/redrive", json={"dry_run": True}, timeout=60)
    assert r.status_code == 200, r.text
    dry = r.json()
    assert dry["dry_run"] is True and dry["redrive"] is None
    assert [(row["gtin"], row["status"], row["task_name"], row["reason"]) for row in dry["items"]] == [
        (stuck, "queued", original, "queued_without_task")], dry
    assert dry["items"][0]["line"] == 1 and "no longer exists" in dry["items"][0]["why"]
    assert "redrive" not in job_ref.get().to_dict()
    assert item_ref.get().to_dict()["updated_at"] == before["updated_at"]

    # The CLI's dry run, as an operator runs it, lists the same item and exits 0.
    env_file = tmp_path / "stack.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in stack_env.items()))
    cli_env = {k: v for k, v in os.environ.items() if k != "UPCFAN_LOCAL_DIR"} | {"COLUMNS": "250", "NO_COLOR": "1"}
    out = subprocess.run([str(UPCFAN), "--env-file", str(env_file), "redrive", job_id, "--dry-run"], cwd=REPO_ROOT,
                         env=cli_env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert stuck in out.stdout and "1 stranded open item(s)" in out.stdout and "nothing changed" in out.stdout

    # The re-drive: one new task, in the shard its name hashes to; the item succeeds through it.
    r = operator.post(f"{api}/api/batch/jobs/{job_id}/redrive", json={"dry_run": False}, timeout=60)
    assert r.status_code == 200, r.text
    done = r.json()
    new = redrive_task_name_for(job_id, stuck, 1, 1)
    assert done["redrive"] == 1 and done["tasks_created"] == 1 and done["items"][0]["new_task_name"] == new
    item = poll(lambda: (d := item_ref.get().to_dict())["status"] == "succeeded" and d, 90, 0.3,
                f"{stuck} to succeed through {new}")
    assert item["task_name"] == new and item["attempt"] == before["attempt"] + 1
    queue_id = item_queue_for(new).rsplit("/", 1)[-1]
    assert len(ct.attempts(stack_env["CLOUD_TASKS_EMULATOR_HOST"], queue_id, new)) == 1
    assert len(marketplace.listings(stuck)) == 1

    # A second re-drive finds nothing: the busy item has a live task or lease, the stuck one is final.
    r = operator.post(f"{api}/api/batch/jobs/{job_id}/redrive", json={"dry_run": False}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["items"] == [] and r.json()["redrive"] is None, r.json()
    assert job_ref.get().to_dict()["redrive"]["n"] == 1
    events = [e.to_dict() for e in job_ref.collection(EVENTS).stream()]
    assert [(e["actor"], e["details"]["n"], e["details"]["items"]) for e in events if e["type"] == "redrive"] == [
        (OPERATOR_EMAIL, 1, 1)]

    # A finished job is never re-driven.
    assert operator.post(f"{api}/api/batch/jobs/{job_id}/cancel", timeout=60).status_code == 200
    r = operator.post(f"{api}/api/batch/jobs/{job_id}/redrive", json={"dry_run": True}, timeout=60)
    assert r.status_code == 409 and r.json()["error"]["code"] == "job_finished", r.text
