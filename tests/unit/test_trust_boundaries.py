"""Issue 14, item 9 (trust boundaries): a job is planned only from a configured bucket, and a chunk
task is planned from its job's document, never from the object its payload names."""

from __future__ import annotations


import pytest
from deployed_env import create_function_app

from shared import ingest
from shared.config import settings
from shared.exceptions import ForbiddenError
from shared.model import Job
from shared.payloads import ChunkTask

JOB = {"job_id": "file-abc", "status": "ingesting", "bucket": "upcfan-uploads", "object": "dir/f.txt",
       "generation": "17", "plan": {"format": {"kind": "lines"}}}
CHUNK = {"job_id": "file-abc", "bucket": "upcfan-uploads", "object": "dir/f.txt", "generation": "17", "start": 0,
         "end": 99, "first_line": 1, "index": 0}


@pytest.fixture
def buckets(monkeypatch):
    def configure(watched: str = "", submit: str = "") -> None:
        monkeypatch.setenv("UPCFAN_BUCKET", watched)
        monkeypatch.setenv("UPCFAN_SUBMIT_BUCKETS", submit)
        settings.cache_clear()

    yield configure
    settings.cache_clear()


def test_the_watched_and_submit_buckets_are_allowed(buckets):
    buckets("upcfan-uploads", " upcfan-manual, other ,")
    assert settings().allowed_buckets == ("upcfan-uploads", "upcfan-manual", "other")
    for b in settings().allowed_buckets:
        ingest.check_bucket_allowed(b)


def test_another_bucket_is_403_naming_the_allowed_ones(buckets):
    buckets("upcfan-uploads", "upcfan-manual")
    with pytest.raises(ForbiddenError) as exc:
        ingest.check_bucket_allowed("someone-elses-bucket")
    assert exc.value.http_status == 403 and exc.value.code == "bucket_not_allowed"
    assert "someone-elses-bucket" in exc.value.message
    assert "upcfan-uploads, upcfan-manual" in exc.value.message


def test_no_configured_bucket_accepts_none(buckets):
    buckets()
    with pytest.raises(ForbiddenError, match="no bucket is configured"):
        ingest.check_bucket_allowed("upcfan-uploads")


def test_submit_refuses_before_reading_anything(buckets, monkeypatch):
    """The API's account could read the object: the boundary must hold before any GCS call."""
    buckets("upcfan-uploads")
    monkeypatch.setattr(ingest.GcsObject, "stat", lambda *a, **k: pytest.fail("must not read another bucket"))
    with pytest.raises(ForbiddenError):
        ingest.submit_job("gs://other-bucket/secret.txt")


class _Store:
    def __init__(self, doc: dict) -> None:
        self.doc = doc

    def get_job(self, job_id):
        return Job.from_doc(self.doc, job_id)

    def get_chunk(self, job_id, start):
        return None


@pytest.mark.parametrize("field, value", [("bucket", "other-bucket"), ("object", "dir/other.txt"),
                                          ("generation", "18")])
def test_a_chunk_naming_another_object_than_its_job_is_refused(field, value, monkeypatch):
    monkeypatch.setattr(ingest, "iter_raw_lines", lambda *a, **k: pytest.fail("must not read the payload's object"))
    with pytest.raises(ingest.ChunkPayloadMismatchError) as exc:
        ingest.process_chunk(ChunkTask(**{**CHUNK, field: value}), store=_Store(JOB))
    assert exc.value.code == "bad_payload" and value in exc.value.message and "dir/f.txt" in exc.value.message


def test_a_chunk_reads_the_object_of_its_job_document(monkeypatch):
    read = []
    monkeypatch.setattr(ingest, "iter_raw_lines", lambda read_fn, start, end, first: read.append(
        read_fn.__self__) or iter(()))
    monkeypatch.setattr(ingest, "_record_chunk_done", lambda *a, **k: None)
    monkeypatch.setattr(ingest, "_maybe_finish_fanout", lambda *a, **k: None)
    ingest.process_chunk(ChunkTask(**CHUNK), store=_Store(JOB))
    obj = read[0]
    assert (obj.bucket, obj.name, obj.generation) == ("upcfan-uploads", "dir/f.txt", 17)


def test_the_fanout_route_answers_a_mismatch_200_bad_payload(monkeypatch):
    """200, not a 4xx: Cloud Tasks retries every non-2xx, and the same payload would be refused again."""
    def refuse(chunk):
        raise ingest.ChunkPayloadMismatchError("chunk task of job file-abc names gs://x/y#1, but the job is ...")

    monkeypatch.setattr(ingest, "process_chunk", refuse)
    resp = create_function_app("ingest").test_client().post("/fanout", json=CHUNK)
    assert resp.status_code == 200
    assert resp.get_json()["error"]["code"] == "bad_payload"


def test_a_results_manifest_is_never_taken_for_input(monkeypatch):
    """The product writes `results/{job}.csv` into the watched bucket: its finalize event is ignored and
    a submit of it is refused, or each manifest would start a job whose manifest starts another."""
    from shared import config, ingest
    from shared.exceptions import BadRequestError

    monkeypatch.setenv("UPCFAN_BUCKET", "watched")
    config.settings.cache_clear()
    submitted = []
    monkeypatch.setattr(ingest.GcsObject, "stat", lambda *a, **k: submitted.append(a) or (_ for _ in ()).throw(
        AssertionError("a manifest must not be read")))
    assert ingest.handle_finalize_event({"bucket": "watched", "name": "results/j1.csv", "generation": "1"}) is None
    with pytest.raises(BadRequestError) as exc:
        ingest.submit_job("gs://watched/results/j1.r2.csv")
    assert exc.value.code == "results_manifest" and "results manifest" in exc.value.message
    assert submitted == []
