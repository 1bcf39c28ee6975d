"""Request models of the operator API and its OpenAPI 3 description, generated from those models."""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from shared.process_request import ProcessFileRequest

JobStatusName = Literal["ingesting", "running", "paused", "completed", "completed_with_failures", "cancelled",
                        "failed"]
ItemFilter = Literal["queued", "processing", "succeeded", "failed", "cancelled", "invalid", "duplicate"]


class ListJobsQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")
    limit: int = Field(default=20, ge=1, le=100)
    status: Optional[JobStatusName] = None
    gcs_path: Optional[str] = Field(default=None, max_length=1100)
    cursor: Optional[str] = Field(default=None, min_length=1, max_length=200)


class ListItemsQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")
    status: Optional[ItemFilter] = None
    limit: int = Field(default=100, ge=1, le=1000)
    cursor: Optional[str] = Field(default=None, min_length=1, max_length=200)


class ListEventsQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")
    limit: int = Field(default=100, ge=1, le=500)
    cursor: Optional[str] = Field(default=None, min_length=1, max_length=200)


class RedriveRequest(BaseModel):
    """POST /api/batch/jobs/{job_id}/redrive: `dry_run` must be said (true lists, false re-drives)."""

    model_config = ConfigDict(extra="forbid")
    dry_run: bool = Field(strict=True)
    limit: int = Field(default=1000, ge=1, le=5000)
    cursor: Optional[str] = Field(default=None, min_length=1, max_length=200)


class PauseRequest(BaseModel):
    """Optional body of POST /api/batch/jobs/{job_id}/pause: why, for the job's audit trail and the alert."""

    model_config = ConfigDict(extra="ignore")
    reason: Optional[str] = Field(default=None, max_length=500, description="why the operator pauses the job")


_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {"code": {"type": "string"}, "message": {"type": "string"}, "details": {"type": "object"}},
        }
    },
}
_OBJ = {"type": "object"}


def _resp(description: str, schema: dict | None = None) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema or _OBJ}}}


def _errors(*codes: int) -> dict:
    text = {400: "bad request", 404: "not found", 409: "refused (conflict)", 422: "unreadable file",
            503: "unavailable"}
    return {str(c): _resp(text[c], {"$ref": "#/components/schemas/Error"}) for c in codes}


def _query_params(model: type[BaseModel]) -> list[dict]:
    schema = model.model_json_schema()
    params = []
    for name, prop in schema.get("properties", {}).items():
        prop = dict(prop)
        prop.pop("title", None)
        if "anyOf" in prop:  # Optional[X] -> X (absence is the null)
            options = [o for o in prop.pop("anyOf") if o.get("type") != "null"]
            prop.update(options[0])
        if prop.get("default") is None:
            prop.pop("default", None)
        params.append({"name": name, "in": "query", "required": False, "schema": prop})
    return params


def _body_schema(model: type[BaseModel]) -> dict:
    schema = model.model_json_schema()
    schema.pop("title", None)
    for prop in schema.get("properties", {}).values():
        prop.pop("title", None)
    return schema


_JOB_ID = {"name": "job_id", "in": "path", "required": True,
           "schema": {"type": "string", "minLength": 1, "maxLength": 200, "pattern": "^[^/]+$"}}


def openapi_spec() -> dict[str, Any]:
    process_schema = ProcessFileRequest.model_json_schema()
    return {
        "openapi": "3.0.3",
        "info": {"title": "upcfan operator API", "version": "1.0.0",
                 "description": "Status, listings, cancel and deliberate retry of failed items. "
                                "There is no 'recover' operation: nothing re-runs by itself."},
        "paths": {
            "/health": {"get": {"operationId": "health", "responses": {
                "200": _resp("Firestore and the item queue are reachable; mode (live or dry_run) and "
                              "default_handler say what dropped files run"), **_errors(503)}}},
            "/openapi.json": {"get": {"operationId": "openapi", "responses": {"200": _resp("this document")}}},
            "/api/batch/process": {"post": {
                "operationId": "process",
                "requestBody": {"required": True, "content": {"application/json": {"schema": process_schema}}},
                "responses": {"202": _resp("job created or found: {job_id, status, created}"),
                              **_errors(400, 404, 422)}}},
            "/api/batch/status/{job_id}": {"get": {
                "operationId": "status", "parameters": [_JOB_ID],
                "responses": {"200": _resp("job status, counts, percent, rate, ETA, stall flag"), **_errors(404)}}},
            "/api/batch/jobs": {"get": {
                "operationId": "jobs", "parameters": _query_params(ListJobsQuery),
                "responses": {"200": _resp("jobs newest first: {jobs, next_cursor}"), **_errors(400)}}},
            "/api/batch/jobs/{job_id}/items": {"get": {
                "operationId": "items", "parameters": [_JOB_ID, *_query_params(ListItemsQuery)],
                "responses": {"200": _resp("items (or invalid/duplicate line records): {items, next_cursor}"),
                              **_errors(400, 404)}}},
            "/api/batch/jobs/{job_id}/events": {"get": {
                "operationId": "events", "parameters": [_JOB_ID, *_query_params(ListEventsQuery)],
                "responses": {"200": _resp("the job's events, oldest first: {events: [{id, type, actor, at, "
                                           "details}], next_cursor}"), **_errors(400, 404)}}},
            "/api/batch/jobs/{job_id}/results.csv": {"get": {
                "operationId": "results_csv", "parameters": [_JOB_ID],
                "responses": {"200": {"description": "the results manifest, streamed: "
                                                     "line,upc,gtin,status,error_code,error_message,offer_id",
                                      "content": {"text/csv": {"schema": {"type": "string"}}}},
                              **_errors(404)}}},
            "/api/batch/jobs/{job_id}/cancel": {"post": {
                "operationId": "cancel", "parameters": [_JOB_ID],
                "responses": {"200": _resp("cancelled (idempotent)"), **_errors(404, 409)}}},
            "/api/batch/jobs/{job_id}/redrive": {"post": {
                "operationId": "redrive", "parameters": [_JOB_ID],
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": RedriveRequest.model_json_schema()}}},
                "responses": {"200": _resp("stranded open items (queued, or processing with a lapsed lease, "
                                           "whose task is gone): listed (dry_run) or given one new task each"),
                              **_errors(400, 404, 409)}}},
            "/api/batch/jobs/{job_id}/pause": {"post": {
                "operationId": "pause", "parameters": [_JOB_ID],
                "requestBody": {"required": False, "content": {"application/json": {
                    "schema": _body_schema(PauseRequest)}}},
                "responses": {"200": _resp("paused (idempotent): no new side effects until resumed"),
                              **_errors(400, 404, 409)}}},
            "/api/batch/jobs/{job_id}/resume": {"post": {
                "operationId": "resume", "parameters": [_JOB_ID],
                "responses": {"200": _resp("resumed to the status it was paused from (idempotent)"),
                              **_errors(404, 409)}}},
            "/api/batch/jobs/{job_id}/retry-failed": {"post": {
                "operationId": "retry_failed", "parameters": [_JOB_ID],
                "responses": {"200": _resp("retry round started or resumed"), **_errors(404, 409)}}},
        },
        "components": {"schemas": {"Error": _ERROR}},
    }
