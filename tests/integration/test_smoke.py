"""`scripts/smoke` against the local stack, as CI runs it (and as an operator runs it after a deploy)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_smoke_passes_on_the_local_stack(stack_env):
    env = {**os.environ, "UPCFAN_PYTHON": sys.executable}
    proc = subprocess.run([str(REPO_ROOT / "scripts" / "smoke")], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    for check in ("health", "tiny file", "plan task", "chunk task", "item task", "progress task",
                  "scheduler -> sweeper", "slack note"):
        assert f"ok   {check}:" in out, (check, out)
    assert "smoke: all checks passed" in out
