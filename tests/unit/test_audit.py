"""`python -m infra audit` on a synthetic call log: what it prints and its exit code."""

from __future__ import annotations

import io
import json

from devstack import iam, identity
from devstack.stack import FUNCTIONS, local_desired
from infra import cli


def desired():
    return local_desired({name: 0 for name in FUNCTIONS}, "us-central1")


def write_log(run_dir, lines):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "iam-calls-cloudtasks-1-0.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def line(account, method, resource, allowed=True, role="", missing=(), count=3, dropped=()):
    d = desired()
    email = identity.OPERATOR_EMAIL if account == "operator" else d.sa_email(account)
    return {"component": "cloudtasks", "pid": 1, "principal": email, "account": account, "method": method,
            "resource": resource, "allowed": allowed, "role": role, "missing": list(missing), "count": count,
            "first": 0, "last": 0, "dropped_grants": list(dropped)}


def run_audit(run_dir):
    out = io.StringIO()
    code = cli.main(["audit", "--run-dir", str(run_dir)], out=out)
    return code, out.getvalue()


def test_clean_log_exits_0_and_names_the_granting_role(tmp_path):
    q0 = desired().target_resources("item_queue:0")[0]
    write_log(tmp_path / "run", [
        line("api", "cloudtasks.GetTask", q0, role="roles/cloudtasks.viewer"),
        line("ingest", "cloudtasks.CreateTask", q0, role="roles/cloudtasks.enqueuer"),
        line("api", "cloudtasks.GetQueue", q0, role="roles/cloudtasks.viewer", count=2),
        line("operator", "cloudtasks.PurgeQueue", q0, role=iam.OPERATOR_ROLE),
    ])
    code, out = run_audit(tmp_path / "run")
    assert code == 0, out
    assert "ingest (upcfan-ingest@" in out and "cloudtasks.CreateTask" in out and "cloudtasks.GetTask" in out
    assert "granted by roles/cloudtasks.enqueuer" in out and "granted by roles/cloudtasks.viewer" in out and "x2" in out
    assert "no findings" in out


def test_a_denied_function_call_is_a_finding(tmp_path):
    """Defect 1 at run time: ingest's GetTask refused -> audit exits 1 naming it."""
    q0 = desired().target_resources("item_queue:0")[0]
    write_log(tmp_path / "run", [line("ingest", "cloudtasks.GetTask(FULL)", q0, allowed=False,
                                      missing=("cloudtasks.tasks.get",))])
    code, out = run_audit(tmp_path / "run")
    assert code == 1 and "denied: ingest" in out and "cloudtasks.tasks.get" in out


def test_denials_under_dropped_grants_are_listed_apart(tmp_path):
    q0 = desired().target_resources("item_queue:0")[0]
    write_log(tmp_path / "run", [line("api", "cloudtasks.GetTask", q0, allowed=False,
                                      missing=("cloudtasks.tasks.get",),
                                      dropped=("api:roles/cloudtasks.viewer:item_queues",))])
    code, out = run_audit(tmp_path / "run")
    assert code == 0 and "denied on purpose" in out


def test_a_call_the_model_does_not_grant_or_function_calls_does_not_list_is_a_finding(tmp_path):
    """A function calling something new (e.g. the worker reading a queue) shows up even if allowed locally."""
    d = desired()
    q0, control = d.target_resources("item_queue:0")[0], d.target_resources("control_queue")[0]
    write_log(tmp_path / "run", [
        line("worker", "cloudtasks.GetQueue", q0, role="roles/cloudtasks.viewer"),  # allowed by a modified policy
        line("api", "cloudtasks.ListTasks", control, role="roles/cloudtasks.viewer"),
    ])
    code, out = run_audit(tmp_path / "run")
    assert code == 1
    assert "not granted by the model: worker" in out
    assert "not in infra.permissions.FUNCTION_CALLS['worker']" in out
    assert "not in infra.permissions.FUNCTION_CALLS['api']" in out


def test_no_log_exits_2(tmp_path):
    code, out = run_audit(tmp_path / "none")
    assert code == 2 and "no IAM call log" in out


def test_a_tolerated_library_denial_is_listed_apart(tmp_path):
    """google-cloud-storage reads bucket metadata in the background and tolerates the 403."""
    write_log(tmp_path / "run", [line("ingest", "storage.buckets.get", "projects/_/buckets/upcfan-uploads",
                                      allowed=False, missing=("storage.buckets.get",))])
    code, out = run_audit(tmp_path / "run")
    assert code == 0 and "tolerated by the caller" in out and "_bucket_metadata_cache" in out
