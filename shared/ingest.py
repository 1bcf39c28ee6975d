"""Ingest: an object generation becomes one job, byte-range chunk tasks, and one named task per UPC.

Flow: `submit_job` (event or HTTP) stats the object, creates `jobs/{job_id}` once (create-if-absent)
and one named plan task, and answers at once. The plan task (`plan_job`) scans the file once in blocks
(binary/UTF-8 checks, line count, chunk boundaries at line starts) and creates one chunk task per
~`chunk_bytes`: a large file is never read inside the request or event that started the job, whose
sender would time out and send it again. Each chunk task (`process_chunk`) classifies its lines and creates
the item tasks, then records its totals; the last chunk sums them into the job (`fanout_done`).
Every step is idempotent, so a re-delivered event, a re-sent request or a retried chunk never
creates a second job or a second task.
"""

from __future__ import annotations

import datetime as dt
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from pydantic import ValidationError

from shared import item_state
from shared.config import settings
from shared.events import Event
from shared.exceptions import (BadRequestError, ForbiddenError, SourceObjectNotFoundError, UnreadableFileError,
                               UpcfanError)
from shared.gcs import GcsObject, parse_gcs_path
from shared.handlers.choice import HandlerChoice, job_handler_name
from shared.lines import (BLOCK_BYTES, FileFormat, RawLine, Utf8Checker, classify_line, detect_binary,
                          iter_raw_lines, sniff_format)
from shared.log import log_event
from shared.model import ITEM_BIRTH, ITEM_BIRTH_FANOUT, Item, ItemStatus, JobStatus
from shared.naming import chunk_task_name_for, job_id_for, plan_task_name_for, task_name_for
from shared.payloads import ChunkTask, ItemTask, PlanTask, describe_validation_error
from shared.progress import check_job_progress
from shared.results import RESULTS_PREFIX
from shared.store import Store, default_store
from shared.store.base import ITEM_CREATE_BATCH
from shared.tasks import CHUNK_TASK, ITEM_TASK, PLAN_TASK, TaskSpec, create_task, item_queue_for

# Each invalid/duplicate line is one Firestore write; a file of garbage must not become a million
# writes. Counts stay exact; beyond this many per chunk only the first lines keep their reasons.
LINE_RECORDS_PER_CHUNK = 2000

_FANOUT_POOL: ThreadPoolExecutor | None = None
_FANOUT_POOL_LOCK = threading.Lock()


def _fanout_pool(threads: int) -> ThreadPoolExecutor:
    """One CreateTask pool per process, shared by every chunk the process runs at once, so the
    process holds `fanout_threads` threads whatever the number of concurrent chunk deliveries.
    (Creates are client-CPU-bound; the 100k bench measured the same speed as a pool per chunk.)"""
    global _FANOUT_POOL
    with _FANOUT_POOL_LOCK:
        if _FANOUT_POOL is None:
            _FANOUT_POOL = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="fanout")
        return _FANOUT_POOL


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


@dataclass
class SubmitResult:
    job_id: str
    created: bool
    status: str
    gcs_path: str
    generation: int
    error: dict | None = None

    def to_dict(self) -> dict:
        out = {"job_id": self.job_id, "created": self.created, "status": self.status,
               "gcs_path": self.gcs_path, "generation": str(self.generation)}
        if self.error:
            out["error"] = self.error
        return out


@dataclass(frozen=True)
class ChunkPlan:
    index: int
    start: int
    end: int
    first_line: int


@dataclass
class FilePlan:
    size: int
    raw_lines: int
    format: FileFormat
    chunks: list[ChunkPlan] = field(default_factory=list)


def resolve_options(obj: GcsObject, choice: HandlerChoice | None = None) -> dict:
    """The job's options: the handler the request chose, else the object's `upcfan-handler` metadata, else the
    configured default (the deprecated booleans at each level map to a name in `choose_handler`)."""
    return {"handler": job_handler_name(choice or HandlerChoice(), obj.metadata)}


def submit_job(gcs_path: str, *, choice: HandlerChoice | None = None, source: str = "http",
               generation: int | str | None = None, actor: str | None = None,
               options: dict | None = None) -> SubmitResult:
    """Create (or find) the job for one object generation and enqueue its plan task."""
    bucket, name = parse_gcs_path(gcs_path)
    check_bucket_allowed(bucket)
    if _is_results_manifest(bucket, name):
        raise BadRequestError(f"gs://{bucket}/{name} is a results manifest this product wrote "
                              f"({RESULTS_PREFIX}…), not a file of UPCs; it is never processed",
                              code="results_manifest")
    obj = GcsObject.stat(bucket, name, generation)
    job_id = job_id_for(bucket, name, obj.generation)
    store = default_store()
    now = _now()
    doc = {
        "job_id": job_id, "gcs_path": obj.gcs_path, "bucket": bucket, "object": name,
        "generation": str(obj.generation), "size": obj.size, "source": source,
        "status": JobStatus.INGESTING.value, "options": {**resolve_options(obj, choice), **(options or {})},
        "totals": None, "chunks_total": None, "round": 1, "counts": {},
        "created_at": now, "updated_at": now, "fanout_done_at": None, "last_progress_at": now,
        "completed_at": None, "stall": None, "error": None, ITEM_BIRTH: ITEM_BIRTH_FANOUT,
    }
    created_event = Event("created", actor or source, now, {"gcs_path": obj.gcs_path, "generation": str(obj.generation),
                                                            "options": doc["options"]}, event_id="created")
    created = store.create_job(doc, created_event)
    if created:
        log_event("job_created", job_id=job_id, gcs_path=obj.gcs_path, generation=obj.generation, source=source,
                  options=doc["options"])
    else:
        existing = store.get_job(job_id)
        doc = existing.doc if existing else doc
        log_event("job_exists", job_id=job_id, gcs_path=obj.gcs_path, generation=obj.generation, source=source,
                  status=doc.get("status"))
    # Not planned yet: (re)create the job's one plan task. Its name is deterministic, so a repeated
    # event or request while the plan is queued or running adds nothing.
    if doc.get("status") == JobStatus.INGESTING.value and not doc.get("planned_at"):
        plan_created = create_task(settings().control_queue_path, TaskSpec(
            task_id=plan_task_name_for(job_id), kind=PLAN_TASK, payload=PlanTask(job_id=job_id).to_body()))
        log_event("plan_requested", job_id=job_id, created=plan_created)
    return SubmitResult(job_id=job_id, created=created, status=doc.get("status"), gcs_path=obj.gcs_path,
                        generation=obj.generation, error=doc.get("error"))


def check_bucket_allowed(bucket: str) -> None:
    """Trust boundary: a job is only ever planned from a configured bucket (the watched one or a
    submit-only one), whatever else the caller's account could read. ForbiddenError (403) names them."""
    allowed = settings().allowed_buckets
    if bucket in allowed:
        return
    if not allowed:
        raise ForbiddenError(f"bucket {bucket!r} is not accepted: no bucket is configured (UPCFAN_BUCKET)",
                             code="bucket_not_allowed")
    raise ForbiddenError(f"bucket {bucket!r} is not accepted; files are only processed from "
                         f"{', '.join(allowed)} (UPCFAN_BUCKET, UPCFAN_SUBMIT_BUCKETS)",
                         code="bucket_not_allowed", details={"allowed_buckets": list(allowed)})


def _is_results_manifest(bucket: str, name: str) -> bool:
    """An object under `results/` in the watched bucket: where `shared/results.py` writes manifests."""
    return bucket == settings().bucket and name.startswith(RESULTS_PREFIX)


class ChunkPayloadMismatchError(UpcfanError):
    """A chunk task names another object than its job: planning reads the job document only."""

    code = "bad_payload"
    http_status = 200  # answered 200: a retry would name the same object, so it can never succeed


def handle_finalize_event(data: dict[str, Any], event_id: str = "") -> SubmitResult | None:
    """A `google.cloud.storage.object.v1.finalized` event; objects outside the watched bucket are ignored."""
    bucket, name, generation = data.get("bucket"), data.get("name"), data.get("generation")
    watched = settings().bucket
    if not bucket or not name:
        raise UnreadableFileError("finalize event has no bucket/name in its data", code="bad_event")
    if watched and bucket != watched:
        log_event("event_ignored", reason="bucket not watched", bucket=bucket, object=name, event_id=event_id)
        return None
    if name.endswith("/"):
        log_event("event_ignored", reason="folder placeholder", bucket=bucket, object=name, event_id=event_id)
        return None
    if _is_results_manifest(bucket, name):
        # The product writes its manifests into the watched bucket: one taken for input would start a job
        # whose manifest starts another, each creating listings again.
        log_event("event_ignored", reason="results manifest", bucket=bucket, object=name, event_id=event_id)
        return None
    return submit_job(f"gs://{bucket}/{name}", generation=generation, source="event", actor=f"event:{event_id}")


def plan_file(obj: GcsObject, chunk_bytes: int, max_lines: int) -> FilePlan:
    """One streaming pass: refuse binary/non-UTF-8 files, count lines, cut chunks at line starts."""
    if obj.size == 0:
        raise UnreadableFileError(f"{obj.gcs_path} is empty (0 bytes)", code="empty_file")
    checker = Utf8Checker()
    chunks: list[ChunkPlan] = []
    chunk_start, chunk_first_line = 0, 1
    target = chunk_bytes
    newlines = 0
    pos = 0
    while pos < obj.size:
        block = obj.read(pos, min(pos + BLOCK_BYTES, obj.size))
        if not block:
            break
        if pos == 0:
            detect_binary(block)
        checker.feed(block, final=pos + len(block) >= obj.size)
        search_from = 0
        while target < pos + len(block):
            nl = block.find(b"\n", max(target - pos, search_from))
            if nl < 0:
                break
            boundary = pos + nl + 1
            lines_before = newlines + block.count(b"\n", 0, nl + 1)
            if boundary < obj.size:
                chunks.append(ChunkPlan(len(chunks), chunk_start, boundary, chunk_first_line))
                chunk_start, chunk_first_line = boundary, lines_before + 1
            target = boundary + chunk_bytes
            search_from = nl + 1
        newlines += block.count(b"\n")
        pos += len(block)
        if newlines > max_lines:
            raise UnreadableFileError(f"{obj.gcs_path} has more than {max_lines:,} lines (the configured maximum); "
                                      "split it into smaller files", code="too_many_lines")
    chunks.append(ChunkPlan(len(chunks), chunk_start, obj.size, chunk_first_line))
    last = obj.read(obj.size - 1, obj.size)
    raw_lines = newlines + (0 if last == b"\n" else 1)
    fmt = FileFormat(kind="lines")
    for raw in iter_raw_lines(obj.read, 0, min(obj.size, BLOCK_BYTES), 1):
        text = _text_for_sniff(raw)
        if text is not None:
            fmt = sniff_format(text, raw.line_no) or fmt
            break
    return FilePlan(size=obj.size, raw_lines=raw_lines, format=fmt, chunks=chunks)


def _text_for_sniff(raw: RawLine) -> str | None:
    data = raw.data[3:] if raw.line_no == 1 and raw.data.startswith(b"\xef\xbb\xbf") else raw.data
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        return ""
    return None if (not text or text.startswith("#")) else text


def plan_job(task: PlanTask, store: Store | None = None) -> dict:
    """The plan task: stream the job's object generation (named by the job document) and create its
    chunk tasks. Idempotent: a planned or finished job is left as it is. A generation that is gone
    (replaced or deleted before planning) fails the job: no retry can bring that data back."""
    store = store or default_store()
    job = store.get_job(task.job_id)
    if job is None:
        log_event("plan_skipped", severity="WARNING", job_id=task.job_id, reason="job not found")
        return {}
    # A job paused while ingesting is still planned: pausing stops side effects, not the fan-out.
    if job.status not in (JobStatus.INGESTING.value, JobStatus.PAUSED.value) or job.doc.get("planned_at"):
        log_event("plan_skipped", job_id=task.job_id, reason=f"job is {job.status}, planned_at "
                                                             f"{job.doc.get('planned_at')}")
        return job.doc
    doc = job.doc
    try:
        obj = GcsObject.stat(doc["bucket"], doc["object"], doc["generation"])
        return _plan_and_enqueue(store, task.job_id, obj)
    except SourceObjectNotFoundError as exc:
        return _fail_job(store, task.job_id, {"code": "object_generation_gone", "message": exc.message}, _now())


def _plan_and_enqueue(store: Store, job_id: str, obj: GcsObject) -> dict:
    s = settings()
    now = _now()
    try:
        plan = plan_file(obj, s.chunk_bytes, s.max_lines)
    except UnreadableFileError as exc:
        return _fail_job(store, job_id, exc.to_dict(), now)
    # The lane is decided once, before any chunk task exists: a plan task run again (it ended before
    # `planned_at`) keeps the lane already recorded, so every item task of the job lands in one queue
    # even if UPCFAN_SMALL_JOB_MAX_LINES changed in between.
    current = store.get_job(job_id)
    lane = (current.doc.get("item_lane") if current else None) or s.lane_for_lines(plan.raw_lines)
    store.update_job(job_id, {"plan": {"format": plan.format.to_dict(), "raw_lines": plan.raw_lines,
                                       "size": plan.size},
                              "item_lane": lane, "chunks_total": len(plan.chunks), "updated_at": now})
    log_event("item_lane_chosen", job_id=job_id, lane=lane, raw_lines=plan.raw_lines,
              small_job_max_lines=s.small_job_max_lines)
    created = 0
    for chunk in plan.chunks:
        payload = ChunkTask(job_id=job_id, bucket=obj.bucket, object=obj.name, generation=str(obj.generation),
                            start=chunk.start, end=chunk.end, first_line=chunk.first_line, index=chunk.index)
        created += create_task(s.control_queue_path, TaskSpec(task_id=chunk_task_name_for(job_id, chunk.start),
                                                              kind=CHUNK_TASK, payload=payload.to_body()))
    store.update_job(job_id, {"planned_at": _now(), "updated_at": _now()})
    store.record_event(job_id, Event("planned", "ingest", _now(), {"chunks": len(plan.chunks), "raw_lines": plan.raw_lines,
                                                                   "format": plan.format.kind, "item_lane": lane},
                                     event_id="planned"))
    log_event("job_planned", job_id=job_id, chunks=len(plan.chunks), chunk_tasks_created=created,
              raw_lines=plan.raw_lines, item_lane=lane, format=plan.format.kind, size=plan.size)
    job = store.get_job(job_id)
    return job.doc if job else {}


def _fail_job(store: Store, job_id: str, error: dict, now: dt.datetime) -> dict:
    doc = store.fail_job(job_id, error, now)
    log_event("job_failed", severity="WARNING", job_id=job_id, error_code=error.get("code"),
              error=error.get("message"))
    return doc


@dataclass
class ChunkResult:
    job_id: str
    start: int
    lines: int = 0
    items: int = 0
    invalid: int = 0
    duplicate: int = 0
    skipped: int = 0
    tasks_created: int = 0
    skipped_reason: str = ""

    def totals(self) -> dict:
        return {"lines": self.lines, "items": self.items, "invalid": self.invalid, "duplicate": self.duplicate,
                "skipped": self.skipped}


@dataclass
class _Candidate:
    gtin: str
    upc: str
    line: int


def process_chunk(payload: ChunkTask | dict[str, Any], *, crash_after_tasks: int | None = None,
                  on_task: Callable[[str], None] | None = None, store: Store | None = None) -> ChunkResult:
    """Classify the lines that start in [start, end) and create one named task per new GTIN.

    A GTIN seen on an earlier line of this chunk is a duplicate. A GTIN whose item document already
    exists was born either by an earlier attempt of this very chunk (same line: still this chunk's
    item) or by another chunk (other line: a duplicate of that line), so totals stay exact across
    retries, chunk races and any delay (see `_enqueue_items`). A job whose object generation is gone
    fails at once (`object_generation_gone`).
    `crash_after_tasks` lets tests kill a chunk midway.
    """
    chunk = payload if isinstance(payload, ChunkTask) else _chunk_task(payload)
    store = store or default_store()
    result = ChunkResult(job_id=chunk.job_id, start=chunk.start)
    job = store.get_job(chunk.job_id)
    if job is None:
        result.skipped_reason = "job not found"
        log_event("chunk_skipped", severity="WARNING", job_id=chunk.job_id, start=chunk.start,
                  reason=result.skipped_reason)
        return result
    done = store.get_chunk(chunk.job_id, chunk.start)
    if done is not None and done.get("status") == "done":
        log_event("chunk_already_done", job_id=chunk.job_id, start=chunk.start)
        _maybe_finish_fanout(store, chunk.job_id)
        return result
    if job.status == JobStatus.FAILED.value:
        result.skipped_reason = "job failed"
        log_event("chunk_skipped", job_id=chunk.job_id, start=chunk.start, reason=result.skipped_reason)
        return result
    source = _job_object(job.doc, chunk)
    try:
        candidates, line_records = _classify_chunk(chunk, source, FileFormat.from_dict(job.doc["plan"]["format"]),
                                                   result)
    except SourceObjectNotFoundError:
        return _object_generation_gone(store, chunk, source, result)
    # A cancelled job's chunk still records its items (born `cancelled`, no task), so every line of
    # the file ends as an item or a line record whenever the cancel came.
    cancelled = job.status == JobStatus.CANCELLED.value
    todo = candidates if crash_after_tasks is None else candidates[:crash_after_tasks]
    line_records += _enqueue_items(store, chunk, todo, result, on_task, cancelled=cancelled, lane=job.item_lane)
    if crash_after_tasks is not None:
        raise RuntimeError(f"injected crash after {len(todo)} task creations")
    _record_chunk_done(store, chunk, result, line_records, enqueued=not cancelled)
    _maybe_finish_fanout(store, chunk.job_id)
    return result


def _object_generation_gone(store: Store, chunk: ChunkTask, source: GcsObject, result: ChunkResult) -> ChunkResult:
    """The job's object generation was deleted or replaced before this chunk could read it: no retry can
    bring that data back, so the job fails at once (the chunk answers 200 and its task ends; the other
    chunks skip a failed job, and its already enqueued items are not run by the worker)."""
    where = f"gs://{source.bucket}/{source.name}#{source.generation}"
    message = (f"{where} was deleted or replaced while the job was ingesting (chunk at byte {chunk.start:,} could "
               "not be read); that generation's data is gone: upload the file again to start a new job")
    _fail_job(store, chunk.job_id, {"code": "object_generation_gone", "message": message}, _now())
    result.skipped_reason = "object_generation_gone"
    log_event("chunk_object_gone", severity="WARNING", job_id=chunk.job_id, start=chunk.start, gcs_path=where)
    return result


def _chunk_task(payload: dict[str, Any]) -> ChunkTask:
    try:
        return ChunkTask.model_validate(payload)
    except ValidationError as exc:
        raise UnreadableFileError(f"chunk task payload is malformed: {describe_validation_error(exc)}",
                                  code="bad_payload") from None


def _job_object(job: dict[str, Any], chunk: ChunkTask) -> GcsObject:
    """The object the job was created for, from its document (never from the task payload, which a
    task creator could point at any object the ingest account can read); a payload that names
    another object is refused."""
    bucket, name, generation = job.get("bucket"), job.get("object"), str(job.get("generation"))
    if (chunk.bucket, chunk.object, str(chunk.generation)) != (bucket, name, generation):
        message = (f"chunk task of job {chunk.job_id} names gs://{chunk.bucket}/{chunk.object}#{chunk.generation}, "
                   f"but the job is gs://{bucket}/{name}#{generation}; refused (planning reads the job document)")
        log_event("chunk_payload_mismatch", severity="ERROR", job_id=chunk.job_id, start=chunk.start, error=message)
        raise ChunkPayloadMismatchError(message)
    return GcsObject(bucket=bucket, name=name, generation=int(generation), size=chunk.end)


def _classify_chunk(chunk: ChunkTask, source: GcsObject, fmt: FileFormat,
                    result: ChunkResult) -> tuple[list[_Candidate], list[dict]]:
    """Every line starting in the chunk: skipped, invalid, a duplicate within the chunk, or a candidate item."""
    obj = source
    first_seen: dict[str, int] = {}
    candidates: list[_Candidate] = []
    line_records: list[dict] = []
    for raw in iter_raw_lines(obj.read, chunk.start, chunk.end, chunk.first_line):
        verdict = classify_line(raw, fmt, strip_bom=(raw.start == 0))
        if verdict.kind == "skip":
            result.skipped += 1
            continue
        result.lines += 1
        if verdict.kind == "invalid":
            result.invalid += 1
            line_records.append({"line": raw.line_no, "raw": verdict.upc, "outcome": "invalid", "code": verdict.code,
                                 "reason": verdict.reason})
            continue
        if verdict.gtin in first_seen:
            result.duplicate += 1
            line_records.append(_duplicate_record(raw.line_no, verdict.upc, verdict.gtin, first_seen[verdict.gtin]))
            continue
        first_seen[verdict.gtin] = raw.line_no
        candidates.append(_Candidate(verdict.gtin, verdict.upc, raw.line_no))
    return candidates, line_records


def _enqueue_items(store: Store, chunk: ChunkTask, candidates: list[_Candidate], result: ChunkResult,
                   on_task: Callable[[str], None] | None, *, cancelled: bool, lane: str) -> list[dict]:
    """Each candidate's item is born here, then gets its task (round 1); counts them into `result`;
    returns the line records of candidates that turned out to be duplicates of another chunk's line.

    The item document, created if absent before its task, is the durable record of which line owns
    a GTIN: an existing item of another line makes this line a duplicate, one of this line is this
    chunk's own (an earlier attempt of this chunk made it). Task-name dedup cannot decide that: Cloud
    Tasks forgets a name about an hour after its task ended, so a chunk that runs later (control queue
    paused, long backlog) would count a duplicate as a new item, and the job would never complete.
    A cancelled job's candidates are born `cancelled`, with no task.

    Items are created `ITEM_CREATE_BATCH` at a time (one store call each, `Store.create_items`), and
    the next batch's items are written while this batch's tasks are created on the fan-out pool: an
    item is still always born before its task. Tasks go to the job's lane (`Job.item_lane`).
    """
    s = settings()
    job_id, round_ = chunk.job_id, 1
    owner = f"fanout:{chunk_task_name_for(job_id, chunk.start)}"
    at = _now()
    pool = _fanout_pool(s.fanout_threads)

    def item_doc(c: _Candidate) -> dict:
        task = ItemTask(job_id=job_id, gtin=c.gtin, upc=c.upc, line=c.line, round=round_)
        task_id = task_name_for(job_id, c.gtin, round_)
        return (item_state.new_item(task, task_id, at, ItemStatus.CANCELLED, attempt=0, owner=owner,
                                    error_code=item_state.JOB_CANCELLED_CODE)
                if cancelled else item_state.born_queued(task, task_id, at, owner=owner))

    def create_batch(batch: list[_Candidate]) -> dict[str, Item | None]:
        return store.create_items(job_id, {c.gtin: item_doc(c) for c in batch})

    def enqueue_one(c: _Candidate, existing: Item | None) -> tuple[_Candidate, str]:
        if existing is not None:
            owner_line = existing.doc.get("line")
            if owner_line is not None and int(owner_line) != c.line:
                return c, f"dup:{int(owner_line)}"
            if not existing.never_claimed:
                return c, "mine"  # a delivery claimed it (or it is final): its task exists or did
            if cancelled:
                # Born queued by an earlier attempt of this chunk, before the job was cancelled.
                store.transact_item("cancel", job_id, c.gtin, lambda item: item_state.cancel_queued(item, at))
                return c, "mine"
        elif cancelled:
            return c, "mine"
        task_id = task_name_for(job_id, c.gtin, round_)
        if on_task:
            on_task(task_id)
        task = ItemTask(job_id=job_id, gtin=c.gtin, upc=c.upc, line=c.line, round=round_)
        spec = TaskSpec(task_id=task_id, kind=ITEM_TASK, payload=task.to_body())
        # AlreadyExists: an earlier attempt of this chunk created it (the item is ours, see above).
        return c, "created" if create_task(item_queue_for(task_id, lane), spec) else "mine"

    # Candidates are unique per chunk (`_classify_chunk`): a BatchWrite may not write one document twice.
    batches = [candidates[i:i + ITEM_CREATE_BATCH] for i in range(0, len(candidates), ITEM_CREATE_BATCH)]
    duplicates: list[dict] = []
    created = pool.submit(create_batch, batches[0]) if batches else None
    for n, batch in enumerate(batches):
        existing = created.result()
        # Submitted before this batch's CreateTasks, so a free pool thread takes it first.
        created = pool.submit(create_batch, batches[n + 1]) if n + 1 < len(batches) else None
        try:
            verdicts = list(pool.map(enqueue_one, batch, [existing[c.gtin] for c in batch]))
        except BaseException:
            if created is not None:
                created.cancel()
            raise
        for c, verdict in verdicts:
            if verdict == "created":
                result.tasks_created += 1
                result.items += 1
            elif verdict == "mine":
                result.items += 1
            else:
                result.duplicate += 1
                duplicates.append(_duplicate_record(c.line, c.upc, c.gtin, int(verdict.split(":")[1])))
    return duplicates


def _record_chunk_done(store: Store, chunk: ChunkTask, result: ChunkResult, line_records: list[dict], *,
                       enqueued: bool) -> None:
    line_records.sort(key=lambda r: r["line"])
    store.write_line_records(chunk.job_id, line_records[:LINE_RECORDS_PER_CHUNK])
    store.put_chunk(chunk.job_id, chunk.start, {
        "start": chunk.start, "end": chunk.end, "first_line": chunk.first_line, "index": chunk.index,
        "status": "done", "totals": result.totals(), "tasks_created": result.tasks_created,
        "line_records_omitted": max(0, len(line_records) - LINE_RECORDS_PER_CHUNK), "done_at": _now()})
    log_event("chunk_done", job_id=chunk.job_id, start=chunk.start, end=chunk.end, **result.totals(),
              tasks_created=result.tasks_created, enqueued=enqueued)


def _duplicate_record(line: int, upc: str, gtin: str, of_line: int) -> dict:
    return {"line": line, "raw": upc, "outcome": "duplicate", "code": "duplicate_in_file", "gtin": gtin,
            "duplicate_of_line": of_line, "reason": f"GTIN {gtin} already appears on line {of_line:,}"}


def _maybe_finish_fanout(store: Store, job_id: str) -> bool:
    """When every chunk is done, sum their totals into the job once and mark fan-out done."""
    job = store.get_job(job_id)
    if job is None or job.fanout_done_at is not None or not job.doc.get("chunks_total"):
        return False
    if store.count_done_chunks(job_id) < int(job.doc["chunks_total"]):
        return False
    now = _now()
    finished = store.finish_fanout(job_id, now)
    if finished is None:
        return False
    totals = finished["totals"]
    log_event("fanout_done", job_id=job_id, **totals)
    if totals["lines"] == 0:
        _fail_job(store, job_id, {"code": "no_data_lines",
                                  "message": f"{finished.get('gcs_path')} has no UPC lines "
                                             f"({totals['skipped']} blank, comment or header lines)"}, now)
    else:
        from shared.progress import notify_started

        notify_started(store, job_id, finished, now)
        # Items may all have finished before the last chunk was recorded (or there are none, all
        # lines invalid): no later completion would ask for a check, so check now.
        check_job_progress(job_id, store=store)
    return True
