"""The environment a deployed function starts with (deploy's env and mounted secrets, no emulators),
for unit tests that load a function's main.py: `require_settings` checks it at import."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

from infra import deploy, model

REPO = Path(__file__).resolve().parents[2]
EMULATOR_HOSTS = ("FIRESTORE_EMULATOR_HOST", "STORAGE_EMULATOR_HOST", "CLOUD_TASKS_EMULATOR_HOST",
                  "CLOUD_TASKS_EMULATOR_GRPC_HOST", "PUBSUB_EMULATOR_HOST")


def deployed_env(function: str, default_handler: str = "marketplace_draft") -> dict[str, str]:
    """Exactly what scripts/deploy sets on `function` (secrets get placeholder values)."""
    d = model.Desired(project="demo-prod", region="us-central1", bucket="upcfan-drop", item_queue_shards=1)
    env = deploy.env_vars(d, "https://marketplace.example", default_handler)
    spec = next(s for s in deploy.function_specs(d.item_queue_shards) if s.name == function)
    env.update(spec.env())
    env.update({var: f"placeholder-{secret}" for var, secret in spec.secrets})
    return env


@contextmanager
def environment(env: dict[str, str], drop: tuple[str, ...] = ()):
    """os.environ with `env` set, the emulator hosts and `drop` removed, restored after; settings re-read
    on both sides."""
    from shared.clients import reset_clients

    saved = dict(os.environ)
    for var in (*EMULATOR_HOSTS, *drop):
        os.environ.pop(var, None)
    os.environ.update(env)
    reset_clients()
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
        reset_clients()


def create_function_app(function: str, **kw):
    """functions-framework's app for functions/<function>/main.py, loaded as deployed (settings complete)."""
    from functions_framework import create_app

    with environment(deployed_env(function, **kw)):
        return create_app(function, str(REPO / "functions" / function / "main.py"))
