"""A handful of hostile files end to end on the local stack: upload → finalize event → job.

Uploaded as dry runs (`upcfan-test-mode: true`) so no marketplace effect happens; the job
document, its `lines` records and its items (born when the worker claims each task) show what
ingest did. Refused files must end `failed` with their code and nothing enqueued; a mixed file
must enqueue exactly its valid unique GTINs.
"""

from __future__ import annotations

import gzip
import time

import pytest

pytestmark = pytest.mark.integration

FINAL = {"completed", "completed_with_failures", "failed", "cancelled"}
DRY = {"upcfan-test-mode": "true"}


def _poll(fn, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}; last: {last!r}")


def _job_id(bucket: str, name: str, generation: str) -> str:
    from shared.naming import job_id_for

    return job_id_for(bucket, name, generation)


def _final_job(db, job_id: str, timeout_s: float = 180) -> dict:
    ref = db.collection("jobs").document(job_id)
    return _poll(lambda: (lambda d: d if d.get("status") in FINAL else None)(ref.get().to_dict() or {}),
                 timeout_s, f"job {job_id} to finish")


def _items(db, job_id: str) -> dict[str, dict]:
    return {s.id: s.to_dict() for s in db.collection("jobs").document(job_id).collection("items").stream()}


def _lines(db, job_id: str) -> dict[int, dict]:
    return {int(s.id): s.to_dict() for s in db.collection("jobs").document(job_id).collection("lines").stream()}


@pytest.mark.parametrize("data,code", [
    (b"", "empty_file"),
    (gzip.compress(b"036000291452\n" * 50), "compressed_file"),
    ("036000291452\n4006381333931\n".encode("utf-16"), "utf16_file"),
    ("# only a comment\n\n   \n".encode(), "no_data_lines"),
])
def test_refused_file_fails_the_job_and_enqueues_nothing(upload, firestore_db, data, code):
    bucket, name, gen = upload(data, metadata=DRY)
    job = _final_job(firestore_db, _job_id(bucket, name, gen))
    assert job["status"] == "failed" and job["error"]["code"] == code, job.get("error")
    assert job["error"]["message"]
    assert not _items(firestore_db, job["job_id"])
    if code != "no_data_lines":  # refused before planning: no chunk task at all
        assert not job.get("chunks_total")


def test_mixed_file_enqueues_exactly_the_valid_unique_gtins(upload, firestore_db):
    rows = [
        "# header comment",
        "036000291452",      # line 2: item
        "4006381333931",     # 3: item
        "036000291453",      # 4: bad_check_digit
        "10036000291458",    # 5: bad_check_digit (GTIN-14)
        "36000291452",       # 6: bad_length
        "7.2E+11",           # 7: scientific_notation
        "00036000291452",    # 8: duplicate of line 2
        "96385074  \t",      # 9: item (trailing whitespace)
        "4006381333931",     # 10: duplicate of line 3
        "---",               # 11: not_digits (used to crash the chunk)
        "",                  # 12: skipped
    ]
    data = b"\xef\xbb\xbf" + "\r\n".join(rows).encode() + b"\r\n"
    bucket, name, gen = upload(data, metadata=DRY)
    job = _final_job(firestore_db, _job_id(bucket, name, gen))
    assert job["status"] == "completed", job
    assert job["options"] == {"handler": "dry_run"}
    assert job["totals"] == {"lines": 10, "items": 3, "invalid": 5, "duplicate": 2, "skipped": 2}
    lines = _lines(firestore_db, job["job_id"])
    assert {n: r["code"] for n, r in lines.items()} == {
        4: "bad_check_digit", 5: "bad_check_digit", 6: "bad_length", 7: "scientific_notation",
        8: "duplicate_in_file", 10: "duplicate_in_file", 11: "not_digits"}
    assert lines[8]["duplicate_of_line"] == 2 and lines[10]["duplicate_of_line"] == 3
    items = _items(firestore_db, job["job_id"])
    assert set(items) == {"00036000291452", "04006381333931", "00000096385074"}
    assert all(i["status"] == "succeeded" and i["round"] == 1 for i in items.values())
    assert {i["line"] for i in items.values()} == {2, 3, 9}


def test_csv_with_quoted_upc_column_end_to_end(upload, firestore_db):
    data = ('sku,"Title",UPC\nA1,"Widget, large","036000291452"\nA2,"x"\nA3,"y",4006381333931\n').encode()
    bucket, name, gen = upload(data, metadata=DRY)
    job = _final_job(firestore_db, _job_id(bucket, name, gen))
    assert job["plan"]["format"]["kind"] == "csv" and job["plan"]["format"]["column"] == 2
    assert job["totals"] == {"lines": 3, "items": 2, "invalid": 1, "duplicate": 0, "skipped": 1}
    assert _lines(firestore_db, job["job_id"])[3]["code"] == "missing_column"
    assert set(_items(firestore_db, job["job_id"])) == {"00036000291452", "04006381333931"}
