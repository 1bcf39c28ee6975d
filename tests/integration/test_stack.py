"""The local stack keeps its contract: emulators, finalize → CloudEvent, tasks → worker, clean shutdown."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import psutil
import pytest
import requests

from devstack.testing import component_env, operator_headers, poll
from shared.envfile import read_env_file

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
CONTRACT_KEYS = (
    "GOOGLE_CLOUD_PROJECT", "FIRESTORE_EMULATOR_HOST", "STORAGE_EMULATOR_HOST", "CLOUD_TASKS_EMULATOR_HOST",
    "CLOUD_TASKS_EMULATOR_GRPC_HOST", "PUBSUB_EMULATOR_HOST", "UPCFAN_BUCKET", "UPCFAN_QUEUE", "UPCFAN_API_URL", "UPCFAN_INGEST_URL",
    "UPCFAN_WORKER_URL", "UPCFAN_SWEEPER_URL", "UPCFAN_SLACK_SINK_URL", "UPCFAN_MARKETPLACE_URL",
    "UPCFAN_OPERATOR_TOKEN", "UPCFAN_SCHEDULER_URL", "UPCFAN_SMALL_ITEM_QUEUE",
)  # fmt: skip


def _attempted(deliveries: list[dict]) -> list[dict]:
    """Deliveries whose first POST to ingest got an HTTP answer."""
    return [d for d in deliveries if any(isinstance(a["status"], int) for a in d["attempts"])]


def test_stack_env_holds_the_contract(stack_env):
    for key in CONTRACT_KEYS:
        assert stack_env.get(key), key
    assert stack_env["GOOGLE_CLOUD_PROJECT"].startswith("demo-")
    assert stack_env["STORAGE_EMULATOR_HOST"].startswith("http://127.0.0.1:")
    assert stack_env["FIRESTORE_EMULATOR_HOST"].startswith("127.0.0.1:")
    assert stack_env["UPCFAN_QUEUE"] == (
        f"projects/{stack_env['GOOGLE_CLOUD_PROJECT']}/locations/{stack_env['UPCFAN_LOCATION']}/queues/upcfan-items"
    )
    for key in ("UPCFAN_API_URL", "UPCFAN_INGEST_URL", "UPCFAN_WORKER_URL", "UPCFAN_SWEEPER_URL"):
        assert stack_env[key].startswith("http://127.0.0.1:"), key


def test_queues_exist_with_the_configured_retry_and_rates(stack_env, tasks_client):
    from shared.config import CONTROL_QUEUE, ITEM_QUEUE, SMALL_ITEM_QUEUE

    for spec, path in ((ITEM_QUEUE, stack_env["UPCFAN_QUEUE"]), (CONTROL_QUEUE, stack_env["UPCFAN_CONTROL_QUEUE"]),
                       (SMALL_ITEM_QUEUE, stack_env["UPCFAN_SMALL_ITEM_QUEUE"])):
        q = tasks_client.get_queue(name=path)
        assert q.retry_config.max_attempts == spec.retry.max_attempts
        assert q.retry_config.max_doublings == spec.retry.max_doublings
        assert q.rate_limits.max_dispatches_per_second == spec.rate.max_dispatches_per_second
        assert q.rate_limits.max_concurrent_dispatches == spec.local_max_concurrent_dispatches


def test_upload_delivers_one_binary_cloudevent_per_finalize(stack_env, upload, bridge):
    bucket, name, gen1 = upload(b"upc\n012345678905\n", metadata={"upcfan-test-mode": "true"})
    first = poll(lambda: _attempted(bridge.deliveries(name)), 30, what=f"a CloudEvent for {name}")
    assert len(first) == 1
    ev = first[0]
    h, body = ev["headers"], ev["body"]
    assert h["ce-specversion"] == "1.0"
    assert h["ce-type"] == "google.cloud.storage.object.v1.finalized"
    assert h["ce-source"] == f"//storage.googleapis.com/projects/_/buckets/{bucket}"
    assert h["ce-subject"] == f"objects/{name}"
    assert h["ce-id"] and h["ce-time"]
    assert h["content-type"] == "application/json"
    assert (body["bucket"], body["name"], body["generation"]) == (bucket, name, gen1)
    assert isinstance(body["generation"], str) and isinstance(body["size"], str)
    assert body["size"] == str(len(b"upc\n012345678905\n"))
    assert body["metadata"] == {"upcfan-test-mode": "true"}
    for field in ("contentType", "md5Hash", "crc32c", "timeCreated", "updated", "metageneration"):
        assert body[field], field
    assert ev["target"].rstrip("/") == stack_env["UPCFAN_INGEST_URL"]

    # A new generation of the same name is a new finalize: exactly one more event.
    _, _, gen2 = upload(b"upc\n036000291452\n", name=name)
    both = poll(lambda: len(_attempted(bridge.deliveries(name))) >= 2 and _attempted(bridge.deliveries(name)), 30,
                what="the second generation's CloudEvent")
    assert sorted(d["generation"] for d in both) == sorted([gen1, gen2])
    assert len({d["id"] for d in both}) == 2
    assert len(bridge.deliveries(name)) == 2  # nothing pending beyond the two finalizes


def test_resumable_upload_is_one_event(stack_env, storage_client, bridge):
    from devstack.testing import unique_name

    blob = storage_client.bucket(stack_env["UPCFAN_BUCKET"]).blob(unique_name("big"), chunk_size=256 * 1024)
    # > 2 chunks of comment lines: the finalize event starts a job with no item, so the 6,000 live items
    # this file once made do not hold the item queue for minutes ahead of the next test's items.
    data = b"".join(b"# %010d\n" % i for i in range(60_000))
    blob.upload_from_string(data, content_type="text/csv")
    got = poll(lambda: _attempted(bridge.deliveries(blob.name)), 30, what="the resumable upload's event")
    assert len(got) == 1 and got[0]["generation"] == str(blob.generation)
    assert got[0]["body"]["size"] == str(len(data))


def test_firestore_reads_and_writes_from_test_and_function(stack_env, firestore_db):
    ref = firestore_db.collection("devstack_smoke").document(uuid.uuid4().hex)
    ref.set({"n": 1, "who": "test"})
    assert ref.get().to_dict() == {"n": 1, "who": "test"}
    ref.delete()
    # The api function process checks Firestore in /health.
    resp = requests.get(f"{stack_env['UPCFAN_API_URL']}/health", headers=operator_headers(stack_env), timeout=30)
    assert resp.status_code == 200, resp.text
    assert resp.json().get("checks", {}).get("firestore") == "ok", resp.text


def test_task_from_official_client_reaches_worker_with_cloudtasks_headers(stack_env, tasks_client):
    from google.cloud import tasks_v2

    from devstack.cloudtasks import client as emu

    queue = stack_env["UPCFAN_QUEUE"]
    task_id = f"devstack-smoke-{uuid.uuid4().hex[:16]}"
    payload = {"job_id": f"no-such-job-{task_id}", "gtin": "00012345678905", "upc": "012345678905", "line": 1, "round": 1}
    tasks_client.create_task(
        parent=queue,
        task=tasks_v2.Task(
            name=f"{queue}/tasks/{task_id}",
            http_request=tasks_v2.HttpRequest(
                http_method=tasks_v2.HttpMethod.POST,
                url=stack_env["UPCFAN_WORKER_URL"] + "/",
                headers={"Content-Type": "application/json"},
                body=json.dumps(payload).encode(),
                # as the product creates its tasks (shared/tasks.py): the worker is private
                oidc_token=tasks_v2.OidcToken(service_account_email=component_env("worker")["UPCFAN_TASK_SERVICE_ACCOUNT"],
                                              audience=stack_env["UPCFAN_WORKER_URL"]),
            ),
        ),
    )
    host = stack_env["CLOUD_TASKS_EMULATOR_HOST"]
    queue_id = queue.rsplit("/", 1)[1]

    def answered():
        return [a for a in emu.attempts(host, queue_id, task_id) if isinstance(a.get("status"), int)]

    got = poll(answered, 30, what="the worker's answer to the task")
    # The worker function answered (any status but the gate's 401/403): the dispatch reached it.
    assert 100 <= got[0]["status"] < 600 and got[0]["status"] not in (401, 403), got[0]
    worker_log = Path(stack_env["UPCFAN_STACK_LOGS"]) / "worker.log"
    assert worker_log.exists()


def test_the_marketplace_key_is_a_local_secret_the_worker_sends(stack_env, upload, firestore_db, marketplace):
    """Issue 14, defect 4: the worker gets the key as deploy mounts it (UPCFAN_MARKETPLACE_API_KEY, from
    .local/secrets.env, worker only); the marketplace requires it, so a live job's listings prove it is sent."""
    from devstack import paths
    from devstack.marketplace import TOKEN_VAR
    from devstack.testing import component_env, fresh_upcs, gtin14
    from shared.model import JOBS
    from shared.naming import job_id_for

    key = read_env_file(paths.SECRETS_ENV)["UPCFAN_MARKETPLACE_API_KEY"]
    assert stat.S_IMODE(paths.SECRETS_ENV.stat().st_mode) == 0o600
    assert key not in paths.STACK_ENV.read_text() and key not in stack_env.values()
    assert component_env("worker")["UPCFAN_MARKETPLACE_API_KEY"] == key
    assert component_env("marketplace")[TOKEN_VAR] == key
    for name in ("ingest", "sweeper", "api"):  # deploy mounts it on the worker only
        assert "UPCFAN_MARKETPLACE_API_KEY" not in component_env(name), name

    before = marketplace.stats()
    upcs = fresh_upcs(3)
    bucket, name, generation = upload("\n".join(upcs) + "\n")  # no metadata: the stack's live default handler
    job_id = job_id_for(bucket, name, generation)
    job = poll(lambda: (lambda d: d if d.get("status", "").startswith("completed") else None)(
        (firestore_db.collection(JOBS).document(job_id).get().to_dict() or {})), 60, 0.2, f"job {job_id} to finish")
    assert job["status"] == "completed", job
    assert marketplace.stats()["unauthorized_calls"] == before["unauthorized_calls"]  # 0 unless a test made one
    for upc in upcs:
        assert len(marketplace.listings(gtin14(upc))) == 1, upc

    # Without the token the same marketplace refuses, and counts it.
    url = stack_env["UPCFAN_MARKETPLACE_URL"]
    assert requests.get(f"{url}/catalog/v1/product/{gtin14(upcs[0])}", timeout=10).status_code == 401
    assert marketplace.stats()["unauthorized_calls"] == before["unauthorized_calls"] + 1
    for log in Path(stack_env["UPCFAN_STACK_LOGS"]).glob("*.log"):
        assert key not in log.read_text(errors="replace"), log


def test_job_notes_reach_slack_through_the_mounted_webhook_secret(stack_env, upload, firestore_db, slack_sink):
    """Issue 14, defect 5: only the sweeper got the webhook in production, so job notes never left. Locally
    each function gets UPCFAN_SLACK_WEBHOOK_URL exactly as deploy mounts it (a secret, from
    .local/secrets.env, on every function), and a finished job's note arrives through it."""
    from devstack import paths
    from devstack.testing import component_env, fresh_upcs
    from infra.model import FUNCTION_SECRETS, SLACK_ENV
    from shared.naming import job_id_for

    webhook = read_env_file(paths.SECRETS_ENV)[SLACK_ENV]
    for name in ("ingest", "worker", "sweeper", "api"):
        assert (SLACK_ENV, "upcfan-slack-webhook") in FUNCTION_SECRETS[name], name
        assert component_env(name)[SLACK_ENV] == webhook, name

    bucket, name, generation = upload("\n".join(fresh_upcs(2)) + "\n", metadata={"upcfan-handler": "dry_run"})
    job_id = job_id_for(bucket, name, generation)
    # Both notes, once each: job-started (ingest, when fan-out is done) and job-finished.
    notes = poll(lambda: [m for m in slack_sink.messages() if job_id in (m.get("text") or "")
                          and not (m.get("text") or "").startswith(f"INFO: upcfan job {job_id} started")], 60, 0.3,
                 f"the job-finished note of {job_id}")
    assert notes[0]["text"].startswith("INFO: upcfan job") and len(notes) == 1, notes
    started = [m for m in slack_sink.messages() if (m.get("text") or "").startswith(f"INFO: upcfan job {job_id} started")]
    assert len(started) == 1 and "items 2" in started[0]["text"], started


def test_scripts_dev_down_leaves_no_process(tmp_path):
    """A private stack (own .local dir, own ports) goes up and down; no process of it survives."""
    env = {k: v for k, v in os.environ.items() if not k.endswith(("_EMULATOR_HOST", "_EMULATOR_GRPC_HOST")) and not k.startswith("UPCFAN_")}
    env["UPCFAN_LOCAL_DIR"] = str(tmp_path / "local")
    env["PYTHONPATH"] = str(REPO_ROOT)
    run = lambda *args: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "devstack", *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=180
    )
    up = run("up", "--skip", "sweeper", "--skip", "api")
    assert up.returncode == 0, up.stdout + up.stderr
    run_dir = tmp_path / "local" / "run"
    recorded = {}
    for f in run_dir.glob("*.pid"):
        info = json.loads(f.read_text())
        recorded[info["pid"]] = info
        for kid in info.get("children", []):
            recorded[kid["pid"]] = kid
    assert len(recorded) >= 9  # 9 components + firebase's java
    assert (tmp_path / "local" / "stack.env").exists()
    secrets_env = tmp_path / "local" / "secrets.env"
    assert stat.S_IMODE(secrets_env.stat().st_mode) == 0o600
    key = read_env_file(secrets_env)["UPCFAN_MARKETPLACE_API_KEY"]
    assert len(key) >= 32 and key not in up.stdout + up.stderr  # `up` prints stack.env, never a secret
    st = run("status")
    assert st.returncode == 0, st.stdout + st.stderr

    down = run("down")
    assert down.returncode == 0, down.stdout + down.stderr
    survivors = []
    for pid, info in recorded.items():
        try:
            p = psutil.Process(pid)
            if abs(p.create_time() - info["create_time"]) < 1.0 and p.status() != psutil.STATUS_ZOMBIE:
                survivors.append((pid, p.cmdline()))
        except psutil.Error:
            pass
    assert survivors == []
    tag = str((tmp_path / "local").resolve())
    tagged = []
    for p in psutil.process_iter(["pid"]):
        try:
            if p.environ().get("UPCFAN_DEVSTACK_ID") == tag and p.status() != psutil.STATUS_ZOMBIE:
                tagged.append(p.pid)
        except psutil.Error:
            pass
    assert tagged == []
    assert not (tmp_path / "local" / "stack.env").exists()
    assert not secrets_env.exists()
    assert run("status").returncode == 1
