"""Operator API entry point: routing, pydantic validation and error mapping, with a fake core."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass

import pytest

from shared import operations
from shared.exceptions import BadRequestError, ConflictError, NotFoundError, SourceObjectNotFoundError
from deployed_env import create_function_app


@dataclass
class FakeSubmit:
    job_id: str
    created: bool
    status: str

    def to_dict(self):
        return {"job_id": self.job_id, "created": self.created, "status": self.status}


class FakeCore:
    """Records calls; jobs named 'missing' are unknown, 'busy' refuses with 409."""

    def __init__(self):
        self.calls: list[tuple] = []
        self.healthy = {"firestore": "ok", "item_queue": "ok"}

    def _job(self, job_id):
        if job_id == "missing":
            raise NotFoundError("job 'missing' not found", code="job_not_found")
        if job_id == "busy":
            raise ConflictError("job 'busy' is still running; retry-failed runs only after the job has finished",
                                code="job_not_final")

    def get_job_status(self, job_id, now=None):
        self.calls.append(("status", job_id))
        self._job(job_id)
        return {"job_id": job_id, "status": "running"}

    def list_jobs(self, limit, status, gcs_path, cursor):
        self.calls.append(("jobs", limit, status, gcs_path, cursor))
        return {"jobs": [], "next_cursor": None}

    def list_items(self, job_id, status, limit, cursor):
        self.calls.append(("items", job_id, status, limit, cursor))
        self._job(job_id)
        return {"job_id": job_id, "items": [], "next_cursor": None}

    def pause_job(self, job_id, actor, reason=None):
        self.calls.append(("pause", job_id, actor, reason))
        self._job(job_id)
        return {"job_id": job_id, "status": "paused", "already_paused": False}

    def resume_job(self, job_id, actor):
        self.calls.append(("resume", job_id, actor))
        self._job(job_id)
        return {"job_id": job_id, "status": "running", "already_running": False}

    def cancel_job(self, job_id, actor):
        self.calls.append(("cancel", job_id, actor))
        self._job(job_id)
        return {"job_id": job_id, "status": "cancelled", "already_cancelled": False}

    def retry_failed(self, job_id, actor):
        self.calls.append(("retry", job_id, actor))
        self._job(job_id)
        return {"job_id": job_id, "round": 2}

    def redrive_job(self, job_id, actor, *, dry_run, limit=1000, cursor=None):
        self.calls.append(("redrive", job_id, actor, dry_run, limit, cursor))
        self._job(job_id)
        return {"job_id": job_id, "dry_run": dry_run, "items": [], "next_cursor": None}

    def submit(self, request, source="http"):
        gcs_path = request.gcs_path
        self.calls.append(("submit", gcs_path, request.handler, request.create_drafts, request.test_mode, source))
        if gcs_path.endswith("/gone.txt"):
            raise SourceObjectNotFoundError(f"{gcs_path} does not exist")
        if gcs_path.endswith("/boom.txt"):
            raise RuntimeError("store down")
        return FakeSubmit("f-123", True, "ingesting")

    def health(self):
        return all(v == "ok" for v in self.healthy.values()), dict(self.healthy)


@pytest.fixture
def core(monkeypatch):
    fake = FakeCore()
    for name in ("get_job_status", "list_jobs", "list_items", "cancel_job", "retry_failed", "submit", "health",
                 "redrive_job", "pause_job", "resume_job"):
        monkeypatch.setattr(operations, name, getattr(fake, name))
    return fake


@pytest.fixture(scope="module")
def client():
    app = create_function_app("api")
    return app.test_client()


def _err(resp):
    body = resp.get_json()
    assert set(body) == {"error"} and {"code", "message"} <= set(body["error"]), body
    return body["error"]


def test_process_returns_202_with_job(client, core):
    resp = client.post("/api/batch/process", json={"gcs_path": "gs://bkt/f.txt", "handler": "marketplace_draft"})
    assert resp.status_code == 202
    assert resp.get_json() == {"job_id": "f-123", "created": True, "status": "ingesting"}
    assert core.calls == [("submit", "gs://bkt/f.txt", "marketplace_draft", None, None, "http")]


def test_process_still_takes_the_deprecated_booleans(client, core):
    resp = client.post("/api/batch/process", json={"gcs_path": "gs://bkt/f.txt", "create_drafts": True,
                                                   "test_mode": False})
    assert resp.status_code == 202
    assert core.calls == [("submit", "gs://bkt/f.txt", None, True, False, "http")]


def test_process_unknown_handler_is_400_listing_the_known_ones(client, core):
    resp = client.post("/api/batch/process", json={"gcs_path": "gs://bkt/f.txt", "handler": "nope"})
    assert resp.status_code == 400
    err = _err(resp)
    assert err["code"] == "unknown_handler" and "'nope'" in err["message"]
    assert "dry_run" in err["message"] and "marketplace_draft" in err["message"]
    assert core.calls == []


def test_process_takes_a_newly_registered_handler_by_name(client, core, monkeypatch):
    from shared.handlers import ItemHandler, registry

    class EchoHandler(ItemHandler):
        name = "echo"

        def handle(self, item):
            return {"echo": item.upc}

    monkeypatch.setattr(registry, "_HANDLERS", dict(registry._HANDLERS))
    registry.register(EchoHandler)
    resp = client.post("/api/batch/process", json={"gcs_path": "gs://bkt/f.txt", "handler": "echo"})
    assert resp.status_code == 202 and core.calls == [("submit", "gs://bkt/f.txt", "echo", None, None, "http")]
    spec = client.get("/openapi.json").get_json()
    handler = spec["paths"]["/api/batch/process"]["post"]["requestBody"]["content"]["application/json"]["schema"][
        "properties"]["handler"]
    assert "echo" in handler["anyOf"][0]["enum"]


@pytest.mark.parametrize("body,needle", [
    ({"create_drafts": True}, "gcs_path"),
    ({"gcs_path": "gs://bkt/f.txt", "test_mode": "maybe"}, "test_mode"),
    ({"gcs_path": "gs://bkt/f.txt", "handler": 5}, "handler"),
    ({"gcs_path": "gs://bkt/f.txt", "generation": 0}, "generation"),
    ([1, 2], "body"),
])
def test_process_validates_body(client, core, body, needle):
    resp = client.post("/api/batch/process", json=body)
    assert resp.status_code == 400
    assert _err(resp)["code"] == "bad_request" and needle in _err(resp)["message"]
    assert core.calls == []


@pytest.mark.parametrize("path", ["/local/file.txt", "s3://b/x", "gs://bkt/.", "gs://bkt/..", "gs://bkt/dir/",
                                  "gs://B/x", "gs://bkt/" + "x" * 1025])
def test_process_refuses_a_path_that_names_no_object(client, core, path):
    """The one gs:// rule (shared.gcs.parse_gcs_path), with its own code."""
    resp = client.post("/api/batch/process", json={"gcs_path": path})
    assert resp.status_code == 400 and _err(resp)["code"] == "bad_gcs_path" and _err(resp)["message"]
    assert core.calls == []


def test_process_malformed_json_is_400(client, core):
    resp = client.post("/api/batch/process", data=b"{not json", content_type="application/json")
    assert resp.status_code == 400 and _err(resp)["code"] == "bad_json"


def test_process_missing_object_is_404_and_unexpected_fault_is_json_500(client, core):
    resp = client.post("/api/batch/process", json={"gcs_path": "gs://bkt/gone.txt"})
    assert resp.status_code == 404 and _err(resp)["code"] == "object_not_found"
    resp = client.post("/api/batch/process", json={"gcs_path": "gs://bkt/boom.txt"})
    assert resp.status_code == 500 and _err(resp)["code"] == "internal"


def test_status_and_unknown_job(client, core):
    assert client.get("/api/batch/status/j1").get_json() == {"job_id": "j1", "status": "running"}
    resp = client.get("/api/batch/status/missing")
    assert resp.status_code == 404 and "missing" in _err(resp)["message"]


def test_jobs_query_is_validated_and_passed(client, core):
    resp = client.get("/api/batch/jobs?limit=5&status=running&gcs_path=gs://bkt/f.txt&cursor=abc")
    assert resp.status_code == 200
    assert core.calls[-1] == ("jobs", 5, "running", "gs://bkt/f.txt", "abc")
    client.get("/api/batch/jobs")
    assert core.calls[-1] == ("jobs", 20, None, None, None)
    for bad in ("limit=0", "limit=101", "limit=x", "status=weird"):
        resp = client.get(f"/api/batch/jobs?{bad}")
        assert resp.status_code == 400, bad
        assert _err(resp)["code"] == "bad_request"


def test_items_route(client, core):
    resp = client.get("/api/batch/jobs/j1/items?status=failed&limit=10")
    assert resp.status_code == 200
    assert core.calls[-1] == ("items", "j1", "failed", 10, None)
    assert client.get("/api/batch/jobs/j1/items?status=invalid").status_code == 200
    assert client.get("/api/batch/jobs/j1/items?status=bogus").status_code == 400
    assert client.get("/api/batch/jobs/missing/items").status_code == 404


def test_cancel_and_retry_map_conflicts_to_409(client, core):
    assert client.post("/api/batch/jobs/j1/cancel").status_code == 200
    resp = client.post("/api/batch/jobs/busy/retry-failed")
    assert resp.status_code == 409
    err = _err(resp)
    assert err["code"] == "job_not_final" and "still running" in err["message"]
    assert client.post("/api/batch/jobs/missing/cancel").status_code == 404


def test_redrive_takes_an_explicit_dry_run_and_the_verified_actor(client, core):
    resp = client.post("/api/batch/jobs/j1/redrive", json={"dry_run": True},
                       headers={"Authorization": _id_token("ops@example.com")})
    assert resp.status_code == 200 and resp.get_json()["dry_run"] is True
    assert core.calls[-1] == ("redrive", "j1", "ops@example.com", True, 1000, None)
    resp = client.post("/api/batch/jobs/j1/redrive", json={"dry_run": False, "limit": 50, "cursor": "000123"})
    assert resp.status_code == 200
    assert core.calls[-1] == ("redrive", "j1", "unauthenticated", False, 50, "000123")


@pytest.mark.parametrize("body,code,needle", [
    (None, "bad_json", "dry_run"),
    ({}, "bad_request", "dry_run"),  # never a default: a bare POST must not re-drive (nor only list)
    ({"dry_run": "yes"}, "bad_request", "dry_run"),
    ({"dry_run": 1}, "bad_request", "dry_run"),
    ({"dry_run": True, "limit": 0}, "bad_request", "limit"),
    ({"dry_run": True, "force": True}, "bad_request", "force"),
    ([True], "bad_request", "body"),
])
def test_redrive_rejects_bad_bodies_with_400(client, core, body, code, needle):
    resp = client.post("/api/batch/jobs/j1/redrive", json=body) if body is not None \
        else client.post("/api/batch/jobs/j1/redrive", data=b"")
    assert resp.status_code == 400, resp.get_data(as_text=True)
    err = _err(resp)
    assert err["code"] == code and needle in err["message"], err
    assert not [c for c in core.calls if c[0] == "redrive"]


def test_redrive_maps_refusals(client, core):
    resp = client.post("/api/batch/jobs/busy/redrive", json={"dry_run": True})
    assert resp.status_code == 409 and _err(resp)["code"] == "job_not_final"
    assert client.post("/api/batch/jobs/missing/redrive", json={"dry_run": True}).status_code == 404
    assert client.get("/api/batch/jobs/j1/redrive").status_code == 405


def test_pause_and_resume_take_the_operator_from_the_token_and_validate_the_reason(client, core):
    auth = {"Authorization": _id_token("ops@example.com")}
    resp = client.post("/api/batch/jobs/j1/pause", headers=auth)
    assert resp.status_code == 200 and resp.get_json()["status"] == "paused"
    assert core.calls[-1] == ("pause", "j1", "ops@example.com", None)
    client.post("/api/batch/jobs/j1/pause", headers=auth, json={"reason": "marketplace maintenance"})
    assert core.calls[-1] == ("pause", "j1", "ops@example.com", "marketplace maintenance")
    assert _err(client.post("/api/batch/jobs/j1/pause", json={"reason": "x" * 501}))["code"] == "bad_request"
    assert _err(client.post("/api/batch/jobs/j1/pause", data="[1]", content_type="application/json"))["code"] == \
        "bad_json"
    assert client.post("/api/batch/jobs/j1/resume", headers=auth).get_json()["status"] == "running"
    assert core.calls[-1] == ("resume", "j1", "ops@example.com")
    assert client.post("/api/batch/jobs/missing/resume").status_code == 404
    assert client.post("/api/batch/jobs/busy/pause").status_code == 409
    assert client.get("/api/batch/jobs?status=paused").status_code == 200


def _id_token(email: str) -> str:
    claims = base64.urlsafe_b64encode(json.dumps({"email": email}).encode()).decode().rstrip("=")
    return f"Bearer h.{claims}.s"


def test_actor_is_the_verified_id_tokens_email_never_a_header(client, core):
    """Issue 14, item 9: the audit actor came from `X-Upcfan-Actor`, which any caller could set."""
    client.post("/api/batch/jobs/j1/retry-failed", headers={"Authorization": _id_token("ops@example.com")})
    assert core.calls[-1] == ("retry", "j1", "ops@example.com")
    client.post("/api/batch/jobs/j1/cancel", headers={"Authorization": _id_token("ops@example.com"),
                                                      "X-Upcfan-Actor": "alice"})
    assert core.calls[-1] == ("cancel", "j1", "ops@example.com")
    # Cloud Run checks X-Serverless-Authorization when both are sent: that is the verified caller.
    client.post("/api/batch/jobs/j1/cancel", headers={"X-Serverless-Authorization": _id_token("run@example.com"),
                                                      "Authorization": _id_token("app@example.com")})
    assert core.calls[-1] == ("cancel", "j1", "run@example.com")
    client.post("/api/batch/jobs/j1/cancel", headers={"X-Upcfan-Actor": "alice"})
    assert core.calls[-1] == ("cancel", "j1", "unauthenticated")


def test_unknown_route_and_wrong_method(client, core):
    resp = client.get("/api/batch/recover/j1")  # deliberately absent
    assert resp.status_code == 404 and _err(resp)["code"] == "not_found"
    assert client.post("/api/batch/recover/j1").status_code == 404
    resp = client.get("/api/batch/jobs/j1/cancel")
    assert resp.status_code == 405 and "POST" in _err(resp)["message"]
    assert client.delete("/api/batch/status/j1").status_code == 405


def test_health_200_and_503_names_failing_part(client, core):
    assert client.get("/health").status_code == 200
    core.healthy["item_queue"] = "unreachable: ServiceUnavailable: connection refused"
    resp = client.get("/health")
    assert resp.status_code == 503
    assert "item_queue" in resp.get_json()["error"]["message"]


@pytest.mark.parametrize("handler,mode", [("marketplace_draft", "live"), ("dry_run", "dry_run")])
def test_health_shows_the_mode_of_dropped_files(client, core, monkeypatch, handler, mode):
    """Issue 14, defect 9: production ran dropped files as a dry run and nothing showed it."""
    from shared.clients import reset_clients

    monkeypatch.setenv("UPCFAN_DEFAULT_HANDLER", handler)
    reset_clients()
    body = client.get("/health").get_json()
    assert (body["mode"], body["default_handler"]) == (mode, handler)
    core.healthy["firestore"] = "unreachable: x"
    assert client.get("/health").get_json()["mode"] == mode
    monkeypatch.undo()
    reset_clients()


def test_openapi_is_served_and_has_no_recover_route(client):
    spec = client.get("/openapi.json").get_json()
    assert spec["openapi"].startswith("3.")
    assert set(spec["paths"]) == {
        "/health", "/openapi.json", "/api/batch/process", "/api/batch/status/{job_id}", "/api/batch/jobs",
        "/api/batch/jobs/{job_id}/items", "/api/batch/jobs/{job_id}/cancel", "/api/batch/jobs/{job_id}/retry-failed",
        "/api/batch/jobs/{job_id}/redrive", "/api/batch/jobs/{job_id}/pause", "/api/batch/jobs/{job_id}/resume",
        "/api/batch/jobs/{job_id}/events", "/api/batch/jobs/{job_id}/results.csv"}
    params = {p["name"]: p for p in spec["paths"]["/api/batch/jobs"]["get"]["parameters"]}
    assert params["limit"]["schema"]["maximum"] == 100
    assert "running" in params["status"]["schema"]["enum"]
    assert not any("recover" in p for p in spec["paths"])
    process = spec["paths"]["/api/batch/process"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert process["required"] == ["gcs_path"] and process["properties"]["gcs_path"]["pattern"].startswith("^gs://")
    assert process["properties"]["handler"]["anyOf"][0]["enum"] == ["dry_run", "marketplace_draft"]
    assert process["properties"]["test_mode"]["deprecated"] and process["properties"]["create_drafts"]["deprecated"]


def test_core_bad_request_maps_to_400(client, core, monkeypatch):
    def bad(**kw):
        raise BadRequestError("cursor 'x' does not name a job", code="bad_cursor")

    monkeypatch.setattr(operations, "list_jobs", bad)
    resp = client.get("/api/batch/jobs?cursor=x")
    assert resp.status_code == 400 and _err(resp)["code"] == "bad_cursor"
