"""Chaos fixtures: `chaos_stack`, a private local stack (see chaos_stack.py for why and how)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from chaos_stack import REPO_ROOT, ChaosStack, _devstack


@pytest.fixture(scope="module")
def chaos_stack():
    from devstack.stack import read_env_file
    from shared.clients import reset_clients

    local_dir = Path(os.environ.get("UPCFAN_CHAOS_LOCAL_DIR", REPO_ROOT / ".local" / "chaos")).resolve()
    started = _devstack(["status"], local_dir, 60).returncode != 0
    if started:
        up = _devstack(["up"], local_dir, 240)
        if up.returncode != 0:
            pytest.fail(f"chaos stack did not start:\n{up.stdout[-2000:]}\n{up.stderr[-3000:]}")
    env = read_env_file(local_dir / "stack.env")
    assert env, f"no stack.env under {local_dir}"
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    reset_clients()
    stack = ChaosStack(local_dir=local_dir, env=env, started_here=started)
    try:
        yield stack
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        reset_clients()
        if started and os.environ.get("UPCFAN_KEEP_STACK") != "1":
            _devstack(["down"], local_dir, 120)
