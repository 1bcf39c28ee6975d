"""aiohttp app: the Cloud Tasks v2 REST surface (as the official client's REST transport sends it)
plus the emulator-only inspection API under /_emulator/."""

from __future__ import annotations

import json
import logging
import re
import time
import traceback

from aiohttp import web

from devstack.cloudtasks import protojson as pj
from devstack.cloudtasks.emulator import Emulator
from devstack.cloudtasks.errors import ApiError, invalid, not_found
from devstack.iam import Denied, Enforcer

log = logging.getLogger("cloudtasks-emulator")

EMU_KEY = web.AppKey("emulator", Emulator)
ENFORCER_KEY = web.AppKey("enforcer", Enforcer)

_Q = r"projects/[^/]+/locations/[^/]+/queues/[^/:]+"
_T = _Q + r"/tasks/[^/:]+"
_L = r"projects/[^/]+/locations/[^/:]+"

# (method, regex over the path after /v2/, handler name)
ROUTES = [
    ("POST", rf"^(?P<parent>{_L})/queues$", "create_queue"),
    ("GET", rf"^(?P<parent>{_L})/queues$", "list_queues"),
    ("GET", rf"^(?P<name>{_Q})$", "get_queue"),
    ("PATCH", rf"^(?P<name>{_Q})$", "update_queue"),
    ("DELETE", rf"^(?P<name>{_Q})$", "delete_queue"),
    ("POST", rf"^(?P<name>{_Q}):pause$", "pause_queue"),
    ("POST", rf"^(?P<name>{_Q}):resume$", "resume_queue"),
    ("POST", rf"^(?P<name>{_Q}):purge$", "purge_queue"),
    ("POST", rf"^(?P<parent>{_Q})/tasks$", "create_task"),
    ("GET", rf"^(?P<parent>{_Q})/tasks$", "list_tasks"),
    ("GET", rf"^(?P<name>{_T})$", "get_task"),
    ("DELETE", rf"^(?P<name>{_T})$", "delete_task"),
    ("POST", rf"^(?P<name>{_T}):run$", "run_task"),
    ("GET", rf"^(?P<name>{_L})$", "get_location"),
    ("GET", r"^(?P<name>projects/[^/:]+)/locations$", "list_locations"),
]
_COMPILED = [(m, re.compile(rx), h) for m, rx, h in ROUTES]
# handler -> the pattern of its name or parent alone (the route without its suffix): the gRPC
# surface gets that field, not a URL path.
ROUTE_FOR = {h: re.compile(rx[:rx.rindex(")") + 1] + "$") for _m, rx, h in ROUTES}


def _json(data, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(data, separators=(",", ":")), status=status, content_type="application/json")


@web.middleware
async def error_middleware(request: web.Request, handler):
    try:
        return await handler(request)
    except ApiError as exc:
        return _json(exc.body(), exc.http)
    except web.HTTPException:
        raise
    except Exception as exc:  # nothing crashes the server
        log.error("internal error", extra={"path": request.path, "error": repr(exc), "trace": traceback.format_exc()})
        return _json({"error": {"code": 500, "message": f"emulator internal error: {type(exc).__name__}: {exc}",
                                "status": "INTERNAL"}}, 500)


async def _body(request: web.Request) -> dict:
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise invalid(f"Invalid JSON payload received. {exc}") from None
    if not isinstance(data, dict):
        raise invalid("Invalid JSON payload received: expected a JSON object")
    return data


def _enum_int(request: web.Request) -> bool:
    return "enum-encoding=int" in request.query.get("$alt", "")


def _view(request: web.Request, body: dict | None = None) -> pj.TaskView:
    raw = request.query.get("responseView") or request.query.get("response_view")
    if raw is None and body:
        raw = body.get("responseView")
    if raw in (None, ""):
        return pj.TaskView.BASIC
    v = pj.parse_enum(int(raw) if isinstance(raw, str) and raw.isdigit() else raw, pj.TaskView, "response_view")
    return v or pj.TaskView.BASIC


# Each route's API method (a key of infra.permissions.METHOD_PERMISSIONS); a FULL response view adds
# `cloudtasks.tasks.fullView` ("(FULL)" methods). The resource is the queue (or location, project).
_METHODS = {
    "create_queue": "CreateQueue", "list_queues": "ListQueues", "get_queue": "GetQueue",
    "update_queue": "UpdateQueue", "delete_queue": "DeleteQueue", "pause_queue": "PauseQueue",
    "resume_queue": "ResumeQueue", "purge_queue": "PurgeQueue", "create_task": "CreateTask",
    "list_tasks": "ListTasks", "get_task": "GetTask", "delete_task": "DeleteTask", "run_task": "RunTask",
    "get_location": "GetLocation", "list_locations": "ListLocations",
}
_HAS_VIEW = {"create_task", "list_tasks", "get_task", "run_task"}
_NO_TOKEN = ("Request is missing required authentication credential. Expected OAuth 2 access token, login "
             "cookie or other valid authentication credential.")
_BAD_TOKEN = ("Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie "
              "or other valid authentication credential.")


async def _iam_checks(request: web.Request, handler: str, groups: dict[str, str]) -> list[tuple[str, str]]:
    """The (method, resource) pairs Google checks for this REST call, in its order."""
    body: dict = {}
    if handler in ("create_task", "run_task"):
        try:
            body = await _body(request)
        except ApiError:
            body = {}  # the handler reports the bad body after the permission check
    full_view = False
    if handler in _HAS_VIEW:
        try:
            full_view = _view(request, body) == pj.TaskView.FULL
        except (ApiError, ValueError):
            pass
    return iam_checks(handler, groups.get("name") or groups.get("parent"), body, full_view)


def iam_checks(handler: str, path: str, body: dict, full_view: bool) -> list[tuple[str, str]]:
    """The (method, resource) pairs Google checks for a call, in its order, whichever transport
    carried it: `path` is the request's name or parent, `body` its JSON form (camelCase, as REST sends
    it), `full_view` whether it asks for the FULL task view."""
    resource = path.split("/tasks/")[0] if handler in ("get_task", "delete_task", "run_task") else path
    method = "cloudtasks." + _METHODS[handler]
    if handler in _HAS_VIEW and full_view:
        method += "(FULL)"
    checks = [(method, resource)]
    if handler == "create_task":
        task = body.get("task") if isinstance(body.get("task"), dict) else {}
        http = task.get("httpRequest") if isinstance(task.get("httpRequest"), dict) else {}
        oidc = http.get("oidcToken") if isinstance(http.get("oidcToken"), dict) else {}
        email = oidc.get("serviceAccountEmail")
        if isinstance(email, str) and email:
            # Cloud Tasks "Create HTTP target tasks": the caller needs iam.serviceAccounts.actAs on
            # the account whose OIDC token the task will carry.
            checks.append(("iam.actAs(oidc_token)", f"projects/{path.split('/')[1]}/serviceAccounts/{email}"))
    return checks


def authorize(enforcer: Enforcer, authorization: str | None, checks: list[tuple[str, str]]) -> None:
    """Enforce the local IAM policy on one call (either transport); ApiError when refused."""
    try:
        enforcer.authorize(authorization, checks)
    except Denied as exc:
        log.warning("iam denied", extra={"principal": exc.email or "<unauthenticated>", "method": exc.method,
                                         "resource": exc.resource, "permission": exc.permission,
                                         "http": exc.status})
        raise _denied(exc) from None


def queue_page(emu: Emulator, parent: str, flt: str, page_size, page_token: str) -> tuple[list, str]:
    """One page of ListQueues: (queues, next_page_token or "")."""
    qs = emu.list_queues(parent, flt)
    size = pj.parse_int(page_size, "page_size", 0, 10_000) or 9800
    start = 0
    if page_token:
        if not page_token.isdigit():
            raise invalid("Invalid page_token")
        start = int(page_token)
    return qs[start:start + size], str(start + size) if start + size < len(qs) else ""


def _denied(exc: Denied) -> ApiError:
    if exc.status == 401:
        return ApiError("UNAUTHENTICATED", f"{_NO_TOKEN if 'no bearer' in exc.detail else _BAD_TOKEN} "
                                           f"(local stack: {exc.detail})")
    # The message Google's APIs give for a missing permission (IAM "Permission error messages").
    return ApiError("PERMISSION_DENIED", f'The principal (user or service account) lacks IAM permission '
                                         f'"{exc.permission}" for the resource "{exc.resource}" '
                                         f'(or the resource may not exist).')


class Api:
    def __init__(self, emu: Emulator, enforcer: Enforcer | None = None):
        self.emu = emu
        self.enforcer = enforcer

    async def _authorize(self, request: web.Request, handler: str, groups: dict[str, str]) -> None:
        authorize(self.enforcer, request.headers.get("Authorization"), await _iam_checks(request, handler, groups))

    async def dispatch(self, request: web.Request) -> web.Response:
        path = request.match_info["tail"]
        method = request.method
        matched_path = False
        for m, rx, h in _COMPILED:
            mm = rx.match(path)
            if mm:
                matched_path = True
                if m == method:
                    if self.enforcer is not None:
                        await self._authorize(request, h, mm.groupdict())
                    return await getattr(self, h)(request, **mm.groupdict())
        if matched_path:
            raise ApiError("UNIMPLEMENTED", f"Method {method} is not supported on /v2/{path}")
        if re.search(r":(batchCreate|batchDelete|getIamPolicy|setIamPolicy|testIamPermissions|buffer)$", path) \
                or path.endswith("cmekConfig"):
            raise ApiError("UNIMPLEMENTED", f"/v2/{path} is not implemented by the Cloud Tasks emulator")
        raise not_found(f"Unknown resource path /v2/{path}")

    # queues
    async def create_queue(self, request, parent):
        q = self.emu.create_queue(parent, await _body(request))
        return _json(q.to_json(_enum_int(request)))

    async def list_queues(self, request, parent):
        page, nxt = queue_page(self.emu, parent, request.query.get("filter", ""), request.query.get("pageSize", "0"),
                               request.query.get("pageToken", ""))
        out = {"queues": [q.to_json(_enum_int(request)) for q in page]}
        if nxt:
            out["nextPageToken"] = nxt
        return _json(out)

    async def get_queue(self, request, name):
        return _json(self.emu.get_queue(name).to_json(_enum_int(request)))

    async def update_queue(self, request, name):
        body = await _body(request)
        if body.get("name") not in (None, "", name):
            raise invalid("queue.name in the body does not match the URL")
        q = self.emu.update_queue(name, body, request.query.get("updateMask"))
        return _json(q.to_json(_enum_int(request)))

    async def delete_queue(self, request, name):
        self.emu.delete_queue(name)
        return _json({})

    async def pause_queue(self, request, name):
        await _body(request)
        return _json(self.emu.set_state(name, pj.QueueState.PAUSED).to_json(_enum_int(request)))

    async def resume_queue(self, request, name):
        await _body(request)
        return _json(self.emu.set_state(name, pj.QueueState.RUNNING).to_json(_enum_int(request)))

    async def purge_queue(self, request, name):
        await _body(request)
        return _json(self.emu.purge_queue(name).to_json(_enum_int(request)))

    # tasks
    async def create_task(self, request, parent):
        body = await _body(request)
        task_json = pj.expect_obj(body.get("task"), "task")
        if "task" not in body:
            raise invalid("task is required")
        view = _view(request, body)
        t = self.emu.create_task(parent, task_json)
        return _json(self.emu.task_json(t, view, _enum_int(request)))

    async def list_tasks(self, request, parent):
        size = pj.parse_int(request.query.get("pageSize", "0"), "page_size", 0, 1_000_000)
        tasks, nxt = self.emu.list_tasks(parent, size, request.query.get("pageToken", ""))
        view, ei = _view(request), _enum_int(request)
        out = {"tasks": [self.emu.task_json(t, view, ei) for t in tasks]}
        if nxt:
            out["nextPageToken"] = nxt
        return _json(out)

    async def get_task(self, request, name):
        return _json(self.emu.task_json(self.emu.get_task(name), _view(request), _enum_int(request)))

    async def delete_task(self, request, name):
        self.emu.delete_task(name)
        return _json({})

    async def run_task(self, request, name):
        body = await _body(request)
        view = _view(request, body)
        t = self.emu.run_task(name)
        return _json(self.emu.task_json(t, view, _enum_int(request)))

    # locations
    async def get_location(self, request, name):
        return _json(location_json(name))

    async def list_locations(self, request, name):
        return _json(locations_json(self.emu, name))


def location_json(name: str) -> dict:
    loc = name.split("/")[-1]
    return {"name": name, "locationId": loc, "displayName": loc}


def locations_json(emu: Emulator, project: str) -> dict:
    locs = sorted({q.location for q in emu.queues.values() if q.project == project.split("/")[1]} or {"us-central1"})
    return {"locations": [{"name": f"{project}/locations/{loc}", "locationId": loc} for loc in locs]}


# ---------------------------------------------------------------- inspection API
async def emu_health(request):
    emu = request.app[EMU_KEY]
    return _json({"ok": True, "queues": len(emu.queues), "uptime_s": round(time.time() - emu.started_at, 3)})


async def emu_get_config(request):
    return _json(request.app[EMU_KEY].config)


async def emu_set_config(request):
    emu = request.app[EMU_KEY]
    body = await _body(request)
    unknown = set(body) - set(emu.config)
    if unknown:
        raise invalid(f"Unknown config keys: {sorted(unknown)}; known: {sorted(emu.config)}")
    new = dict(emu.config)
    if "tombstone_seconds" in body:
        v = pj.parse_float(body["tombstone_seconds"], "tombstone_seconds")
        if v < 0:
            raise invalid("tombstone_seconds must be >= 0")
        new["tombstone_seconds"] = v
    if "duplicate_deliveries" in body:
        new["duplicate_deliveries"] = pj.parse_int(body["duplicate_deliveries"], "duplicate_deliveries", 0, 50)
    if "duplicate_2xx_ends_task" in body:
        if not isinstance(body["duplicate_2xx_ends_task"], bool):
            raise invalid("duplicate_2xx_ends_task must be true or false")
        new["duplicate_2xx_ends_task"] = body["duplicate_2xx_ends_task"]
    if "min_dispatch_deadline_seconds" in body:
        v = pj.parse_float(body["min_dispatch_deadline_seconds"], "min_dispatch_deadline_seconds")
        if not 0 < v <= 1800:
            raise invalid("min_dispatch_deadline_seconds must be in (0, 1800]")
        new["min_dispatch_deadline_seconds"] = v
    emu.config.update(new)
    log.info("config updated", extra={"config": emu.config})
    return _json(emu.config)


async def emu_attempts(request):
    emu = request.app[EMU_KEY]
    key = (request.match_info["queue_id"], request.match_info["task_id"])
    hist = emu.history.get(key)
    if hist is None:
        raise not_found(f"No dispatch history for task {key[1]} in queue {key[0]}")
    live = None
    for q in emu.queues.values():
        if q.queue_id == key[0] and key[1] in q.tasks:
            live = q.tasks[key[1]]
    return _json({"queue": key[0], "task": key[1], "live": live is not None, "attempts": hist})


async def emu_exhausted(request):
    return _json({"exhausted": list(request.app[EMU_KEY].exhausted_log)})


async def emu_stats(request):
    emu = request.app[EMU_KEY]
    return _json({"queues": emu.stats, "tombstones": len(emu.tombstones)})


async def emu_reset(request):
    await request.app[EMU_KEY].reset()
    return _json({"ok": True})


def make_app(emu: Emulator, enforcer: Enforcer | None = None) -> web.Application:
    """`enforcer`: check every /v2 call against an IAM policy (the local stack); None: open (the
    emulator's own conformance tests). The /_emulator inspection API is always open."""
    app = web.Application(middlewares=[error_middleware], client_max_size=8 * 1024 * 1024)
    app[EMU_KEY] = emu
    api = Api(emu, enforcer)
    app.router.add_route("*", "/v2/{tail:.*}", api.dispatch)
    app.router.add_get("/_emulator/health", emu_health)
    app.router.add_get("/_emulator/config", emu_get_config)
    app.router.add_post("/_emulator/config", emu_set_config)
    app.router.add_get("/_emulator/tasks/{queue_id}/{task_id}/attempts", emu_attempts)
    app.router.add_get("/_emulator/exhausted", emu_exhausted)
    app.router.add_get("/_emulator/stats", emu_stats)
    app.router.add_post("/_emulator/reset", emu_reset)

    async def on_startup(_app):
        await emu.start()

    async def on_cleanup(_app):
        await emu.close()
        if enforcer is not None:
            enforcer.close()

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app
