"""Chaos fixtures: `chaos_stack`, a private local stack (see chaos_stack.py for why and how)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from chaos_stack import CHAOS_ITEM_RETRY, REPO_ROOT, ChaosStack

from devstack.testing import private_stack, stack_env_applied


@pytest.fixture(scope="module")
def chaos_stack():
    local_dir = Path(os.environ.get("UPCFAN_CHAOS_LOCAL_DIR", REPO_ROOT / ".local" / "chaos")).resolve()
    # private_stack raises RuntimeError with the logs if the stack cannot start.
    with private_stack(local_dir, up_timeout_s=240) as private, stack_env_applied(private.env) as env:
        stack = ChaosStack(local_dir=local_dir, env=env, started_here=private.started_here)
        # The chaos suite scales time (a 5 s lease, CHAOS_WORKER_ENV): item retries back off at most
        # CHAOS_MAX_BACKOFF_S instead of production's 300 s, or the tail of tasks answered 409 while a
        # duplicate delivery held their item would outlast the suite's deadlines.
        stack.update_queue_retry("upcfan-items", **CHAOS_ITEM_RETRY)
        try:
            yield stack
        finally:
            stack.restore_queue_retry("upcfan-items")
