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
    return make_tasks_client(os.environ.get("CLOUD_TASKS_EMULATOR_HOST", ""))


def make_tasks_client(emulator_host: str = "", credentials=None):
    """The official Cloud Tasks client; against an emulator it uses the REST transport over http, with
    `credentials` (default: `local_credentials()`)."""
    from google.cloud import tasks_v2

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


def reset_clients() -> None:
    """Forget cached clients and settings (tests that change the environment call this)."""
    from shared import config

    for fn in (firestore_client, storage_client, tasks_client, config.settings):
        fn.cache_clear()


def _tune_rest_session(session) -> None:
    """Local emulator only: skip per-request proxy lookups in os.environ (a measurable share of each
    call) and keep enough pooled connections for fan-out threads."""
    if session is None:
        return
    from requests.adapters import HTTPAdapter

    session.trust_env = False
    session.mount("http://", HTTPAdapter(pool_connections=4, pool_maxsize=64))
