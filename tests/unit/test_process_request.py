"""The one "process this file" request: its gs:// rule and handler name, and the ingest trigger's answers for it."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from shared import ingest, operations
from shared.exceptions import BadRequestError
from shared.gcs import parse_gcs_path
from shared.handlers import HandlerChoice
from shared.process_request import ProcessFileRequest
from deployed_env import create_function_app

BAD_PATHS = ["gs://upcfan-uploads/.", "gs://upcfan-uploads/..", "gs://b-1/a\nb", "gs://b-1/a\rb", "gs://\t/x",
             "s3://b/x", "gs://bucket", "gs://bucket/", "gs://bucket/dir/", "gs://ab/x", "gs://Bkt/x",
             "gs://bkt/" + "é" * 513, "/local/file.txt", ""]
GOOD_PATHS = ["gs://bkt/x", "gs://upcfan-uploads/a/../b", "gs://b.k_t-1/é/ü %2F#x?x=1", "gs://bkt/" + "x" * 1024]


@pytest.mark.parametrize("path", BAD_PATHS)
def test_the_request_refuses_exactly_what_parse_gcs_path_refuses(path):
    with pytest.raises(BadRequestError) as rule:
        parse_gcs_path(path)
    with pytest.raises(BadRequestError) as request:
        ProcessFileRequest(gcs_path=path)
    assert rule.value.code == request.value.code == "bad_gcs_path"
    assert request.value.message == rule.value.message


@pytest.mark.parametrize("path", GOOD_PATHS)
def test_the_request_takes_what_parse_gcs_path_takes(path):
    assert parse_gcs_path(path)
    assert ProcessFileRequest(gcs_path=path).gcs_path == path


def test_the_request_carries_its_level_of_the_handler_choice():
    request = ProcessFileRequest(gcs_path="gs://bkt/f.txt", handler="dry_run", create_drafts=True, generation=7)
    assert request.handler_choice == HandlerChoice("dry_run", None, True, source="handler")
    assert request.generation == 7
    assert ProcessFileRequest(gcs_path="gs://bkt/f.txt").handler_choice == HandlerChoice()
    with pytest.raises(BadRequestError) as err:
        ProcessFileRequest(gcs_path="gs://bkt/f.txt", handler="nope")
    assert err.value.code == "unknown_handler"
    for bad in ({"generation": 0}, {"generation": 2**63}, {"handler": 5}, {"test_mode": "maybe"}):
        with pytest.raises(ValidationError):
            ProcessFileRequest.model_validate({"gcs_path": "gs://bkt/f.txt", **bad})


# --- the ingest function's HTTP trigger --------------------------------------------------------------


@pytest.fixture(scope="module")
def client():
    app = create_function_app("ingest")
    return app.test_client()


@pytest.fixture
def submits(monkeypatch):
    calls = []

    def submit(request, source="http"):
        calls.append((request, source))
        return ingest.SubmitResult(job_id="f-1", created=True, status="ingesting", gcs_path=request.gcs_path,
                                   generation=1)

    monkeypatch.setattr(operations, "submit", submit)
    return calls


def test_ingest_trigger_submits_the_request(client, submits):
    resp = client.post("/", json={"gcs_path": "gs://bkt/f.txt", "handler": "marketplace_draft", "test_mode": False})
    assert resp.status_code == 202 and resp.get_json()["job_id"] == "f-1"
    [(request, source)] = submits
    assert source == "http" and request.handler_choice == HandlerChoice("marketplace_draft", False, None)


@pytest.mark.parametrize("body,code,needle", [
    ([1], "bad_json", "JSON object"),
    ({}, "missing_gcs_path", "gcs_path"),
    ({"gcs_path": 5}, "missing_gcs_path", "gcs_path"),
    ({"gcs_path": "gs://bkt/f.txt", "create_drafts": "yes"}, "bad_option", "create_drafts must be true or false"),
    ({"gcs_path": "gs://bkt/f.txt", "test_mode": 1}, "bad_option", "test_mode must be true or false"),
    ({"gcs_path": "gs://bkt/f.txt", "handler": ["dry_run"]}, "bad_option", "handler"),
    ({"gcs_path": "gs://bkt/."}, "bad_gcs_path", "'.'"),
    ({"gcs_path": "s3://b/x"}, "bad_gcs_path", "gs://bucket/object"),
    ({"gcs_path": "gs://bkt/f.txt", "handler": "nope"}, "unknown_handler", "dry_run, marketplace_draft"),
])
def test_ingest_trigger_refuses_bad_requests_with_their_codes(client, submits, body, code, needle):
    resp = client.post("/", json=body)
    assert resp.status_code == 400
    error = resp.get_json()["error"]
    assert error["code"] == code and needle in error["message"], error
    assert submits == []


def test_event_for_an_object_naming_an_unknown_handler_is_acknowledged(client, monkeypatch):
    """Only a new upload (new metadata) can fix it: the event is not retried."""
    def refuse(data, event_id=""):
        raise BadRequestError("object metadata upcfan-handler: unknown handler 'nope'; known handlers: dry_run",
                              code="unknown_handler")

    monkeypatch.setattr(ingest, "handle_finalize_event", refuse)
    headers = {"ce-id": "e-1", "ce-source": "//storage.googleapis.com/projects/_/buckets/bkt", "ce-specversion": "1.0",
               "ce-type": "google.cloud.storage.object.v1.finalized", "ce-subject": "objects/f.txt"}
    resp = client.post("/", json={"bucket": "bkt", "name": "f.txt", "generation": "1"}, headers=headers)
    assert resp.status_code == 200 and "unknown handler 'nope'" in resp.get_json()["ignored"]
