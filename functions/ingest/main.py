"""Ingest function: a GCS finalize CloudEvent or `POST {gcs_path}` becomes a job; `/plan` plans its file,
`/fanout` runs a chunk."""

import functions_framework
from cloudevents.http import from_http
from flask import Request, jsonify

from shared.exceptions import BadRequestError, SourceObjectNotFoundError, UpcfanError
from shared.log import log_event, setup_logging
from shared.required_settings import require_settings

setup_logging()
require_settings("ingest")  # a missing or bad setting stops the start, naming it

FINALIZED = "google.cloud.storage.object.v1.finalized"


def _error(exc: UpcfanError):
    return jsonify({"error": exc.to_dict()}), exc.http_status


# What each field of a process request must be, for the 400 that names it.
_EXPECTED = {"create_drafts": "true or false", "test_mode": "true or false", "handler": "a handler name (a string)",
             "generation": "a positive integer"}


def _invalid_body(errors: list[dict]):
    """A pydantic error list as this trigger's 400: `missing_gcs_path` or `bad_option` naming the field."""
    field = next((str(e["loc"][0]) for e in errors if e.get("loc")), "gcs_path")
    if field == "gcs_path":
        code, message = "missing_gcs_path", "gcs_path (gs://bucket/object) is required"
    else:
        code, message = "bad_option", f"{field} must be {_EXPECTED.get(field, 'valid')}"
    return jsonify({"error": {"code": code, "message": message}}), 400


def _is_cloudevent(request: Request) -> bool:
    return "ce-type" in request.headers or (request.mimetype or "").startswith("application/cloudevents")


@functions_framework.http
def ingest(request: Request):
    path = request.path.rstrip("/")
    if request.method != "POST":
        return jsonify({"error": {"code": "method_not_allowed", "message": "use POST"}}), 405
    try:
        if path == "/fanout":
            return _chunk_task(request)
        if path == "/plan":
            return _plan_task(request)
        if path == "/results":
            return _results_task(request)
        if path not in ("", "/api/batch/process"):
            return jsonify({"error": {"code": "not_found", "message": f"no route {request.path}"}}), 404
        if _is_cloudevent(request):
            return _finalize_event(request)
        return _process_request(request)
    except UpcfanError as exc:
        log_event("ingest_error", severity="WARNING", code=exc.code, error=exc.message)
        return _error(exc)


def _task_payload(request: Request, model, kind: str):
    """The task body as `model`, or the 200 `bad_payload` answer: a malformed task can never succeed,
    so Cloud Tasks must not retry it."""
    from pydantic import ValidationError

    from shared.payloads import describe_validation_error

    try:
        return model.model_validate(request.get_json(silent=True)), None
    except ValidationError as exc:
        message = f"{kind} task payload is malformed and can never succeed: {describe_validation_error(exc)}"
        log_event(f"bad_{kind}_payload", severity="ERROR", error=message, body=request.get_data(as_text=True)[:200])
        return None, (jsonify({"error": {"code": "bad_payload", "message": message}}), 200)


def _chunk_task(request: Request):
    """`POST /fanout`: one chunk task from the control queue."""
    from shared import ingest as core  # lazy: clients and heavy imports stay out of cold start
    from shared.payloads import ChunkTask

    chunk, refused = _task_payload(request, ChunkTask, "chunk")
    if refused:
        return refused
    try:
        result = core.process_chunk(chunk)
    except core.ChunkPayloadMismatchError as exc:
        # 200: the task names another object than its job; a retry would name it again.
        return jsonify({"error": exc.to_dict()}), 200
    return jsonify(result.__dict__), 200


def _plan_task(request: Request):
    """`POST /plan`: plan a job's file (the job's one plan task from the control queue)."""
    from shared import ingest as core
    from shared.payloads import PlanTask

    task, refused = _task_payload(request, PlanTask, "plan")
    if refused:
        return refused
    doc = core.plan_job(task)
    return jsonify({"job_id": task.job_id, "status": doc.get("status"), "chunks_total": doc.get("chunks_total"),
                    "error": doc.get("error")}), 200


def _results_task(request: Request):
    """`POST /results`: write a finished job's results manifest (shared/results.py)."""
    from shared import results
    from shared.payloads import ResultsTask

    task, refused = _task_payload(request, ResultsTask, "results")
    if refused:
        return refused
    return jsonify(results.write_results(task.job_id, task.round)), 200


def _finalize_event(request: Request):
    """An Eventarc CloudEvent: a finalized object in the watched bucket becomes a job."""
    from shared import ingest as core

    event = from_http(dict(request.headers), request.get_data())
    if event["type"] != FINALIZED:
        log_event("event_ignored", event_type=event["type"], event_id=event["id"])
        return jsonify({"ignored": event["type"]}), 200
    data = event.data if isinstance(event.data, dict) else {}
    try:
        result = core.handle_finalize_event(data, event_id=event["id"])
    except SourceObjectNotFoundError as exc:
        # Overwritten or deleted before we ran: that generation's data is gone for good and a
        # newer generation has its own event, so retrying this one would only spin.
        log_event("event_object_gone", severity="WARNING", event_id=event["id"], error=exc.message)
        return jsonify({"ignored": exc.message}), 200
    except BadRequestError as exc:
        if exc.code != "unknown_handler":
            raise
        # The object's upcfan-handler metadata names no handler: only a new upload can fix that.
        log_event("event_unknown_handler", severity="ERROR", event_id=event["id"], error=exc.message)
        return jsonify({"ignored": exc.message}), 200
    if result is None:
        return jsonify({"ignored": "bucket not watched"}), 200
    # A file that cannot be read is the uploader's problem, not a reason for Eventarc to retry.
    return jsonify(result.to_dict()), 200 if result.error else 202


def _process_request(request: Request):
    """`POST {gcs_path, handler}`: the HTTP trigger."""
    from pydantic import ValidationError

    from shared import operations
    from shared.process_request import ProcessFileRequest

    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        return jsonify({"error": {"code": "bad_json", "message": "body must be a JSON object {gcs_path, handler}"}}), 400
    try:
        # Strict: JSON true/false only (no "yes" or 1), as this trigger has always required.
        process = ProcessFileRequest.model_validate(body, strict=True)
    except ValidationError as exc:
        return _invalid_body(exc.errors())
    result = operations.submit(process, source="http")
    return jsonify(result.to_dict()), 422 if result.error else 202
