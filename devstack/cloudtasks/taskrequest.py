"""CreateTask's request checks, in the order Cloud Tasks reports them, into a TaskRequest."""

from __future__ import annotations

import base64
import enum
import json
import random
import re
from collections.abc import Container
from dataclasses import dataclass

from devstack.cloudtasks import protojson as pj
from devstack.cloudtasks.errors import invalid
from devstack.cloudtasks.protojson import HttpMethod

TASK_RE = re.compile(r"^(projects/[^/]+/locations/[^/]+/queues/[^/]+)/tasks/([^/]*)$")
TASK_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,500}$")
MAX_TASK_BYTES = 100 * 1024  # "The maximum task size is 100KB."
BODY_METHODS = {"POST", "PUT", "PATCH"}


class TargetKind(enum.Enum):
    """What a task's request is for; the value names it in error messages (task.<value>_request)."""

    HTTP = "http"
    APP_ENGINE = "appengine"  # stored and listed, never delivered locally


@dataclass
class TaskRequest:
    """A validated httpRequest / appEngineHttpRequest: `json` is stored and echoed back."""

    kind: TargetKind
    json: dict
    method: str
    body: bytes
    headers: dict
    url: str = ""
    auth: dict | None = None  # {"oidcToken": {...}} or {"oauthToken": {...}}


def task_identity(parent: str, name: str, taken: Container[str]) -> tuple[str, str]:
    """(task id, full name): the given name checked, or a random 19-digit id as Cloud Tasks makes."""
    if not name:
        task_id = str(random.randrange(10**18, 10**19))
        while task_id in taken:
            task_id = str(random.randrange(10**18, 10**19))
        return task_id, f"{parent}/tasks/{task_id}"
    m = TASK_RE.match(name)
    if not m:
        raise invalid(f"Invalid task name {name!r}: expected {parent}/tasks/TASK_ID")
    if m.group(1) != parent:
        raise invalid(f"Task name {name!r} does not belong to queue {parent}")
    task_id = m.group(2)
    if not TASK_ID_RE.match(task_id):
        raise invalid(
            f"Invalid TASK_ID {task_id[:80]!r}: only letters, digits, hyphens and underscores, "
            "1 to 500 characters"
        )
    return task_id, name


def parse_request(tj: dict, queue_extra: dict) -> TaskRequest:
    """The task's request, checked; `queue_extra` holds the queue's httpTarget, if any."""
    kind, req = _request_json(tj, queue_extra)
    method = _request_method(req)
    body = _request_body(req, method)
    headers = _request_headers(req)
    request = TaskRequest(kind=kind, json=req, method=method, body=body, headers=headers)
    if kind is TargetKind.HTTP:
        request.url, request.auth = _http_target(req, queue_extra)
    else:
        req["relativeUri"] = _relative_uri(req)
    return request


def _request_json(tj: dict, queue_extra: dict) -> tuple[TargetKind, dict]:
    """Which of httpRequest / appEngineHttpRequest the task has (a queue httpTarget allows neither)."""
    http = tj.get("httpRequest")
    app = tj.get("appEngineHttpRequest")
    if http is not None and app is not None:
        raise invalid("Only one of task.http_request and task.app_engine_http_request may be set")
    if http is None and app is None:
        if "httpTarget" not in queue_extra:
            raise invalid("task.http_request or task.app_engine_http_request is required")
        http = {}
    kind = TargetKind.HTTP if http is not None else TargetKind.APP_ENGINE
    return kind, dict(pj.expect_obj(http if kind is TargetKind.HTTP else app, f"task.{kind.value}_request"))


def _request_method(req: dict) -> str:
    method = pj.parse_enum(req.get("httpMethod", 0), HttpMethod, "http_method")
    name = method.name if method else HttpMethod.POST.name
    req["httpMethod"] = name
    return name


def _request_body(req: dict, method: str) -> bytes:
    """The base64 body (standard or URL-safe alphabet); only POST, PUT and PATCH may have one."""
    body_b64 = pj.expect_str(req.get("body"), "body")
    try:
        body = base64.b64decode(body_b64.encode(), altchars=b"-_" if ("-" in body_b64 or "_" in body_b64) else None,
                                validate=True) if body_b64 else b""
    except Exception:
        raise invalid("Invalid value at 'task.http_request.body': not valid base64") from None
    if body and method not in BODY_METHODS:
        raise invalid(f"A request body is allowed only for POST, PUT or PATCH, not {method}")
    return body


def _request_headers(req: dict) -> dict:
    headers = pj.expect_obj(req.get("headers"), "headers")
    for k, v in headers.items():
        if not isinstance(v, str):
            raise invalid(f"Invalid value for header {k!r}: expected a string")
    return headers


def _http_target(req: dict, queue_extra: dict) -> tuple[str, dict | None]:
    """(url, auth) of an HTTP task; a missing URL comes from the queue's httpTarget.uriOverride."""
    url = pj.expect_str(req.get("url"), "task.http_request.url")
    target = queue_extra.get("httpTarget") or {}
    if not url and target.get("uriOverride"):
        url = _url_from_override(target["uriOverride"])
    if not url:
        raise invalid("task.http_request.url is required")
    if not re.match(r"^https?://[^/\s]+", url) or len(url) > 2083:
        raise invalid(f"Invalid task.http_request.url {url[:100]!r}: must be an absolute http(s) URL of at most 2083 characters")
    req["url"] = url
    if req.get("oidcToken") is not None and req.get("oauthToken") is not None:
        raise invalid("Only one of oidc_token and oauth_token may be set")
    if req.get("oidcToken") is not None:
        return url, {"oidcToken": pj.expect_obj(req["oidcToken"], "oidc_token")}
    if req.get("oauthToken") is not None:
        return url, {"oauthToken": pj.expect_obj(req["oauthToken"], "oauth_token")}
    return url, None


def _url_from_override(ov: dict) -> str:
    scheme = "http" if ov.get("scheme") in ("HTTP", 1) else "https"
    host = ov.get("host", "")
    port = f":{ov['port']}" if ov.get("port") else ""
    path = (ov.get("pathOverride") or {}).get("path", "/")
    return f"{scheme}://{host}{port}{path}" if host else ""


def _relative_uri(req: dict) -> str:
    rel = pj.expect_str(req.get("relativeUri"), "relative_uri") or "/"
    if not rel.startswith("/"):
        raise invalid("app_engine_http_request.relative_uri must start with '/'")
    return rel


def check_task_size(request: TaskRequest, name: str) -> None:
    """Approximates the serialized task size: body, name, URL, headers and the other request fields."""
    headers_size = sum(len(k) + len(v) for k, v in request.headers.items())
    others = {k: v for k, v in request.json.items() if k not in ("body", "headers")}
    size = len(request.body) + len(name) + len(request.url) + headers_size + len(json.dumps(others))
    if size > MAX_TASK_BYTES:
        raise invalid(f"Task size too large: {size} bytes exceeds the maximum task size of {MAX_TASK_BYTES} bytes (100KB)")


def schedule_time(tj: dict, now: float) -> float:
    """schedule_time: unset or past means now; at most 30 days ahead."""
    sched = pj.parse_timestamp(tj["scheduleTime"], "task.schedule_time") if tj.get("scheduleTime") else now
    if sched < now:
        sched = now
    if sched > now + 30 * 86400:
        raise invalid("task.schedule_time cannot be more than 30 days in the future")
    return sched
