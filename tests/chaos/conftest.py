"""Chaos fixtures: `chaos_stack`, a private local stack (see chaos_stack.py for why and how)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from chaos_stack import REPO_ROOT, ChaosStack

from devstack.testing import private_stack


@pytest.fixture(scope="module")
def chaos_stack():
    from shared.clients import reset_clients

    local_dir = Path(os.environ.get("UPCFAN_CHAOS_LOCAL_DIR", REPO_ROOT / ".local" / "chaos")).resolve()
    with private_stack(local_dir, up_timeout_s=240) as private:  # RuntimeError with the logs if it cannot start
        env = private.env
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        reset_clients()
        try:
            yield ChaosStack(local_dir=local_dir, env=env, started_here=private.started_here)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            reset_clients()
