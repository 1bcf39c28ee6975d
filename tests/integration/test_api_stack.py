"""Issue 8 on the full local stack: every operator API endpoint over HTTP (UPCFAN_API_URL), errors included.

Each scenario uploads its own file of fresh random UPCs to the watched bucket (so it runs with
create_drafts=true against the sandbox marketplace) and steers the marketplace per GTIN only
(`fail_gtins`, `latency_gtins`), merged into whatever faults are set and removed afterwards, so
other sessions sharing the stack are not disturbed. Waits are polls with deadlines.
"""

from __future__ import annotations

import uuid

import pytest
import requests

from devstack.cloudtasks import client as ct
from devstack.testing import fresh_upcs, gtin14, operator_session, poll
from shared.handlers import marketplace_draft
from shared.naming import job_id_for, task_name_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

FINAL = {"completed", "completed_with_failures", "cancelled", "failed"}
INVALID_LINE = "036000291453"  # bad check digit (expected 2)
MAX_ROUNDS = 3  # UPCFAN_MAX_RETRY_ROUNDS default


# ---------------------------------------------------------------------------------------------
# helpers


class Api:
    """The private API, called as the local operator."""

    def __init__(self, url: str, env: dict[str, str]) -> None:
        self.url = url.rstrip("/")
        self.session = operator_session(env)

    def get(self, path: str, **kw) -> requests.Response:
        return self.session.get(f"{self.url}{path}", timeout=30, **kw)

    def post(self, path: str, **kw) -> requests.Response:
        return self.session.post(f"{self.url}{path}", timeout=60, **kw)

    def status(self, job_id: str) -> dict:
        r = self.get(f"/api/batch/status/{job_id}")
        assert r.status_code == 200, r.text
        return r.json()

    def items(self, job_id: str, status: str | None = None) -> list[dict]:
        rows, cursor = [], None
        while True:
            params = {"limit": 1000, **({"status": status} if status else {}), **({"cursor": cursor} if cursor else {})}
            r = self.get(f"/api/batch/jobs/{job_id}/items", params=params)
            assert r.status_code == 200, r.text
            rows += r.json()["items"]
            cursor = r.json()["next_cursor"]
            if not cursor:
                return rows

    def wait(self, job_id: str, statuses=FINAL, timeout_s: float = 120.0) -> dict:
        def final():
            r = self.get(f"/api/batch/status/{job_id}")
            if r.status_code == 404:  # the finalize event has not been ingested yet
                return None
            view = r.json()
            return view if view["status"] in statuses and not view["counts"]["processing"] else None

        return poll(final, timeout_s, 0.3, f"job {job_id} to reach {statuses}")


@pytest.fixture(scope="module")
def api(stack_env, tasks_client):
    from google.cloud import tasks_v2

    queue = tasks_client.get_queue(name=stack_env["UPCFAN_QUEUE"])
    if queue.state == tasks_v2.Queue.State.PAUSED:
        pytest.fail(f"the item queue {stack_env['UPCFAN_QUEUE']} of this stack is PAUSED (a bench parks tasks "
                    "there), so no job can finish; run on a stack of your own: UPCFAN_LOCAL_DIR=.local/mine")
    return Api(stack_env["UPCFAN_API_URL"], stack_env)


@pytest.fixture
def gtin_faults(marketplace):
    """gtin_faults(fail={gtin: status}, latency={gtin: ms}): merged into the current faults; removed at the end."""
    mine: dict[str, set[str]] = {"fail_gtins": set(), "latency_gtins": set()}

    def apply(fail: dict | None = None, latency: dict | None = None, clear_fail: list | None = None) -> None:
        current = marketplace.faults()
        spec = {k: current[k] for k in ("error_rate", "latency_ms", "status", "error_after_effect_rate")}
        spec["fail_gtins"] = {**current["fail_gtins"], **(fail or {})}
        spec["latency_gtins"] = {**current["latency_gtins"], **(latency or {})}
        for g in clear_fail or []:
            spec["fail_gtins"].pop(g, None)
        mine["fail_gtins"].update(fail or {})
        mine["latency_gtins"].update(latency or {})
        marketplace.faults(**spec)

    yield apply
    current = marketplace.faults()
    spec = {k: current[k] for k in ("error_rate", "latency_ms", "status", "error_after_effect_rate")}
    for key in ("fail_gtins", "latency_gtins"):
        spec[key] = {g: v for g, v in current[key].items() if g not in mine[key]}
    marketplace.faults(**spec)


# Longer than the marketplace handler's read timeout: an item whose calls take this long never
# succeeds, and keeps its job running (attempt after attempt) until the test cancels it.
STALLED_CALL_MS = int((marketplace_draft.READ_TIMEOUT_S + 5) * 1000)


def upload_job(upload, lines: list[str], **kw) -> str:
    bucket, name, generation = upload("\n".join(lines) + "\n", content_type="text/plain", **kw)
    return job_id_for(bucket, name, generation)


def slack_notes(slack_sink, job_id: str) -> list[dict]:
    return [m for m in slack_sink.messages()
            if (m.get("text") or "").startswith("INFO: upcfan job") and job_id in m["text"]
            and not m["text"].startswith(f"INFO: upcfan job {job_id} started")]  # the job-started note


# ---------------------------------------------------------------------------------------------
# errors and plain endpoints


def test_health_openapi_and_route_errors(api):
    r = api.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "ok", r.text
    assert r.json()["checks"] == {"firestore": "ok", "item_queue": "ok"}
    # the mode of dropped files, as the api function was started with it (issue 14, defect 9)
    assert (r.json()["mode"], r.json()["default_handler"]) == ("live", "marketplace_draft")
    spec = api.get("/openapi.json").json()
    assert {"/api/batch/process", "/api/batch/jobs/{job_id}/retry-failed"} <= set(spec["paths"])
    assert not any("recover" in p for p in spec["paths"])
    r = api.get("/api/batch/recover")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = api.get("/api/batch/process")
    assert r.status_code == 405 and "POST" in r.headers["Allow"] and r.json()["error"]["message"]


@pytest.mark.parametrize("method,path", [
    ("GET", "/api/batch/status/{j}"), ("GET", "/api/batch/jobs/{j}/items"),
    ("POST", "/api/batch/jobs/{j}/cancel"), ("POST", "/api/batch/jobs/{j}/retry-failed")])
def test_unknown_job_is_404_with_a_message(api, method, path):
    job_id = f"no-such-job-{uuid.uuid4().hex[:8]}"
    r = api.session.request(method, f"{api.url}{path.format(j=job_id)}", timeout=30)
    assert r.status_code == 404, r.text
    err = r.json()["error"]
    assert err["code"] == "job_not_found" and job_id in err["message"] and "not found" in err["message"]


@pytest.mark.parametrize("body", [b"{", b"", b"\xff\xfe{", b'{"gcs_path": "gs://upcfan-uploads/x"'])
def test_malformed_json_is_400(api, body):
    r = api.post("/api/batch/process", data=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "bad_json" and "JSON" in r.json()["error"]["message"]


@pytest.mark.parametrize("body,code", [
    ([], "bad_request"), ({"gcs_path": 5}, "bad_request"), ({"gcs_path": "s3://b/x"}, "bad_gcs_path"),
    ({"gcs_path": "gs://upcfan-uploads/x", "create_drafts": "maybe"}, "bad_request"),
    ({"gcs_path": "gs://upcfan-uploads/x", "handler": 5}, "bad_request"),
    ({"gcs_path": "gs://upcfan-uploads/x", "handler": "nope"}, "unknown_handler"),
    # Regression: "." made the storage API answer with the bucket's own metadata -> 500 TypeError.
    ({"gcs_path": "gs://upcfan-uploads/."}, "bad_gcs_path"), ({"gcs_path": "gs://upcfan-uploads/.."}, "bad_gcs_path"),
])
def test_process_rejects_bad_bodies_with_400(api, body, code):
    r = api.post("/api/batch/process", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == code and r.json()["error"]["message"]


def test_process_runs_the_named_handler(api, stack_env, storage_client):
    """An object outside the watched bucket (no event starts it), submitted with `handler`."""
    bucket = storage_client.bucket(stack_env["UPCFAN_BUCKET"] + "-manual")
    if not bucket.exists():
        bucket.create()
    blob = bucket.blob(f"api-handler/{uuid.uuid4().hex}.txt")
    blob.metadata = {"upcfan-handler": "marketplace_draft"}  # the request's name wins over the metadata
    blob.upload_from_string("\n".join(fresh_upcs(3)) + "\n")
    r = api.post("/api/batch/process", json={"gcs_path": f"gs://{bucket.name}/{blob.name}", "handler": "dry_run"})
    assert r.status_code == 202 and r.json()["created"] is True, r.text
    view = api.wait(r.json()["job_id"])
    assert view["status"] == "completed" and view["options"] == {"handler": "dry_run"}


def test_process_refuses_a_bucket_that_is_not_configured_with_403(api, stack_env, storage_client):
    """Issue 14, item 9: POST /api/batch/process planned a file from any bucket the API's account could read."""
    bucket = storage_client.bucket(f"upcfan-elsewhere-{uuid.uuid4().hex[:8]}")
    bucket.create()
    bucket.blob("f.txt").upload_from_string("\n".join(fresh_upcs(2)) + "\n")
    r = api.post("/api/batch/process", json={"gcs_path": f"gs://{bucket.name}/f.txt"})
    assert r.status_code == 403, r.text
    err = r.json()["error"]
    assert err["code"] == "bucket_not_allowed" and bucket.name in err["message"]
    assert stack_env["UPCFAN_BUCKET"] in err["message"] and stack_env["UPCFAN_SUBMIT_BUCKETS"] in err["message"]


def test_process_missing_object_is_404(api, stack_env):
    path = f"gs://{stack_env['UPCFAN_BUCKET']}/missing/{uuid.uuid4().hex}.txt"
    r = api.post("/api/batch/process", json={"gcs_path": path})
    assert r.status_code == 404 and r.json()["error"]["code"] == "object_not_found" and path in r.text


def test_listing_parameters_are_validated(api):
    for params in ({"limit": 0}, {"limit": 101}, {"limit": "x"}, {"status": "exploded"}, {"cursor": "no-such-job"}):
        r = api.get("/api/batch/jobs", params=params)
        assert r.status_code == 400 and r.json()["error"]["message"], (params, r.text)


# ---------------------------------------------------------------------------------------------
# a job end to end over the API


def test_process_status_jobs_and_items_listings(api, upload, stack_env):
    upcs = fresh_upcs(6)
    lines = [upcs[0], INVALID_LINE, *upcs[1:], upcs[0]]  # 8 lines: 6 items, 1 invalid, 1 duplicate
    job_id = upload_job(upload, lines, metadata={"upcfan-test-mode": "true"})
    view = api.wait(job_id)
    assert view["status"] == "completed" and view["final"] is True and view["percent"] == 100.0
    assert view["outcome"] == {"lines": 8, "succeeded": 6, "failed": 0, "invalid": 1, "duplicate": 1,
                               "cancelled": 0, "pending": 0}
    assert view["counts"]["succeeded"] == 6 and view["counts"]["never_claimed"] == 0
    assert view["options"] == {"handler": "dry_run"}  # from the deprecated upcfan-test-mode metadata

    # The HTTP trigger for the same object generation finds the same job.
    r = api.post("/api/batch/process", json={"gcs_path": view["gcs_path"]})
    assert r.status_code == 202 and r.json()["job_id"] == job_id and r.json()["created"] is False

    jobs = api.get("/api/batch/jobs", params={"gcs_path": view["gcs_path"]}).json()
    assert [j["job_id"] for j in jobs["jobs"]] == [job_id] and jobs["next_cursor"] is None
    # Newest first, one per page: following the cursors reaches this job without repeating one.
    walked, cursor = [], None
    while job_id not in walked and len(walked) < 50:
        page = api.get("/api/batch/jobs", params={"limit": 1, "status": "completed",
                                                  **({"cursor": cursor} if cursor else {})}).json()
        assert len(page["jobs"]) == 1 and page["jobs"][0]["status"] == "completed", page
        walked.append(page["jobs"][0]["job_id"])
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert job_id in walked and len(set(walked)) == len(walked)

    items = api.items(job_id)
    assert sorted(i["gtin"] for i in items) == sorted(gtin14(u) for u in upcs)
    assert all(i["status"] == "succeeded" and i["round"] == 1 for i in items)
    two = api.get(f"/api/batch/jobs/{job_id}/items", params={"limit": 2}).json()
    assert len(two["items"]) == 2 and two["next_cursor"] == two["items"][-1]["gtin"]

    invalid = api.items(job_id, "invalid")
    assert [(r["line"], r["raw"], r["code"]) for r in invalid] == [(2, INVALID_LINE, "bad_check_digit")]
    assert "check digit" in invalid[0]["reason"]
    dup = api.items(job_id, "duplicate")
    assert [(r["line"], r["duplicate_of_line"], r["gtin"]) for r in dup] == [(8, 1, gtin14(upcs[0]))]
    assert api.get(f"/api/batch/jobs/{job_id}/items", params={"status": "nope"}).status_code == 400

    # A finished job cannot be cancelled, and with nothing failed there is nothing to retry.
    r = api.post(f"/api/batch/jobs/{job_id}/cancel")
    assert r.status_code == 409 and r.json()["error"]["code"] == "job_finished"
    r = api.post(f"/api/batch/jobs/{job_id}/retry-failed")
    assert r.status_code == 409 and r.json()["error"]["code"] == "nothing_to_retry"


def test_retry_on_a_running_job_is_409_and_cancel_is_idempotent(api, upload, gtin_faults, firestore_db):
    upcs = fresh_upcs(8)
    slow = gtin14(upcs[0])
    # This item's marketplace calls outlast the handler's read timeout, so each of its attempts fails
    # retryably and the job runs for minutes: it surely still runs when the retry and the cancel arrive,
    # however loaded the machine. Waiting for "running" (fan-out done) makes every item count below.
    gtin_faults(latency={slow: STALLED_CALL_MS})
    job_id = upload_job(upload, upcs)
    api.wait(job_id, {"running"}, 120)

    r = api.post(f"/api/batch/jobs/{job_id}/retry-failed")
    assert r.status_code == 409, r.text
    assert r.json()["error"]["code"] == "job_not_final" and "still" in r.json()["error"]["message"]

    first = api.post(f"/api/batch/jobs/{job_id}/cancel", headers={"X-Upcfan-Actor": "alice"})  # ignored
    assert first.status_code == 200, first.text
    assert first.json()["status"] == "cancelled" and first.json()["already_cancelled"] is False
    again = api.post(f"/api/batch/jobs/{job_id}/cancel")
    assert again.status_code == 200 and again.json()["already_cancelled"] is True
    assert again.json()["items_cancelled"] == 0
    # Issue 14, item 9: the audit actor is the verified caller (the operator's token), not the header.
    from devstack.identity import OPERATOR_EMAIL
    from shared.model import EVENTS, JOBS

    events = [e.to_dict() for e in firestore_db.collection(JOBS).document(job_id).collection(EVENTS).stream()]
    assert [e["actor"] for e in events if e["type"] == "cancelled"] == [OPERATOR_EMAIL], events

    view = api.wait(job_id, {"cancelled"}, 60)
    assert view["status"] == "cancelled" and view["outcome"]["pending"] == 0
    assert view["outcome"]["succeeded"] + view["outcome"]["cancelled"] + view["outcome"]["failed"] == 8
    r = api.post(f"/api/batch/jobs/{job_id}/retry-failed")
    assert r.status_code == 409 and r.json()["error"]["code"] == "job_cancelled"


def test_retry_failed_reruns_only_failed_items_once_then_rounds_run_out(
        api, upload, gtin_faults, marketplace, slack_sink, stack_env):
    upcs = fresh_upcs(6)
    ok, flaky, always = upcs[:4], upcs[4], upcs[5]
    g_flaky, g_always = gtin14(flaky), gtin14(always)
    gtin_faults(fail={g_flaky: 400, g_always: 400})
    job_id = upload_job(upload, [*upcs, INVALID_LINE])

    view = api.wait(job_id)
    assert view["status"] == "completed_with_failures", view
    assert view["outcome"] == {"lines": 7, "succeeded": 4, "failed": 2, "invalid": 1, "duplicate": 0,
                               "cancelled": 0, "pending": 0}
    failed = api.items(job_id, "failed")
    assert {i["gtin"] for i in failed} == {g_flaky, g_always}
    for item in failed:
        assert item["error"]["code"] and "rejects this product" in item["error"]["message"], item
    succeeded_before = {i["gtin"]: i for i in api.items(job_id, "succeeded")}
    assert set(succeeded_before) == {gtin14(u) for u in ok}

    # Round 2: the marketplace now accepts the flaky GTIN; only the two failed items run again.
    gtin_faults(clear_fail=[g_flaky])
    r = api.post(f"/api/batch/jobs/{job_id}/retry-failed")
    assert r.status_code == 200, r.text
    assert r.json()["round"] == 2 and r.json()["items_requeued"] == 2 and r.json()["tasks_created"] == 2
    view = api.wait(job_id)
    assert view["status"] == "completed_with_failures" and view["round"] == 2
    assert view["outcome"]["succeeded"] == 5 and view["outcome"]["failed"] == 1
    items = {i["gtin"]: i for i in api.items(job_id)}
    assert items[g_flaky]["status"] == "succeeded" and items[g_flaky]["round"] == 2
    assert items[g_always]["status"] == "failed" and items[g_always]["round"] == 2
    for g, before in succeeded_before.items():  # never re-run: same round, attempt and history
        assert (items[g]["round"], items[g]["attempt"], items[g]["history"]) == \
               (1, before["attempt"], before["history"]), g

    host, queue = stack_env["CLOUD_TASKS_EMULATOR_HOST"], stack_env["UPCFAN_QUEUE"].rsplit("/", 1)[-1]
    for g in (g_flaky, g_always):
        assert len(ct.attempts(host, queue, task_name_for(job_id, g, 2))) == 1
    for g in succeeded_before:
        assert ct.attempts(host, queue, task_name_for(job_id, g, 2)) == []

    # Rounds 3 and 4 fail the same GTIN again; then the rounds are used up.
    for round_ in range(3, MAX_ROUNDS + 2):
        r = api.post(f"/api/batch/jobs/{job_id}/retry-failed")
        assert r.status_code == 200 and r.json()["round"] == round_ and r.json()["items_requeued"] == 1, r.text
        view = api.wait(job_id)
        assert view["round"] == round_ and view["outcome"]["failed"] == 1 and view["outcome"]["succeeded"] == 5
    r = api.post(f"/api/batch/jobs/{job_id}/retry-failed")
    assert r.status_code == 409, r.text
    assert r.json()["error"]["code"] == "retry_rounds_exhausted" and str(MAX_ROUNDS) in r.json()["error"]["message"]
    assert api.status(job_id)["round"] == MAX_ROUNDS + 1

    # Side effects: one listing per succeeded SKU, none for the always-failing one, no duplicates.
    for u in [*ok, flaky]:
        assert len(marketplace.listings(gtin14(u))) == 1, u
    assert marketplace.listings(g_always) == []
    assert marketplace.stats()["listings"] >= 5

    # One job-finished Slack note for the job, however many rounds it ran.
    notes = poll(lambda: slack_notes(slack_sink, job_id), 30, 0.3, f"the job-finished Slack note for {job_id}")
    assert len(notes) == 1 and "completed with failures" in notes[0]["text"] and "failed 2" in notes[0]["text"]


def test_items_listing_follows_cursors_past_one_page(api, upload):
    upcs = fresh_upcs(25)
    job_id = upload_job(upload, upcs, metadata={"upcfan-test-mode": "true"})
    api.wait(job_id)
    seen, cursor = [], None
    while True:
        params = {"limit": 10, **({"cursor": cursor} if cursor else {})}
        page = api.get(f"/api/batch/jobs/{job_id}/items", params=params).json()
        seen += [i["gtin"] for i in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == sorted(gtin14(u) for u in upcs)


# ---------------------------------------------------------------------------------------------
# pause and resume (issue 15: the per-job circuit breaker and its operator actions)


def pause_alerts(slack_sink, job_id: str) -> list[dict]:
    return [m for m in slack_sink.messages()
            if (m.get("text") or "").startswith(f"CRITICAL: upcfan job {job_id} paused")]


def job_events(firestore_db, job_id: str) -> list[dict]:
    from shared.model import EVENTS, JOBS

    return [e.to_dict() for e in firestore_db.collection(JOBS).document(job_id).collection(EVENTS).stream()]


def test_operator_pause_then_resume_completes_the_job(api, upload, gtin_faults, slack_sink, firestore_db):
    from devstack.identity import OPERATOR_EMAIL

    upcs = fresh_upcs(6)
    slow = gtin14(upcs[0])
    gtin_faults(latency={slow: STALLED_CALL_MS})  # keeps the job running until the test is ready
    job_id = upload_job(upload, upcs)
    api.wait(job_id, {"running"}, 120)

    r = api.post(f"/api/batch/jobs/{job_id}/pause", json={"reason": "marketplace maintenance"})
    assert r.status_code == 200, r.text
    assert r.json() == {"job_id": job_id, "status": "paused", "already_paused": False}
    again = api.post(f"/api/batch/jobs/{job_id}/pause")
    assert again.status_code == 200 and again.json()["already_paused"] is True
    view = api.status(job_id)
    assert view["status"] == "paused" and view["final"] is False
    assert view["pause"]["code"] == "operator" and view["pause"]["message"] == "marketplace maintenance"
    assert view["pause"]["actor"] == OPERATOR_EMAIL and view["pause"]["previous_status"] == "running"
    listed = api.get("/api/batch/jobs", params={"status": "paused", "limit": 100}).json()["jobs"]
    assert job_id in [j["job_id"] for j in listed]
    r = api.post(f"/api/batch/jobs/{job_id}/retry-failed")
    assert r.status_code == 409 and r.json()["error"]["code"] == "job_not_final"
    # one alert for the pause (the repeated pause sent none), recorded as the job's pause_note
    alerts = poll(lambda: pause_alerts(slack_sink, job_id) or None, 30, 0.3, "the pause alert")
    assert len(alerts) == 1 and f"upcfan resume {job_id}" in alerts[0]["text"]
    types = [e["type"] for e in job_events(firestore_db, job_id)]
    assert types.count("paused") == 1 and types.count("pause_note") == 1

    # While paused no item finishes: deliveries answer 503 without claiming.
    counts = api.status(job_id)["counts"]
    gtin_faults(latency={slow: 0})
    r = api.post(f"/api/batch/jobs/{job_id}/resume")
    assert r.status_code == 200 and r.json() == {"job_id": job_id, "status": "running", "already_running": False}
    assert api.post(f"/api/batch/jobs/{job_id}/resume").json()["already_running"] is True
    view = api.wait(job_id, FINAL, 240)
    assert view["status"] == "completed", view
    assert view["outcome"]["succeeded"] == 6 and view["outcome"]["failed"] == 0
    assert view["counts"]["succeeded"] >= counts["succeeded"]
    resumed = [e for e in job_events(firestore_db, job_id) if e["type"] == "resumed"]
    assert [e["actor"] for e in resumed] == [OPERATOR_EMAIL]
    r = api.post(f"/api/batch/jobs/{job_id}/pause")
    assert r.status_code == 409 and r.json()["error"]["code"] == "job_finished"


def test_unauthorized_answer_pauses_the_job_once_and_resume_completes_it(
        api, upload, gtin_faults, slack_sink, firestore_db, marketplace):
    """The marketplace refusing our credentials pauses the job at once (one alert); the refused item is
    not failed; after the fault is cleared, resume finishes every item."""
    upcs = fresh_upcs(5)
    refused = gtin14(upcs[2])
    gtin_faults(fail={refused: 401})
    job_id = upload_job(upload, upcs)
    view = api.wait(job_id, {"paused"}, 120)
    assert view["pause"]["code"] == "marketplace_unauthorized", view
    alerts = poll(lambda: pause_alerts(slack_sink, job_id) or None, 30, 0.3, "the pause alert")
    assert len(alerts) == 1 and "marketplace_unauthorized" in alerts[0]["text"]
    events = job_events(firestore_db, job_id)
    assert [e["type"] for e in events].count("paused") == 1
    assert [e["type"] for e in events].count("pause_note") == 1
    item = next(i for i in api.items(job_id) if i["gtin"] == refused)
    assert item["status"] == "queued" and item["error"] is None  # put back, not charged

    gtin_faults(clear_fail=[refused])
    assert api.post(f"/api/batch/jobs/{job_id}/resume").status_code == 200
    view = api.wait(job_id, FINAL, 240)
    assert view["status"] == "completed" and view["outcome"]["succeeded"] == 5, view
    assert len(pause_alerts(slack_sink, job_id)) == 1


def test_max_failed_percent_pauses_a_job_with_too_many_failures(api, stack_env, storage_client, gtin_faults,
                                                                 slack_sink):
    """The job option: 3 of 6 items fail permanently (50 % > 20 %) while one is still open: paused."""
    upcs = fresh_upcs(6)
    gtin_faults(fail={gtin14(u): 400 for u in upcs[:3]}, latency={gtin14(upcs[5]): STALLED_CALL_MS})
    bucket = storage_client.bucket(stack_env["UPCFAN_BUCKET"] + "-manual")
    if not bucket.exists():
        bucket.create()
    blob = bucket.blob(f"api-max-failed/{uuid.uuid4().hex}.txt")
    blob.upload_from_string("\n".join(upcs) + "\n")
    r = api.post("/api/batch/process", json={"gcs_path": f"gs://{bucket.name}/{blob.name}",
                                             "handler": "marketplace_draft", "max_failed_percent": 20})
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    view = api.wait(job_id, {"paused"}, 120)
    assert view["options"] == {"handler": "marketplace_draft", "max_failed_percent": 20}
    assert view["pause"]["code"] == "max_failed_percent" and "more than the job's max_failed_percent of 20%" in \
        view["pause"]["message"], view["pause"]
    poll(lambda: pause_alerts(slack_sink, job_id) or None, 30, 0.3, "the pause alert")
    assert api.post(f"/api/batch/jobs/{job_id}/cancel").json()["status"] == "cancelled"
    bad = api.post("/api/batch/process", json={"gcs_path": f"gs://{bucket.name}/{blob.name}",
                                               "max_failed_percent": 101})
    assert bad.status_code == 400 and "max_failed_percent" in bad.json()["error"]["message"]
