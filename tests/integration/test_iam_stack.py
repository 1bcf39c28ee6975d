"""IAM enforced on the real stack: with one of the model's grants dropped, the call that needs it fails
as Google fails it (PERMISSION_DENIED in the function's own log and in the stack's call log); with the
model's grants, the same scenario passes. One restart of the Cloud Tasks emulator and the GCS gate with
the api's two grants dropped (`UPCFAN_IAM_DROP_GRANTS`, devstack/iam.py), the three denied scenarios, one
restart with the model, the three passing scenarios.

Defects of issue 14 these would have caught: 1 (ingest cannot read tasks: a GTIN repeated in another
chunk; since issue 15 ingest reads no task and holds no viewer grant, so scenario 1 passes either
way and checks just that),
2 (POST /api/batch/process cannot read the bucket), 3 (/health always 503).
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import requests

from devstack import iam, stack
from devstack.testing import bounce_component, fresh_upcs, poll, wait_job
from infra import cli
from shared.model import JOBS, LINES
from shared.naming import job_id_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

DROPPED = ("api:roles/storage.objectViewer:bucket", "api:roles/cloudtasks.viewer:item_queues")
DRY_RUN = {"upcfan-test-mode": "true"}


class PolicySwitch:
    """Restarts the emulator and the gate with some grants dropped (or none), queues recreated."""

    def __init__(self, env: dict[str, str]):
        self.env = env
        self.current: tuple[str, ...] = ()

    def set(self, dropped: tuple[str, ...]) -> None:
        if dropped == self.current:
            return
        extra = {iam.DROP_GRANTS_ENV: ",".join(dropped)}
        for name in ("cloudtasks", "gcs_gate"):
            bounce_component(name, extra_env=extra)
        port = int(self.env["CLOUD_TASKS_EMULATOR_GRPC_HOST"].rsplit(":", 1)[1])
        stack.create_queues(port, self.env["UPCFAN_LOCATION"], self.env["UPCFAN_OPERATOR_TOKEN"])
        self.current = dropped


@pytest.fixture(scope="module")
def policy(stack_env):
    switch = PolicySwitch(stack_env)
    try:
        yield switch
    finally:
        switch.set(())  # the next module runs with the model's grants


def operator_headers(env) -> dict[str, str]:
    return {"Authorization": f"Bearer {env['UPCFAN_OPERATOR_TOKEN']}"}


def log_tail(name: str, since: int) -> str:
    path = stack.paths.log_path(name)
    with open(path, "rb") as fh:
        fh.seek(since)
        return fh.read().decode(errors="replace")


def log_size(name: str) -> int:
    path = stack.paths.log_path(name)
    return path.stat().st_size if path.exists() else 0


def denied_calls(account: str, method: str) -> int:
    return sum(e["count"] for e in iam.read_call_log()
               if e["account"] == account and e["method"] == method and not e["allowed"])


def cross_chunk_duplicate_file(upc: str, other: str) -> str:
    """`upc` on line 1 and again past the first chunk (UPCFAN_CHUNK_BYTES, 256 KiB by default),
    with comment lines (skipped, no task) between: two chunks, one GTIN in both."""
    padding = ("# " + "x" * 125 + "\n") * 2200  # ~282 KB
    return f"{upc}\n{padding}{upc}\n{other}\n"


def task_reads(account: str) -> int:
    """GetTask(FULL) calls by `account`, allowed or denied."""
    return sum(e["count"] for e in iam.read_call_log()
               if e["account"] == account and e["method"] == "cloudtasks.GetTask(FULL)")


def scenario_ingest_reads_a_task_of_another_chunk(granted, env, upload, firestore_db):
    """Defect 1 of issue 14 was ingest's GetTask on AlreadyExists (which line owns a task name). Since
    issue 15 the item document born at fan-out decides it, and ingest holds no viewer grant on the item
    queues: the cross-chunk duplicate is counted exactly and ingest reads no task."""
    upc, other = fresh_upcs(2)
    reads_before = task_reads("ingest")
    bucket, name, generation = upload(cross_chunk_duplicate_file(upc, other), metadata=DRY_RUN)
    job = wait_job(firestore_db, job_id_for(bucket, name, generation), {"completed"})
    assert job["totals"] == {"lines": 3, "items": 2, "invalid": 0, "duplicate": 1, "skipped": 2200}
    dup = [d.to_dict() for d in firestore_db.collection(JOBS).document(job["job_id"]).collection(LINES).stream()]
    # Chunks run concurrently: whichever created the item first owns it; the other line is its duplicate.
    assert [(d["outcome"], {d["line"], d["duplicate_of_line"]}) for d in dup] == [("duplicate", {1, 2202})]
    assert task_reads("ingest") == reads_before


def scenario_api_reads_the_bucket(granted, env, upload, firestore_db):
    """Defect 2: POST /api/batch/process stats and plans the file as upcfan-api."""
    bucket, name, _ = upload("\n".join(fresh_upcs(2)) + "\n", metadata=DRY_RUN)
    gate_before = log_size("gcs_gate")
    r = requests.post(f"{env['UPCFAN_API_URL']}/api/batch/process", json={"gcs_path": f"gs://{bucket}/{name}"},
                      headers=operator_headers(env), timeout=60)
    if not granted:
        assert r.status_code >= 400, r.text
        assert denied_calls("api", "storage.objects.get") > 0  # the gate refused upcfan-api's read
        assert '"principal": "upcfan-api@' in log_tail("gcs_gate", gate_before)
        return
    assert r.status_code in (200, 202), r.text


def scenario_health_reads_the_first_item_queue(granted, env, upload, firestore_db):
    """Defect 3: /health calls GetQueue on the first item queue as upcfan-api."""
    r = requests.get(f"{env['UPCFAN_API_URL']}/health", headers=operator_headers(env), timeout=30)
    if not granted:
        assert r.status_code == 503, r.text
        assert denied_calls("api", "cloudtasks.GetQueue") > 0
        return
    assert r.status_code == 200, r.text


SCENARIOS = {
    "defect1-ingest-get-task": scenario_ingest_reads_a_task_of_another_chunk,
    "defect2-api-reads-bucket": scenario_api_reads_the_bucket,
    "defect3-health-get-queue": scenario_health_reads_the_first_item_queue,
}
# All denied cases first, then all granted ones: two restarts in all.
CASES = [(granted, key) for granted in (False, True) for key in SCENARIOS]


@pytest.mark.parametrize("granted,scenario", CASES,
                         ids=[f"{'granted' if g else 'dropped'}-{k}" for g, k in CASES])
def test_a_missing_grant_fails_as_in_google_cloud(granted, scenario, policy, stack_env, upload, firestore_db):
    policy.set(() if granted else DROPPED)
    SCENARIOS[scenario](granted, stack_env, upload, firestore_db)


def test_audit_of_the_stack_is_clean(stack_env, policy):
    """Every call a function made was granted by the model and is listed in FUNCTION_CALLS (the
    denials above, made under dropped grants, are listed apart)."""
    policy.set(())
    out = io.StringIO()
    code = cli.main(["audit", "--run-dir", str(Path(stack_env["UPCFAN_STACK_LOGS"]).parent / "run")], out=out)
    assert code == 0, out.getvalue()
    assert "upcfan-ingest@" in out.getvalue() and "denied on purpose" in out.getvalue()


def test_grpc_calls_carry_the_callers_identity(stack_env, policy):
    """The stack's clients speak gRPC (production's transport) over a plaintext channel, where the
    official client attaches no credentials: the caller's token travels as call metadata and the
    emulator checks it as over REST (401 → Unauthenticated, 403 → PermissionDenied). Run while the
    module's grants are dropped, so the audit lists these deliberate denials apart."""
    from google.api_core import exceptions as gexc
    from google.auth.credentials import AnonymousCredentials
    from google.oauth2.credentials import Credentials

    from devstack.testing import component_env
    from shared.clients import make_tasks_client

    policy.set(DROPPED)
    grpc_host, queue = stack_env["CLOUD_TASKS_EMULATOR_GRPC_HOST"], stack_env["UPCFAN_QUEUE"]

    def client(credentials):
        return make_tasks_client(credentials=credentials, grpc_host=grpc_host)

    operator = client(Credentials(token=stack_env["UPCFAN_OPERATOR_TOKEN"]))
    assert operator.get_queue(name=queue).name == queue
    with pytest.raises(gexc.Unauthenticated):
        client(AnonymousCredentials()).get_queue(name=queue)
    with pytest.raises(gexc.PermissionDenied) as denied:  # the worker enqueues; it never deletes queues
        worker = client(Credentials(token=component_env("worker")["UPCFAN_LOCAL_ACCESS_TOKEN"]))
        worker.delete_queue(name=queue.rsplit("/", 1)[0] + "/no-such-queue")
    assert "cloudtasks.queues.delete" in denied.value.message
