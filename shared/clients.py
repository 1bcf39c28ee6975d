"""Lazily created Google clients, pointed at the local emulators when their env vars are set."""

from __future__ import annotations

import os
import threading
from functools import lru_cache

from shared.config import settings

_lock = threading.Lock()


@lru_cache(maxsize=1)
def firestore_client():
    from google.cloud import firestore

    # With FIRESTORE_EMULATOR_HOST set the client talks to the emulator without credentials.
    return firestore.Client(project=settings().project)


# Against the local stack a caller proves who it is as it would to Google: a bearer token on every
# call. A function process gets its service account's token (UPCFAN_LOCAL_ACCESS_TOKEN, set by the
# stack), anything else the operator's (UPCFAN_OPERATOR_TOKEN, from .local/stack.env).
LOCAL_IDENTITY_VARS = ("UPCFAN_LOCAL_ACCESS_TOKEN", "UPCFAN_OPERATOR_TOKEN")


def local_credentials():
    """Credentials for the local emulators: the caller's local token, else anonymous (refused where
    the stack enforces IAM)."""
    token = next((os.environ[v] for v in LOCAL_IDENTITY_VARS if os.environ.get(v)), "")
    if token:
        from google.oauth2.credentials import Credentials

        return Credentials(token=token)
    from google.auth.credentials import AnonymousCredentials

    return AnonymousCredentials()


@lru_cache(maxsize=1)
def storage_client():
    from google.cloud import storage

    if os.environ.get("STORAGE_EMULATOR_HOST"):
        return storage.Client(project=settings().project, credentials=local_credentials())
    return storage.Client(project=settings().project)


@lru_cache(maxsize=1)
def tasks_client():
    return make_tasks_client(os.environ.get("CLOUD_TASKS_EMULATOR_HOST", ""),
                             grpc_host=os.environ.get("CLOUD_TASKS_EMULATOR_GRPC_HOST", ""))


def make_tasks_client(emulator_host: str = "", credentials=None, grpc_host: str = ""):
    """The official Cloud Tasks client. Against the emulator: its gRPC endpoint when `grpc_host` is
    given (production's transport, so the same exception classes), else REST over http to
    `emulator_host`; either way with `credentials` (default: `local_credentials()`). Neither: Google,
    with the default (gRPC) transport and application default credentials."""
    from google.cloud import tasks_v2

    if grpc_host:
        from google.cloud.tasks_v2.services.cloud_tasks.transports import CloudTasksGrpcTransport

        channel = _emulator_channel(grpc_host, credentials or local_credentials())
        return tasks_v2.CloudTasksClient(transport=CloudTasksGrpcTransport(channel=channel))
    if emulator_host:
        from google.api_core.client_options import ClientOptions

        endpoint = emulator_host if emulator_host.startswith("http") else f"http://{emulator_host}"
        client = tasks_v2.CloudTasksClient(
            transport="rest",
            client_options=ClientOptions(api_endpoint=endpoint),
            credentials=credentials or local_credentials(),
        )
        _tune_rest_session(getattr(client._transport, "_session", None))
        return client
    return tasks_v2.CloudTasksClient()


# Local emulator channels: no TLS, so no proxy either (a proxy from the environment would swallow
# plaintext HTTP/2 to 127.0.0.1); no message size limits (the client's own defaults); and reconnects
# within a second after the emulator restarts (tests bounce it), not gRPC's default of up to 2 min.
EMULATOR_CHANNEL_OPTIONS = (
    ("grpc.enable_http_proxy", 0),
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)
_channels: dict[str, object] = {}


def _emulator_channel(host: str, credentials):
    """A channel to the emulator's gRPC endpoint carrying `credentials` on every call.

    One plaintext channel per host and process (created on first use, never at import, so a forking
    server creates it in each worker), shared by every client and thread: gRPC multiplexes calls
    over one HTTP/2 connection. The official client attaches credentials only to TLS channels, so
    over plaintext the caller's bearer token is added by an interceptor, per client."""
    import grpc

    target = host.split("://", 1)[-1]
    with _lock:
        channel = _channels.get(target)
        if channel is None:
            channel = _channels[target] = grpc.insecure_channel(target, options=list(EMULATOR_CHANNEL_OPTIONS))
    return grpc.intercept_channel(channel, _bearer_token_interceptor()(credentials))


@lru_cache(maxsize=1)
def _bearer_token_interceptor():
    """The interceptor class (built on first use: grpc is imported only when a channel is made)."""
    import grpc

    class BearerToken(grpc.UnaryUnaryClientInterceptor):
        """Adds `authorization: Bearer <token>` (what google-auth puts on Google's TLS channels) to
        each call's metadata; nothing for anonymous credentials."""

        def __init__(self, credentials):
            self.credentials = credentials

        def intercept_unary_unary(self, continuation, details, request):
            headers: dict[str, str] = {}
            self.credentials.apply(headers)
            if headers.get("authorization"):
                token = ("authorization", headers["authorization"])
                details = details._replace(metadata=[*(details.metadata or ()), token])
            return continuation(details, request)

    return BearerToken


def reset_clients() -> None:
    """Forget cached clients, channels and settings (tests that change the environment call this)."""
    from shared import config

    for fn in (firestore_client, storage_client, tasks_client, config.settings):
        fn.cache_clear()
    with _lock:
        _channels.clear()  # not closed: a client made before may still be in use


def _tune_rest_session(session) -> None:
    """Local emulator only: skip per-request proxy lookups in os.environ (a measurable share of each
    call) and keep enough pooled connections for fan-out threads."""
    if session is None:
        return
    from requests.adapters import HTTPAdapter

    session.trust_env = False
    session.mount("http://", HTTPAdapter(pool_connections=4, pool_maxsize=64))
