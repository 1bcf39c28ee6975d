"""Worker function entry point: routes item tasks and progress checks to the core, maps outcomes to HTTP."""

from __future__ import annotations

import functions_framework
from flask import Request, jsonify

from shared.log import log_event, setup_logging
from shared.required_settings import require_settings

setup_logging()
require_settings("worker")  # a missing or bad setting stops the start, naming it


def _json_error(status: int, code: str, message: str):
    response = jsonify({"status": "error", "error": {"code": code, "message": message}})
    response.status_code = status
    return response


@functions_framework.http
def worker(request: Request):
    path = (request.path or "/").rstrip("/") or "/"
    if path not in ("/", "/progress"):
        return _json_error(404, "not_found", f"no route {request.method} {request.path}; use POST / or POST /progress")
    if request.method != "POST":
        return _json_error(405, "method_not_allowed", f"{request.method} {path} is not allowed; use POST")
    payload = request.get_json(force=True, silent=True)
    if payload is None:
        return _json_error(400, "bad_json", f"request body to {path} is not valid JSON")

    if path == "/progress":
        from pydantic import ValidationError

        from shared.payloads import ProgressTask, describe_validation_error
        from shared.progress import check_job_progress

        try:
            job_id = ProgressTask.model_validate(payload).job_id
        except ValidationError as exc:
            message = f"progress task payload is malformed and can never succeed: {describe_validation_error(exc)}"
            log_event("bad_payload", severity="ERROR", route="/progress", error_code="bad_payload", error=message)
            # 200: a progress task without a valid job id can never succeed, so it must not be retried.
            return jsonify({"status": "bad_payload", "error": {"code": "bad_payload", "message": message}})
        try:
            return jsonify(check_job_progress(job_id))
        except Exception as exc:  # store faults: Cloud Tasks retries the check
            log_event("progress_error", severity="ERROR", job_id=job_id, error=f"{type(exc).__name__}: {exc}")
            return _json_error(503, "progress_check_failed", f"progress check of {job_id} failed: {type(exc).__name__}: {exc}")

    from shared.worker import process_item_delivery

    outcome = process_item_delivery(payload, dict(request.headers))
    response = jsonify(outcome.body)
    response.status_code = outcome.http_status
    if outcome.http_status == 503:
        response.headers["Retry-After"] = "1"
    return response
