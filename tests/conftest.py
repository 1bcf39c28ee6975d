"""Session fixtures for tests that need the local stack (`@pytest.mark.integration`).

`stack_env` reuses a healthy stack (`scripts/dev up`) or starts one for the session and stops it
at the end (unless another session still uses it, or UPCFAN_KEEP_STACK=1). It sets os.environ
from .local/stack.env and resets the cached clients, so `shared.clients.*` talk to the emulators.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hypothesis
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# Property tests draw the same examples in every run: a CI run must not fail on an example that no
# earlier run drew (a random draw that finds a real bug is for a developer's run: HYPOTHESIS_PROFILE=explore).
hypothesis.settings.register_profile("ci", derandomize=True, database=None)
hypothesis.settings.register_profile("explore", derandomize=False)
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _fresh_settings_after_each_test():
    """A test that changes the environment and re-reads settings leaves them cached when monkeypatch
    restores the environment: forget them, so the next test reads its own environment."""
    yield
    from shared.config import settings

    settings.cache_clear()


@pytest.fixture(scope="session")
def stack_env():
    """dict of the stack.env values (GOOGLE_CLOUD_PROJECT, *_EMULATOR_HOST, UPCFAN_*_URL, ...)."""
    from devstack.testing import stack_env_applied, stack_session

    with stack_session(log=lambda msg: print(f"[devstack] {msg}", file=sys.stderr)) as env, \
            stack_env_applied(env) as applied:
        yield applied


@pytest.fixture(scope="session")
def firestore_db(stack_env):
    """google.cloud.firestore.Client on the emulator (server SDK: rules do not apply)."""
    from shared.clients import firestore_client

    return firestore_client()


@pytest.fixture(scope="session")
def tasks_client(stack_env):
    """The official Cloud Tasks client on the local emulator, over gRPC as the stack's functions use it."""
    from shared.clients import make_tasks_client

    return make_tasks_client(stack_env["CLOUD_TASKS_EMULATOR_HOST"],
                             grpc_host=stack_env.get("CLOUD_TASKS_EMULATOR_GRPC_HOST", ""))


@pytest.fixture(scope="session")
def storage_client(stack_env):
    """The storage client as the local operator (the stack's GCS gate refuses anonymous calls)."""
    from google.cloud import storage

    from shared.clients import local_credentials

    return storage.Client(project=stack_env["GOOGLE_CLOUD_PROJECT"], credentials=local_credentials())


@pytest.fixture(scope="session")
def marketplace(stack_env):
    """Sandbox marketplace helper: stats(), faults(**spec) / faults(), config(**knobs), listings(sku), reset()."""
    from devstack.testing import Marketplace

    return Marketplace(stack_env["UPCFAN_MARKETPLACE_URL"])


@pytest.fixture(scope="session")
def slack_sink(stack_env):
    """Slack webhook sink helper: messages(), fail(status, count, retry_after), reset()."""
    from devstack.testing import SlackSink

    return SlackSink(stack_env["UPCFAN_SLACK_SINK_URL"])


@pytest.fixture(scope="session")
def bridge(stack_env):
    """The finalize → CloudEvent bridge: deliveries(name=None)."""
    from devstack.testing import Bridge

    return Bridge(stack_env["UPCFAN_BRIDGE_URL"])


@pytest.fixture(scope="session")
def operator(stack_env):
    """requests.Session that calls the functions as the local operator (UPCFAN_OPERATOR_TOKEN)."""
    from devstack.testing import operator_session

    return operator_session(stack_env)


@pytest.fixture(scope="session")
def scheduler(stack_env):
    """The local Cloud Scheduler's sweeper job: run(), job(), runs(), pause(), resume()."""
    from devstack.testing import Scheduler

    return Scheduler(stack_env["UPCFAN_SCHEDULER_URL"])


@pytest.fixture
def upload(stack_env, storage_client):
    """upload(data, name=None, content_type="text/csv", metadata=None, bucket=None) -> (bucket, name, generation).

    The object lands in the watched bucket (unless `bucket` says otherwise), so it also starts a job.
    """
    from devstack.testing import unique_name

    def _upload(data: bytes | str, name: str | None = None, content_type: str = "text/csv",
                metadata: dict | None = None, bucket: str | None = None) -> tuple[str, str, str]:
        bucket_name = bucket or stack_env["UPCFAN_BUCKET"]
        blob = storage_client.bucket(bucket_name).blob(name or unique_name("uploads"))
        if metadata:
            blob.metadata = metadata
        blob.upload_from_string(data, content_type=content_type)
        return bucket_name, blob.name, str(blob.generation)

    return _upload
