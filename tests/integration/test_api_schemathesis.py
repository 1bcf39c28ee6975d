"""Property-based check of the running api function against the OpenAPI document it serves: no 5xx.

Generated inputs alone almost never name anything that exists (every job id is unknown, every
gs:// path is missing), so each operation also runs against real resources: the job of a small
test-mode file uploaded here (path parameter fixed to its id, queries generated), and
`POST /api/batch/process` with generated bodies whose gcs_path names objects in the watched bucket,
that file included, plus fixed hostile object names ('.', '..', percent-escapes, control chars).
"""

from __future__ import annotations

import os

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error

from devstack.testing import operator_headers, poll, unique_name
from shared.naming import job_id_for

# Bounded so the whole run stays well under a minute on the local stack: 7 operations, 4 of them also
# on an existing job and process also in the watched bucket, 12 examples each plus 13 fixed cases
# (~7 s on an idle 2-core machine, ~35 s at load average 19); the timeout only catches a hang.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]
MAX_EXAMPLES = 12
HOSTILE_NAMES = [".", "..", "a/../b", "%2F", "%", "#x", "?x=1", "a b", "\x00", "\x7f", "é/ü", "[a]*", "x" * 1024]


def _api_url(stack_env) -> str:
    env = stack_env if hasattr(stack_env, "get") else {}
    url = env.get("UPCFAN_API_URL") or os.environ.get("UPCFAN_API_URL")
    if not url:
        pytest.fail("stack_env has no UPCFAN_API_URL; is the local stack up (scripts/dev up)?")
    return url.rstrip("/")


@pytest.fixture(scope="module")
def real_job(stack_env, storage_client) -> tuple[str, str]:
    """(object name, job id) of a two-line test-mode file in the watched bucket, once its job exists
    (finished or not: generated cancels may cancel it, which is fine)."""
    bucket = stack_env["UPCFAN_BUCKET"]
    blob = storage_client.bucket(bucket).blob(unique_name("schemathesis", ".txt"))
    blob.metadata = {"upcfan-handler": "dry_run"}
    blob.upload_from_string("036000291452\n4006381333931\n", content_type="text/plain")
    job_id = job_id_for(bucket, blob.name, blob.generation)
    url = _api_url(stack_env)

    def exists():
        r = requests.get(f"{url}/api/batch/status/{job_id}", headers=operator_headers(), timeout=10)
        return r.status_code == 200 and r.json()["status"] != "ingesting"

    poll(exists, 120, 0.3, f"the job {job_id} of the seeded file to be planned")
    return blob.name, job_id


def _run(strategy, url: str) -> None:
    @given(case=strategy)
    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    def check(case):
        case.call_and_validate(base_url=url, headers=operator_headers(), checks=[not_a_server_error], timeout=15)

    check()


def test_api_never_answers_5xx(stack_env, real_job):
    """Every operation of the served schema, with bounded generated inputs; any 5xx fails the test."""
    url = _api_url(stack_env)
    bucket = stack_env["UPCFAN_BUCKET"]
    name, job_id = real_job
    # The API is private (devstack/gate.py): every call, the schema's included, as the local operator.
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json", wait_for_schema=15.0, headers=operator_headers())
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 7  # schemathesis leaves out the schema document itself
    assert "POST /api/batch/process" in {f"{o.method.upper()} {o.path}" for o in operations}
    failures = []
    for operation in operations:
        label = f"{operation.method.upper()} {operation.path}"
        strategies = {"generated": operation.as_strategy()}
        if "{job_id}" in operation.path:
            strategies["existing job"] = operation.as_strategy(path_parameters={"job_id": job_id})
        if operation.path == "/api/batch/process":
            names = st.sampled_from([name, *HOSTILE_NAMES]) | st.text(min_size=1, max_size=60).filter(
                lambda n: "\r" not in n and "\n" not in n)

            def in_bucket(pair):
                case, obj = pair
                case.body = {**(case.body if isinstance(case.body, dict) else {}), "gcs_path": f"gs://{bucket}/{obj}"}
                return case

            strategies["watched bucket"] = st.tuples(operation.as_strategy(), names).map(in_bucket)
        for kind, strategy in strategies.items():
            try:
                _run(strategy, url)
            except Exception as exc:  # collect every failing operation, not only the first
                failures.append(f"{label} ({kind}): {exc}")
        if operation.path == "/api/batch/process":
            for obj in HOSTILE_NAMES:  # each hostile name at least once, whatever hypothesis drew
                case = operation.Case(body={"gcs_path": f"gs://{bucket}/{obj}"}, media_type="application/json")
                try:
                    case.call_and_validate(base_url=url, headers=operator_headers(), checks=[not_a_server_error],
                                           timeout=15)
                except Exception as exc:  # noqa: BLE001
                    failures.append(f"{label} (gs://{bucket}/{obj!r}): {exc}")
    assert not failures, "\n\n".join(failures)
