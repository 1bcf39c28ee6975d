"""Operator HTTP API entry point: routes by path, validates with pydantic, maps core results and errors to JSON."""

from __future__ import annotations

import base64
import json
from typing import Any, Callable

import functions_framework
from google.api_core import exceptions as gexc
from flask import Request, Response
from pydantic import ValidationError
from werkzeug.exceptions import MethodNotAllowed, NotFound
from werkzeug.routing import Map, Rule

from shared.exceptions import UpcfanError
from shared.log import log_event, setup_logging
from shared.required_settings import require_settings

try:  # deployed: this directory is the function's source root
    import api_schemas as schemas
    import console_pages
except ImportError:  # pragma: no cover - imported as a package (tests, tools)
    from functions.api import api_schemas as schemas
    from functions.api import console_pages

setup_logging()
require_settings("api")  # a missing or bad setting stops the start, naming it

_URLS = Map(
    [
        # The operators' web console (HTML; not in the OpenAPI document, which describes the JSON API).
        Rule("/", endpoint="console_jobs", methods=["GET"]),
        Rule("/jobs/<job_id>", endpoint="console_job", methods=["GET"]),
        Rule("/assets/<name>", endpoint="console_asset", methods=["GET"]),
        Rule("/health", endpoint="health", methods=["GET"]),
        Rule("/openapi.json", endpoint="openapi", methods=["GET"]),
        Rule("/api/batch/process", endpoint="process", methods=["POST"]),
        Rule("/api/batch/status/<job_id>", endpoint="status", methods=["GET"]),
        Rule("/api/batch/jobs", endpoint="jobs", methods=["GET"]),
        Rule("/api/batch/jobs/<job_id>/items", endpoint="items", methods=["GET"]),
        Rule("/api/batch/jobs/<job_id>/events", endpoint="events", methods=["GET"]),
        Rule("/api/batch/jobs/<job_id>/results.csv", endpoint="results_csv", methods=["GET"]),
        Rule("/api/batch/jobs/<job_id>/cancel", endpoint="cancel", methods=["POST"]),
        Rule("/api/batch/jobs/<job_id>/retry-failed", endpoint="retry_failed", methods=["POST"]),
        Rule("/api/batch/jobs/<job_id>/redrive", endpoint="redrive", methods=["POST"]),
        Rule("/api/batch/jobs/<job_id>/pause", endpoint="pause", methods=["POST"]),
        Rule("/api/batch/jobs/<job_id>/resume", endpoint="resume", methods=["POST"]),
    ],
    strict_slashes=False,
    merge_slashes=False,
)


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(body, default=str), status=status, mimetype="application/json", headers=headers)


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    return _json({"error": {"code": code, "message": message}}, status, headers)


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err.get("loc", ())) or "body"
        parts.append(f"{where}: {err.get('msg')}")
    return "; ".join(parts)


def _actor(request: Request) -> str:
    """Who asked, for the audit trail: the email of the ID token Cloud Run verified before the request
    reached us (the service is private; Cloud Run checks `X-Serverless-Authorization` instead of
    `Authorization` when both are sent, and passes both through). Never a header a caller can set."""
    header = request.headers.get("X-Serverless-Authorization") or request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.count(".") == 2:
        try:
            payload = token.split(".")[1]
            claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
            if isinstance(claims, dict) and isinstance(claims.get("email"), str) and claims["email"]:
                return claims["email"][:200]
        except (ValueError, UnicodeDecodeError):
            pass
    return "unauthenticated"  # only without Cloud Run's front end (never deployed that way)


def _ops():
    from shared import operations

    return operations


def health(request: Request) -> Response:
    ok, parts = _ops().health()
    mode = _ops().dropped_file_mode()  # live or dry_run, and the default handler (issue 14, defect 9)
    if ok:
        return _json({"status": "ok", "checks": parts, **mode})
    failing = ", ".join(f"{k} {v}" for k, v in parts.items() if v != "ok")
    return _json({"status": "unavailable", "checks": parts, **mode,
                  "error": {"code": "unhealthy", "message": f"not healthy: {failing}"}}, 503)


def openapi(request: Request) -> Response:
    return _json(schemas.openapi_spec())


def process(request: Request) -> Response:
    raw = request.get_data(cache=True)
    try:
        data = json.loads(raw or b"")
    except ValueError:
        return _error(400, "bad_json", "request body must be a JSON object: {gcs_path, handler}")
    result = _ops().submit(schemas.ProcessFileRequest.model_validate(data), source="http")
    out = result.to_dict() if hasattr(result, "to_dict") else dict(vars(result))
    return _json(out, 202)


def status(request: Request, job_id: str) -> Response:
    return _json(_ops().get_job_status(job_id))


def jobs(request: Request) -> Response:
    q = schemas.ListJobsQuery.model_validate(request.args.to_dict())
    return _json(_ops().list_jobs(limit=q.limit, status=q.status, gcs_path=q.gcs_path, cursor=q.cursor))


def items(request: Request, job_id: str) -> Response:
    q = schemas.ListItemsQuery.model_validate(request.args.to_dict())
    return _json(_ops().list_items(job_id, status=q.status, limit=q.limit, cursor=q.cursor))


def events(request: Request, job_id: str) -> Response:
    q = schemas.ListEventsQuery.model_validate(request.args.to_dict())
    return _json(_ops().list_events(job_id, limit=q.limit, cursor=q.cursor))


def results_csv(request: Request, job_id: str) -> Response:
    pieces = _ops().export_results(job_id)  # raises job_not_found before the first byte
    # Streamed: a page of rows per piece, so a 1M-line job is never held in memory.
    return Response(pieces, mimetype="text/csv", headers={
        "Content-Disposition": f'attachment; filename="{job_id}.csv"', "Cache-Control": "no-store"})


def cancel(request: Request, job_id: str) -> Response:
    return _json(_ops().cancel_job(job_id, _actor(request)))


def retry_failed(request: Request, job_id: str) -> Response:
    return _json(_ops().retry_failed(job_id, _actor(request)))


def redrive(request: Request, job_id: str) -> Response:
    try:
        data = json.loads(request.get_data(cache=True) or b"")
    except ValueError:
        return _error(400, "bad_json", 'request body must be a JSON object: {"dry_run": true|false}')
    body = schemas.RedriveRequest.model_validate(data)
    return _json(_ops().redrive_job(job_id, _actor(request), dry_run=body.dry_run, limit=body.limit,
                                    cursor=body.cursor))


def pause(request: Request, job_id: str) -> Response:
    raw = request.get_data(cache=True)
    try:
        data = json.loads(raw) if raw and raw.strip() else {}
    except ValueError:
        return _error(400, "bad_json", "request body must be empty or a JSON object: {reason}")
    if not isinstance(data, dict):
        return _error(400, "bad_json", "request body must be empty or a JSON object: {reason}")
    body = schemas.PauseRequest.model_validate(data)
    return _json(_ops().pause_job(job_id, _actor(request), reason=body.reason))


def resume(request: Request, job_id: str) -> Response:
    return _json(_ops().resume_job(job_id, _actor(request)))


_HANDLERS: dict[str, Callable[..., Response]] = {
    "health": health, "openapi": openapi, "process": process, "status": status, "jobs": jobs,
    "items": items, "events": events, "results_csv": results_csv, "cancel": cancel, "retry_failed": retry_failed,
    "redrive": redrive, "pause": pause, "resume": resume,
    "console_jobs": console_pages.jobs_page, "console_job": console_pages.job_page,
    "console_asset": console_pages.asset_file,
}


@functions_framework.http
def api(request: Request) -> Response:
    adapter = _URLS.bind("api", path_info=request.path or "/")
    try:
        endpoint, args = adapter.match(method=request.method)
    except MethodNotAllowed as exc:
        allowed = ", ".join(sorted(exc.valid_methods or []))
        return _error(405, "method_not_allowed", f"{request.method} {request.path} is not allowed; use {allowed}",
                      {"Allow": allowed})
    except NotFound:
        return _error(404, "not_found", f"no route {request.method} {request.path}")
    if request.method == "POST":
        refused = console_pages.forged_request_reason(request)
        if refused:
            log_event("api_forged_request_refused", severity="WARNING", endpoint=endpoint, reason=refused,
                      origin=(request.headers.get("Origin") or "")[:200])
            return _error(403, "forbidden_origin", refused)
    try:
        return _HANDLERS[endpoint](request, **args)
    except ValidationError as exc:
        return _error(400, "bad_request", _validation_message(exc))
    except gexc.GoogleAPICallError as exc:
        # A 4xx from a Google API names a problem with the caller's input (e.g. an impossible bucket name).
        code = int(exc.code or 500) if isinstance(exc.code, int) else 500
        if 400 <= code < 500:
            return _error(code, "bad_request" if code != 404 else "not_found", f"{exc.message}"[:500])
        log_event("api_backend_error", severity="ERROR", endpoint=endpoint, error=f"{type(exc).__name__}: {exc}")
        return _error(503, "backend_unavailable", f"{endpoint}: backend error {type(exc).__name__}")
    except UpcfanError as exc:
        status_code = exc.http_status if 400 <= exc.http_status < 600 else 500
        if status_code >= 500:
            log_event("api_error", severity="ERROR", endpoint=endpoint, error_code=exc.code, error=exc.message)
        return _json({"error": exc.to_dict()}, status_code)
    except Exception as exc:  # noqa: BLE001 - one JSON answer for every unexpected fault
        log_event("api_unexpected_error", severity="ERROR", endpoint=endpoint, error=f"{type(exc).__name__}: {exc}")
        return _error(500, "internal", f"unexpected error in {endpoint}: {type(exc).__name__}")
