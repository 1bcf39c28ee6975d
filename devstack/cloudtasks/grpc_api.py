"""The Cloud Tasks v2 gRPC surface (google.cloud.tasks.v2.CloudTasks and the google.cloud.location
mixin), as the official client's gRPC transport calls it: production's transport.

It shares everything with the REST surface (server.py): the Emulator core, the IAM checks and their
enforcement, the status of every error. Requests are turned into the JSON the REST transport would
have sent (camelCase, enums as ints, bytes as base64) and handed to the same core; answers go back
from the same JSON. Generic handlers over the client's own protobuf classes: no generated code.

Runs on the emulator's asyncio loop (grpc.aio), so the core is never touched from another thread.
"""

from __future__ import annotations

import logging
import traceback

import grpc
from google.cloud import tasks_v2
from google.cloud.location import locations_pb2
from google.protobuf import empty_pb2, json_format
from google.protobuf.message import DecodeError

from devstack.cloudtasks import protojson as pj
from devstack.cloudtasks.emulator import Emulator
from devstack.cloudtasks.errors import ApiError, invalid
from devstack.cloudtasks.server import ROUTE_FOR, authorize, iam_checks, location_json, locations_json, queue_page
from devstack.iam import Enforcer

log = logging.getLogger("cloudtasks-emulator")

SERVICE = "google.cloud.tasks.v2.CloudTasks"
LOCATIONS_SERVICE = "google.cloud.location.Locations"
# As the REST surface's request size limit (client_max_size); the official client sends any size.
MAX_MESSAGE_BYTES = 8 * 1024 * 1024


def _pb(message_class):
    """The raw protobuf class behind a proto-plus class (tasks_v2.*) or the class itself (pb2)."""
    return message_class.pb() if hasattr(message_class, "pb") else message_class


def _to_json(message) -> dict:
    return json_format.MessageToDict(message, use_integers_for_enums=True)


def _from_json(data: dict, message_class):
    return json_format.ParseDict(data, _pb(message_class)())


def _view(raw: int) -> pj.TaskView:
    return pj.TaskView(raw) if raw in (pj.TaskView.BASIC, pj.TaskView.FULL) else pj.TaskView.BASIC


class GrpcApi:
    """One method per RPC: `(request pb, context) -> response pb`, errors aborted with the status the
    REST surface answers with (ApiError.status is a google.rpc code name, as grpc.StatusCode's)."""

    def __init__(self, emu: Emulator, enforcer: Enforcer | None = None):
        self.emu = emu
        self.enforcer = enforcer

    async def _call(self, context: grpc.aio.ServicerContext, handler: str, path: str, run, body: dict | None = None,
                    full_view: bool = False):
        try:
            if not ROUTE_FOR[handler].match(path):
                raise invalid(f"Invalid resource name {path!r} for {handler}")
            if self.enforcer is not None:
                metadata = dict(context.invocation_metadata() or ())
                checks = iam_checks(handler, path, body or {}, full_view)
                authorize(self.enforcer, metadata.get("authorization"), checks)
            return run()
        except ApiError as exc:
            error = exc
        except Exception as exc:  # nothing crashes the server
            log.error("internal error", extra={"rpc": handler, "error": repr(exc), "trace": traceback.format_exc()})
            error = ApiError("INTERNAL", f"emulator internal error: {type(exc).__name__}: {exc}")
        await context.abort(grpc.StatusCode[error.status], error.message)

    # queues
    async def create_queue(self, request, context):
        body = _to_json(request.queue)
        return await self._call(context, "create_queue", request.parent,
                                lambda: _from_json(self.emu.create_queue(request.parent, body).to_json(True),
                                                   tasks_v2.Queue))

    async def list_queues(self, request, context):
        def run():
            page, nxt = queue_page(self.emu, request.parent, request.filter, request.page_size, request.page_token)
            return _from_json({"queues": [q.to_json(True) for q in page], "nextPageToken": nxt},
                              tasks_v2.ListQueuesResponse)
        return await self._call(context, "list_queues", request.parent, run)

    async def get_queue(self, request, context):
        return await self._call(context, "get_queue", request.name,
                                lambda: _from_json(self.emu.get_queue(request.name).to_json(True), tasks_v2.Queue))

    async def update_queue(self, request, context):
        body = _to_json(request.queue)
        mask = _to_json(request).get("updateMask")  # "a.b,c": the FieldMask's JSON form, as REST sends it
        return await self._call(context, "update_queue", request.queue.name, lambda: _from_json(
            self.emu.update_queue(request.queue.name, body, mask).to_json(True), tasks_v2.Queue))

    async def delete_queue(self, request, context):
        return await self._call(context, "delete_queue", request.name,
                                lambda: self.emu.delete_queue(request.name) or empty_pb2.Empty())

    async def pause_queue(self, request, context):
        return await self._call(context, "pause_queue", request.name, lambda: _from_json(
            self.emu.set_state(request.name, pj.QueueState.PAUSED).to_json(True), tasks_v2.Queue))

    async def resume_queue(self, request, context):
        return await self._call(context, "resume_queue", request.name, lambda: _from_json(
            self.emu.set_state(request.name, pj.QueueState.RUNNING).to_json(True), tasks_v2.Queue))

    async def purge_queue(self, request, context):
        return await self._call(context, "purge_queue", request.name, lambda: _from_json(
            self.emu.purge_queue(request.name).to_json(True), tasks_v2.Queue))

    # tasks
    async def create_task(self, request, context):
        body = _to_json(request)
        view = _view(request.response_view)

        def run():
            if not request.HasField("task"):
                raise invalid("task is required")
            t = self.emu.create_task(request.parent, body["task"])
            return _from_json(self.emu.task_json(t, view, True), tasks_v2.Task)
        return await self._call(context, "create_task", request.parent, run, body, view == pj.TaskView.FULL)

    async def list_tasks(self, request, context):
        view = _view(request.response_view)

        def run():
            size = pj.parse_int(request.page_size, "page_size", 0, 1_000_000)
            tasks, nxt = self.emu.list_tasks(request.parent, size, request.page_token)
            return _from_json({"tasks": [self.emu.task_json(t, view, True) for t in tasks], "nextPageToken": nxt},
                              tasks_v2.ListTasksResponse)
        return await self._call(context, "list_tasks", request.parent, run, None, view == pj.TaskView.FULL)

    async def get_task(self, request, context):
        return await self._one_task(context, "get_task", request, self.emu.get_task)

    async def delete_task(self, request, context):
        return await self._call(context, "delete_task", request.name,
                                lambda: self.emu.delete_task(request.name) or empty_pb2.Empty())

    async def run_task(self, request, context):
        return await self._one_task(context, "run_task", request, self.emu.run_task)

    async def _one_task(self, context, rpc: str, request, act):
        """An RPC on one named task that answers that task in the requested view (GetTask, RunTask)."""
        view = _view(request.response_view)
        return await self._call(context, rpc, request.name, lambda: _from_json(
            self.emu.task_json(act(request.name), view, True), tasks_v2.Task),
            None, view == pj.TaskView.FULL)

    # locations (the client's mixin methods)
    async def get_location(self, request, context):
        return await self._call(context, "get_location", request.name,
                                lambda: _from_json(location_json(request.name), locations_pb2.Location))

    async def list_locations(self, request, context):
        return await self._call(context, "list_locations", request.name, lambda: _from_json(
            locations_json(self.emu, request.name), locations_pb2.ListLocationsResponse))


# RPC name -> (GrpcApi method, request class, response class (documentation: responses serialize themselves))
_TASKS_RPCS = {
    "CreateQueue": ("create_queue", tasks_v2.CreateQueueRequest, tasks_v2.Queue),
    "ListQueues": ("list_queues", tasks_v2.ListQueuesRequest, tasks_v2.ListQueuesResponse),
    "GetQueue": ("get_queue", tasks_v2.GetQueueRequest, tasks_v2.Queue),
    "UpdateQueue": ("update_queue", tasks_v2.UpdateQueueRequest, tasks_v2.Queue),
    "DeleteQueue": ("delete_queue", tasks_v2.DeleteQueueRequest, empty_pb2.Empty),
    "PauseQueue": ("pause_queue", tasks_v2.PauseQueueRequest, tasks_v2.Queue),
    "ResumeQueue": ("resume_queue", tasks_v2.ResumeQueueRequest, tasks_v2.Queue),
    "PurgeQueue": ("purge_queue", tasks_v2.PurgeQueueRequest, tasks_v2.Queue),
    "CreateTask": ("create_task", tasks_v2.CreateTaskRequest, tasks_v2.Task),
    "ListTasks": ("list_tasks", tasks_v2.ListTasksRequest, tasks_v2.ListTasksResponse),
    "GetTask": ("get_task", tasks_v2.GetTaskRequest, tasks_v2.Task),
    "DeleteTask": ("delete_task", tasks_v2.DeleteTaskRequest, empty_pb2.Empty),
    "RunTask": ("run_task", tasks_v2.RunTaskRequest, tasks_v2.Task),
}
_LOCATION_RPCS = {
    "GetLocation": ("get_location", locations_pb2.GetLocationRequest, locations_pb2.Location),
    "ListLocations": ("list_locations", locations_pb2.ListLocationsRequest, locations_pb2.ListLocationsResponse),
}


def _parsing(rpc: str, handle, request_class):
    """`handle` behind our own parsing of the request bytes: bytes that are no `request_class` get
    INVALID_ARGUMENT with the reason (a request_deserializer's failure reaches the client as UNKNOWN)."""
    parse = _pb(request_class).FromString

    async def handler(raw: bytes, context: grpc.aio.ServicerContext):
        try:
            request = parse(raw)
        except DecodeError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"Invalid {rpc} request message: {exc}")
        return await handle(request, context)

    return handler


def _handlers(api: GrpcApi, service: str, rpcs: dict) -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(service, {
        rpc: grpc.unary_unary_rpc_method_handler(
            _parsing(rpc, getattr(api, method), request),
            response_serializer=lambda message: message.SerializeToString())
        for rpc, (method, request, _response) in rpcs.items()
    })


async def start_grpc_server(emu: Emulator, enforcer: Enforcer | None, host: str,
                            port: int) -> tuple[grpc.aio.Server, int]:
    """Serve the gRPC surface on host:port (0: a free port); returns the started server and its port.
    RPCs it does not serve (BatchCreate, IAM, CMEK, BufferTask) answer UNIMPLEMENTED, as over REST."""
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                      ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                                      ("grpc.so_reuseport", 0)])
    api = GrpcApi(emu, enforcer)
    server.add_generic_rpc_handlers((_handlers(api, SERVICE, _TASKS_RPCS),
                                     _handlers(api, LOCATIONS_SERVICE, _LOCATION_RPCS)))
    bound = server.add_insecure_port(f"{host}:{port}")
    if not bound:
        raise OSError(f"cannot listen for gRPC on {host}:{port}")
    await server.start()
    return server, bound
