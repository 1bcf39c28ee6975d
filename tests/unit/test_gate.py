"""The local stand-in for Cloud Run's front end (devstack/gate.py): tokens, audiences, invokers, timeout.

Issue 14, defect 7: task tokens carried `…/fanout` and `…/progress` audiences, which Cloud Run refuses
(401) and no local check noticed; item 3: nothing checked who may invoke which function."""

from __future__ import annotations

import json
import threading
import time

import pytest
from werkzeug.test import Client
from werkzeug.wrappers import Request, Response

from devstack import identity
from devstack.gate import InvokerGate, invokers_of, policy_for
from devstack.stack import FUNCTIONS, local_desired

PORTS = {name: 8100 + i for i, name in enumerate(FUNCTIONS)}
DESIRED = local_desired(PORTS, "us-central1")
WORKER_URL = DESIRED.function_url("worker")
TASKS = DESIRED.sa_email("tasks_invoker")


@Request.application
def echo(request: Request) -> Response:
    """The function: answers with the Authorization header it saw (Cloud Run passes it through)."""
    return Response(json.dumps({"authorization": request.headers.get("Authorization"),
                                "body": request.get_data(as_text=True)}), mimetype="application/json")


def client(function: str = "worker", **kw) -> tuple[Client, list]:
    logged: list = []
    gate = InvokerGate(echo, policy_for(DESIRED, function), log=lambda sev, ev, **f: logged.append((sev, ev, f)), **kw)
    return Client(gate), logged


def bearer(email: str, audience: str, **kw) -> dict[str, str]:
    return {"Authorization": f"Bearer {identity.mint(email, audience, **kw)}"}


def test_a_task_token_for_the_service_url_passes_with_its_header_unchanged():
    c, _ = client()
    headers = bearer(TASKS, WORKER_URL)
    r = c.post("/progress", headers=headers, data="{}")
    assert r.status_code == 200
    assert r.get_json()["authorization"] == headers["Authorization"]


def test_the_service_url_with_a_trailing_slash_is_the_same_audience():
    c, _ = client()
    assert c.post("/", headers=bearer(TASKS, WORKER_URL + "/")).status_code == 200


def test_no_token_is_401_and_logged():
    c, logged = client()
    r = c.post("/")
    assert r.status_code == 401
    assert "invalid_token" in r.headers["WWW-Authenticate"]
    assert logged[0][1] == "invocation_denied" and logged[0][2]["status"] == 401


@pytest.mark.parametrize("header", ["Basic abc", "Bearer ", "Bearer not-a-jwt"])
def test_a_malformed_authorization_is_401(header):
    c, _ = client()
    assert c.post("/", headers={"Authorization": header}).status_code == 401


def test_an_expired_token_is_401():
    c, _ = client()
    r = c.post("/", headers=bearer(TASKS, WORKER_URL, ttl_s=60, now=time.time() - 3600))
    assert r.status_code == 401


@pytest.mark.parametrize("route", ["/progress", "/fanout", "/?x=1"])
def test_an_audience_with_a_path_is_401(route):
    """Defect 7: `aud` = the task URL with its route is not the service URL."""
    c, logged = client()
    r = c.post(route.split("?")[0], headers=bearer(TASKS, WORKER_URL + route))
    assert r.status_code == 401
    assert "audience" in logged[0][2]["reason"]


def test_another_services_audience_is_401():
    c, _ = client()
    assert c.post("/", headers=bearer(TASKS, DESIRED.function_url("ingest"))).status_code == 401


def test_a_custom_audience_is_accepted_when_configured():
    gate = InvokerGate(echo, policy_for(DESIRED, "worker", custom_audiences=("upcfan-worker",)), log=lambda *a, **k: None)
    assert Client(gate).post("/", headers=bearer(TASKS, "upcfan-worker")).status_code == 200


def test_an_access_token_without_audience_is_401():
    c, _ = client()
    assert c.post("/", headers={"Authorization": f"Bearer {identity.mint(TASKS)}"}).status_code == 401


def test_a_caller_without_run_invoker_is_403():
    """The scheduler's account may invoke the sweeper, not the worker."""
    c, logged = client()
    r = c.post("/", headers=bearer(DESIRED.sa_email("scheduler_invoker"), WORKER_URL))
    assert r.status_code == 403
    assert logged[0][2]["email"] == DESIRED.sa_email("scheduler_invoker")


def test_the_operator_may_invoke_every_function():
    for fn in FUNCTIONS:
        c, _ = client(fn)
        assert c.get("/", headers=bearer(identity.OPERATOR_EMAIL, DESIRED.function_url(fn))).status_code == 200


def test_invokers_follow_the_models_run_invoker_grants():
    sa = DESIRED.sa_email
    assert invokers_of(DESIRED, "worker") == {sa("tasks_invoker"), identity.OPERATOR_EMAIL}
    assert invokers_of(DESIRED, "ingest") == {sa("tasks_invoker"), sa("eventarc_invoker"), identity.OPERATOR_EMAIL}
    assert invokers_of(DESIRED, "sweeper") == {sa("scheduler_invoker"), identity.OPERATOR_EMAIL}
    assert invokers_of(DESIRED, "api") == {identity.OPERATOR_EMAIL}


def test_x_serverless_authorization_is_checked_first_and_authorization_passes_through():
    c, _ = client()
    app_header = "Bearer app-level-token"
    r = c.post("/", headers={"X-Serverless-Authorization": bearer(TASKS, WORKER_URL)["Authorization"],
                             "Authorization": app_header})
    assert r.status_code == 200 and r.get_json()["authorization"] == app_header


def test_a_request_past_the_timeout_gets_504_and_the_code_keeps_running():
    finished = threading.Event()

    @Request.application
    def slow(request: Request) -> Response:
        time.sleep(0.5)
        finished.set()
        return Response("done")

    logged: list = []
    gate = InvokerGate(slow, policy_for(DESIRED, "worker"), timeout_s=0.1, pool_size=2,
                       log=lambda sev, ev, **f: logged.append((sev, ev, f)))
    r = Client(gate).post("/", headers=bearer(TASKS, WORKER_URL))
    assert r.status_code == 504
    assert ("ERROR", "request_timeout") == logged[0][:2]
    assert finished.wait(5), "the function's code must keep running after the 504"


def test_a_request_within_the_timeout_gets_the_functions_answer_and_body():
    c, _ = client(timeout_s=5, pool_size=2)
    r = c.post("/", headers=bearer(TASKS, WORKER_URL), data="payload")
    assert r.status_code == 200 and r.get_json()["body"] == "payload"
