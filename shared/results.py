"""The results manifest of a job, like Step Functions' result writer: one CSV row per data line.

Columns: `line,upc,gtin,status,error_code,error_message,offer_id`. A line is an item (its status,
error and offer id), an invalid line or a duplicate (from its line record). Rows are ordered by line:
items are read by their `line` field and line records by their id (`{line:09d}`), a page at a time,
and the two ordered streams are merged, so memory stays bounded by two pages whatever the job's size.

A chunk stores at most `LINE_RECORDS_PER_CHUNK` invalid/duplicate line records (shared/ingest.py);
lines beyond that have no record, so the manifest has no row for them: `lines_missing` (the job's
`totals.lines` minus the rows written) says how many, in the job's `results` field and its
`results_written` event.

When a job finishes, the check that completed it asks for one `results` task (control queue, the
ingest function's `/results`, deterministic name per job and round), which streams the CSV to
`gs://{UPCFAN_BUCKET}/results/{job_id}.csv` (a retry round's: `{job_id}.r{round}.csv`) with a
resumable upload. The object is created only if absent (`if_generation_match=0`), so a repeated task
writes nothing twice and the writer needs `storage.objects.create` alone, never delete.
"""

from __future__ import annotations

import csv
import datetime as dt
import heapq
import io
from typing import IO, Iterable, Iterator

from shared.config import settings
from shared.events import Event
from shared.log import log_event
from shared.model import JobStatus
from shared.store import Store, default_store

COLUMNS = ("line", "upc", "gtin", "status", "error_code", "error_message", "offer_id")
PAGE = 1000  # documents per read, for items and line records alike
RESULTS_PREFIX = "results/"
# The resumable upload sends the CSV in parts of this size (a multiple of 256 KiB, as the API requires);
# the client's default (40 MiB) would hold that much of the file in memory.
UPLOAD_CHUNK_BYTES = 4 * 1024 * 1024
# A cell starting with one of these is read as a formula by spreadsheet programs; raw text from the
# file (an invalid line's UPC, an error message) gets a leading apostrophe (OWASP "CSV Injection").
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")

_COMPLETED = frozenset({JobStatus.COMPLETED.value, JobStatus.COMPLETED_WITH_FAILURES.value})

Row = tuple[int, str, str, str, str, str, str]


def results_object_name(job_id: str, round_: int = 1) -> str:
    return f"{RESULTS_PREFIX}{job_id}.csv" if round_ <= 1 else f"{RESULTS_PREFIX}{job_id}.r{int(round_)}.csv"


def results_gcs_path(job_id: str, round_: int = 1, bucket: str | None = None) -> str:
    return f"gs://{bucket or settings().bucket}/{results_object_name(job_id, round_)}"


def _text(value: object) -> str:
    text = "" if value is None else str(value)
    return "'" + text if text.startswith(_FORMULA_START) else text


def _item_rows(store: Store, job_id: str, page: int) -> Iterator[Row]:
    after: int | None = None
    while True:
        items = store.page_items_by_line(job_id, limit=page, after_line=after)
        for item in items:
            doc = item.doc
            error = doc.get("error") or {}
            result = doc.get("result") or {}
            yield (int(doc.get("line") or 0), _text(doc.get("upc")), item.gtin, item.status,
                   _text(error.get("code")), _text(error.get("message")), _text(result.get("offer_id")))
        if len(items) < page:
            return
        after = int(items[-1].doc.get("line") or 0)


def _line_rows(store: Store, job_id: str, page: int) -> Iterator[Row]:
    after: str | None = None
    while True:
        records = store.page_lines(job_id, limit=page, after_id=after)
        for _id, rec in records:
            yield (int(rec.get("line") or 0), _text(rec.get("raw")), _text(rec.get("gtin")), str(rec.get("outcome") or ""),
                   _text(rec.get("code")), _text(rec.get("reason")), "")
        if len(records) < page:
            return
        after = records[-1][0]


def manifest_rows(job_id: str, *, store: Store | None = None, page: int = PAGE) -> Iterator[Row]:
    """Every row of the manifest, ordered by line, reading `page` documents at a time."""
    store = store or default_store()
    return heapq.merge(_item_rows(store, job_id, page), _line_rows(store, job_id, page), key=lambda r: r[0])


def write_csv(out: IO[str], rows: Iterable[Row]) -> int:
    """The header and `rows` as CSV (RFC 4180 quoting: commas, quotes and newlines in a cell are quoted);
    returns the number of rows."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    n = 0
    for row in rows:
        writer.writerow(row)
        n += 1
    return n


def iter_csv(job_id: str, *, store: Store | None = None, page: int = PAGE) -> Iterator[str]:
    """The manifest as CSV text, a page of rows per piece (for a streamed HTTP answer)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    for i, row in enumerate(manifest_rows(job_id, store=store, page=page), 1):
        writer.writerow(row)
        if i % page == 0:
            yield buf.getvalue()
            buf.seek(0)
            buf.truncate()
    yield buf.getvalue()


def request_results(job_id: str, round_: int) -> str | None:
    """Ask for the job's results task (one per job and round, name-deduplicated). Never raises: the
    manifest can always be streamed from the API (`upcfan export`) if this fails."""
    from shared.naming import results_task_name_for
    from shared.payloads import ResultsTask
    from shared.tasks import RESULTS_TASK, TaskSpec, create_task

    try:
        if not settings().ingest_url:
            log_event("results_skipped", severity="WARNING", job_id=job_id, reason="UPCFAN_INGEST_URL not set")
            return None
        task_id = results_task_name_for(job_id, round_)
        created = create_task(settings().control_queue_path, TaskSpec(
            task_id=task_id, kind=RESULTS_TASK, payload=ResultsTask(job_id=job_id, round=round_).to_body()))
        log_event("results_requested", job_id=job_id, round=round_, task_id=task_id, created=created)
        return task_id
    except Exception as exc:  # noqa: BLE001 - completing the job must not fail on its manifest
        log_event("results_request_failed", severity="WARNING", job_id=job_id, error=f"{type(exc).__name__}: {exc}"[:300])
        return None


def write_results(job_id: str, round_: int, *, store: Store | None = None, now: dt.datetime | None = None) -> dict:
    """The `results` task: stream the manifest to the bucket (once), then record it on the job."""
    from google.api_core import exceptions as gexc

    from shared.clients import storage_client

    store = store or default_store()
    job = store.get_job(job_id)
    if job is None:
        log_event("results_skipped", severity="WARNING", job_id=job_id, reason="job not found")
        return {"job_id": job_id, "status": "job_missing"}
    if job.round != round_ or job.status not in _COMPLETED:
        # A later retry round started (or the job is not completed): that round writes its own manifest.
        log_event("results_skipped", job_id=job_id, round=round_, reason=f"job is {job.status} in round {job.round}")
        return {"job_id": job_id, "status": "superseded", "job_status": job.status, "job_round": job.round}
    bucket = settings().bucket
    name = results_object_name(job_id, round_)
    path = f"gs://{bucket}/{name}"
    recorded = job.doc.get("results") or {}
    if recorded.get("path") == path:
        return {"job_id": job_id, "status": "already_written", **recorded}
    blob = storage_client().bucket(bucket).blob(name)
    rows: int | None = None
    if blob.exists():  # an earlier attempt wrote it and died before recording it
        status = "already_written"
    else:
        try:
            # Resumable upload in UPLOAD_CHUNK_BYTES parts; created only if absent (generation 0).
            with blob.open("w", content_type="text/csv; charset=utf-8", chunk_size=UPLOAD_CHUNK_BYTES,
                           if_generation_match=0, newline="") as out:
                rows = write_csv(out, manifest_rows(job_id, store=store))
            status = "written"
        except gexc.PreconditionFailed:  # a concurrent attempt won
            status = "already_written"
    if rows is None:
        rows = _count_rows(blob)
    lines = int((job.totals or {}).get("lines") or 0)
    at = now or dt.datetime.now(dt.timezone.utc)
    results = {"path": path, "round": round_, "rows": rows, "lines_missing": max(0, lines - rows), "written_at": at}
    store.update_job(job_id, {"results": results})
    store.record_event(job_id, Event("results_written", "ingest", at, dict(results), event_id=f"results_written-r{round_}"))
    log_event("results_written", job_id=job_id, path=path, rows=rows, lines=lines, status=status)
    return {"job_id": job_id, "status": status, **results}


def _count_rows(blob) -> int:
    """Rows of an object already written (a header line, then one record per line), read as a stream."""
    with blob.open("r", newline="") as f:
        return max(0, sum(1 for _ in csv.reader(f)) - 1)
