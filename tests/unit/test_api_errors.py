"""Both Cloud Tasks transports' errors take the same path: gRPC raises one class per status
(AlreadyExists, Aborted, InvalidArgument), REST one per HTTP status (Conflict for both 409s, BadRequest
for 400s) with the status in its JSON body. shared.api_errors reads the status either way; create_task,
the retry policy and the stack's queue setup decide on it. And the client factory's gRPC path: one
channel per host, the caller's token on every call."""

from __future__ import annotations

import collections
import dataclasses
import json

import grpc
import pytest
import requests
from google.api_core import exceptions as gexc

from shared import clients, tasks
from shared.api_errors import is_aborted, is_already_exists, rpc_status
from shared.retry import is_contention, is_transient

QUEUE = "projects/demo-unit/locations/us-central1/queues/upcfan-items"
# google.rpc status -> the HTTP status Google's REST front end answers with
HTTP = {"ALREADY_EXISTS": 409, "ABORTED": 409, "INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400,
        "NOT_FOUND": 404, "PERMISSION_DENIED": 403, "UNAUTHENTICATED": 401, "UNAVAILABLE": 503}


def rest_error(status: str | None, http: int = 409, body: bytes | None = None) -> gexc.GoogleAPICallError:
    """The exception the REST transport raises for this answer (google-api-core's own mapping)."""
    http = HTTP.get(status, http)
    response = requests.Response()
    response.status_code = http
    response._content = body if body is not None else json.dumps(
        {"error": {"code": http, "message": f"{status} here", "status": status}}).encode()
    response.request = requests.Request("POST", f"http://127.0.0.1:1/v2/{QUEUE}/tasks").prepare()
    return gexc.from_http_response(response)


def grpc_error(status: str) -> gexc.GoogleAPICallError:
    return gexc.from_grpc_status(grpc.StatusCode[status], f"{status} here")




@pytest.mark.parametrize("status", sorted(HTTP))
def test_one_status_whichever_transport_raised_it(status):
    rest, over_grpc = rest_error(status), grpc_error(status)
    assert rpc_status(rest) == rpc_status(over_grpc) == status
    assert is_already_exists(rest) == is_already_exists(over_grpc) == (status == "ALREADY_EXISTS")
    assert is_aborted(rest) == is_aborted(over_grpc) == (status == "ABORTED")
    assert is_transient(rest) == is_transient(over_grpc)


def test_the_rest_classes_really_are_ambiguous():
    """Why the helper exists: google-api-core maps REST errors by HTTP status only."""
    assert type(rest_error("ALREADY_EXISTS")) is type(rest_error("ABORTED")) is gexc.Conflict
    assert type(rest_error("INVALID_ARGUMENT")) is type(rest_error("FAILED_PRECONDITION")) is gexc.BadRequest
    assert type(grpc_error("ALREADY_EXISTS")) is gexc.AlreadyExists and type(grpc_error("ABORTED")) is gexc.Aborted


def test_aborted_is_transient_contention_over_both_transports():
    for exc in (rest_error("ABORTED"), grpc_error("ABORTED")):
        assert is_transient(exc) and is_contention(exc)
    for exc in (rest_error("ALREADY_EXISTS"), grpc_error("ALREADY_EXISTS")):
        assert not is_transient(exc) and not is_contention(exc)


def test_no_status_to_read():
    assert rpc_status(rest_error(None, body=b"<html>proxy said no</html>")) == ""
    assert rpc_status(rest_error(None, body=b'{"error": {"message": "no status"}}')) == ""
    assert rpc_status(ValueError("not an API error")) == ""
    assert not is_already_exists(rest_error(None, body=b""))


class OneCreate:
    """CloudTasksClient.create_task raising `error` (None: created)."""

    def __init__(self, error: Exception | None):
        self.error = error
        self.calls = 0

    def create_task(self, parent, task):
        self.calls += 1
        if self.error is not None:
            raise self.error
        return task


@pytest.fixture
def fake_client(monkeypatch):
    monkeypatch.setenv("UPCFAN_WORKER_URL", "http://127.0.0.1:9")
    monkeypatch.setattr(tasks, "TASK_API", dataclasses.replace(tasks.TASK_API, initial_s=0.0, max_s=0.0))
    from shared import config

    config.settings.cache_clear()

    def install(error: Exception | None) -> OneCreate:
        client = OneCreate(error)
        monkeypatch.setattr(tasks, "tasks_client", lambda: client)
        return client

    yield install
    config.settings.cache_clear()


def spec() -> tasks.TaskSpec:
    return tasks.TaskSpec(task_id="job-0001-r0", kind=tasks.ITEM_TASK, payload={"job_id": "job"})


@pytest.mark.parametrize("make_error", [rest_error, grpc_error], ids=["rest", "grpc"])
def test_create_task_already_exists_means_enqueued(fake_client, make_error):
    client = fake_client(make_error("ALREADY_EXISTS"))
    assert tasks.create_task(QUEUE, spec()) is False
    assert client.calls == 1  # an answer, not a fault: not retried


@pytest.mark.parametrize("make_error", [rest_error, grpc_error], ids=["rest", "grpc"])
def test_create_task_aborted_is_retried_then_raised_never_taken_for_enqueued(fake_client, make_error):
    error = make_error("ABORTED")
    client = fake_client(error)
    with pytest.raises(gexc.Conflict) as ei:
        tasks.create_task(QUEUE, spec())
    assert ei.value is error and client.calls == tasks.TASK_API.attempts


def test_create_task_created(fake_client):
    client = fake_client(None)
    assert tasks.create_task(QUEUE, spec()) is True and client.calls == 1


# ---------------------------------------------------------------- the gRPC client path

Details = collections.namedtuple("Details", "method timeout metadata credentials wait_for_ready compression")


def intercepted_metadata(credentials, metadata=None) -> list:
    seen = []
    interceptor = clients._bearer_token_interceptor()(credentials)
    interceptor.intercept_unary_unary(lambda details, request: seen.append(details.metadata),
                                      Details("/google.cloud.tasks.v2.CloudTasks/CreateTask", None, metadata,
                                              None, None, None), b"")
    return seen[0]


def test_bearer_token_on_every_grpc_call():
    from google.oauth2.credentials import Credentials

    assert intercepted_metadata(Credentials(token="tok-1")) == [("authorization", "Bearer tok-1")]
    assert intercepted_metadata(Credentials(token="tok-1"), [("x-goog-api-client", "gapic")]) == [
        ("x-goog-api-client", "gapic"), ("authorization", "Bearer tok-1")]


def test_anonymous_calls_carry_no_token():
    from google.auth.credentials import AnonymousCredentials

    assert intercepted_metadata(AnonymousCredentials(), [("x-goog-api-client", "gapic")]) == [
        ("x-goog-api-client", "gapic")]


def test_grpc_host_selects_grpc_one_channel_per_host(monkeypatch):
    monkeypatch.setenv("UPCFAN_OPERATOR_TOKEN", "op-token")
    monkeypatch.delenv("UPCFAN_LOCAL_ACCESS_TOKEN", raising=False)
    clients.reset_clients()
    try:
        a = clients.make_tasks_client("127.0.0.1:1", grpc_host="127.0.0.1:2")
        b = clients.make_tasks_client(grpc_host="127.0.0.1:2")
        rest = clients.make_tasks_client("127.0.0.1:1")
        assert (a.transport.kind, b.transport.kind, rest.transport.kind) == ("grpc", "grpc", "rest")
        assert list(clients._channels) == ["127.0.0.1:2"]  # created on first use, shared afterwards
    finally:
        clients.reset_clients()


def test_tasks_client_follows_the_environment(monkeypatch):
    monkeypatch.setenv("CLOUD_TASKS_EMULATOR_HOST", "127.0.0.1:1")
    monkeypatch.setenv("CLOUD_TASKS_EMULATOR_GRPC_HOST", "127.0.0.1:2")
    clients.reset_clients()
    try:
        assert clients.tasks_client().transport.kind == "grpc"
        monkeypatch.delenv("CLOUD_TASKS_EMULATOR_GRPC_HOST")
        clients.reset_clients()
        assert clients.tasks_client().transport.kind == "rest"
    finally:
        clients.reset_clients()
