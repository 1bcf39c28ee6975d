"""Task payloads: one model per task kind, shared by the producer and the consumer of the task."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from deployed_env import create_function_app
from shared import ingest
from shared.payloads import ChunkTask, ItemTask, ProgressTask

CHUNK = {"job_id": "file-abc", "bucket": "b", "object": "dir/f.txt", "generation": "17", "start": 0, "end": 99,
         "first_line": 1, "index": 0}


@pytest.mark.parametrize("model, body", [
    (ItemTask, {"job_id": "j-1", "gtin": "00012345678905", "upc": "012345678905", "line": 7, "round": 2}),
    (ChunkTask, CHUNK),
    (ProgressTask, {"job_id": "j-1"}),
])
def test_what_the_producer_writes_the_consumer_reads(model, body):
    task = model(**body)
    assert model.model_validate(task.to_body()) == task
    assert task.to_body() == body


def test_unknown_fields_from_an_older_producer_are_ignored():
    assert ProgressTask.model_validate({"job_id": "j", "window": 3}) == ProgressTask(job_id="j")


@pytest.mark.parametrize("bad", [{**CHUNK, "generation": "latest"}, {**CHUNK, "start": -1}, {**CHUNK, "job_id": "a/b"},
                                 {k: v for k, v in CHUNK.items() if k != "bucket"}])
def test_chunk_task_refuses_what_can_never_run(bad):
    with pytest.raises(ValidationError):
        ChunkTask.model_validate(bad)


@pytest.fixture
def ingest_client():
    return create_function_app("ingest").test_client()


@pytest.mark.parametrize("body", [None, [], {"job_id": "j"}, {**CHUNK, "generation": "latest"}])
def test_malformed_chunk_task_is_200_bad_payload_naming_the_field(ingest_client, monkeypatch, body):
    monkeypatch.setattr(ingest, "process_chunk", lambda *a, **k: pytest.fail("a malformed chunk must not run"))
    resp = ingest_client.post("/fanout", json=body)
    assert resp.status_code == 200  # can never succeed: Cloud Tasks must not retry it
    error = resp.get_json()["error"]
    assert error["code"] == "bad_payload" and "can never succeed" in error["message"]
    if isinstance(body, dict) and "generation" in body:
        assert "generation" in error["message"]


def test_valid_chunk_task_reaches_the_core_as_the_model(ingest_client, monkeypatch):
    seen = []
    monkeypatch.setattr(ingest, "process_chunk", lambda chunk: seen.append(chunk) or ingest.ChunkResult("file-abc", 0))
    assert ingest_client.post("/fanout", json=CHUNK).status_code == 200
    assert seen == [ChunkTask(**CHUNK)]
