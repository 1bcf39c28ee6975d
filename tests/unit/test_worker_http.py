"""Worker HTTP entry point: routing, bad JSON, outcome → HTTP mapping (core faked)."""

from __future__ import annotations


import pytest

from shared import progress, worker
from shared.worker import WorkerOutcome
from deployed_env import create_function_app



@pytest.fixture
def client():
    return create_function_app("worker").test_client()


@pytest.mark.parametrize("status", [200, 409, 503])
def test_outcome_maps_to_http(client, monkeypatch, status):
    seen = {}

    def fake(payload, headers, now=None, **kw):
        seen["payload"], seen["headers"] = payload, headers
        return WorkerOutcome(status, {"status": "x", "gtin": payload["gtin"]})

    monkeypatch.setattr(worker, "process_item_delivery", fake)
    resp = client.post("/", json={"gtin": "1"}, headers={"X-CloudTasks-TaskRetryCount": "3"})
    assert resp.status_code == status and resp.get_json() == {"status": "x", "gtin": "1"}
    assert {k.lower(): v for k, v in seen["headers"].items()}["x-cloudtasks-taskretrycount"] == "3"
    if status == 503:
        assert resp.headers["Retry-After"] == "1"


def test_bad_json_is_400(client):
    resp = client.post("/", data=b"{nope", headers={"Content-Type": "application/json"})
    assert resp.status_code == 400 and resp.get_json()["error"]["code"] == "bad_json"


def test_unknown_route_and_method(client):
    assert client.post("/nope", json={}).status_code == 404
    assert client.get("/").status_code == 405


def test_malformed_item_payload_is_200_through_real_core(client):
    resp = client.post("/", json={"job_id": "j"})
    assert resp.status_code == 200 and resp.get_json()["status"] == "bad_payload"


def test_progress_route(client, monkeypatch):
    monkeypatch.setattr(progress, "check_job_progress", lambda job_id: {"job_id": job_id, "completed": True})
    resp = client.post("/progress", json={"job_id": "j1"})
    assert resp.status_code == 200 and resp.get_json() == {"job_id": "j1", "completed": True}
    assert client.post("/progress", json={}).get_json()["status"] == "bad_payload"


def test_progress_store_fault_is_503(client, monkeypatch):
    def boom(job_id):
        raise RuntimeError("firestore down")

    monkeypatch.setattr(progress, "check_job_progress", boom)
    resp = client.post("/progress", json={"job_id": "j1"})
    assert resp.status_code == 503 and "firestore down" in resp.get_json()["error"]["message"]
