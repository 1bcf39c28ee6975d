"""After each integration module that used a stack: `python -m infra audit` of that stack exits 0 (no
call by a function denied, none the model does not grant, none missing from FUNCTION_CALLS)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest


@pytest.fixture(scope="module", autouse=True)
def iam_audit_after_module(request):
    uses_stack = any("stack_env" in getattr(item, "fixturenames", ())
                     for item in request.session.items if item.module is request.module)
    # Set up the stack here (it is needed anyway), so it is still up when this fixture ends.
    env = request.getfixturevalue("stack_env") if uses_stack else None
    yield
    if env is None or "UPCFAN_STACK_LOGS" not in env:
        return
    from infra import cli

    out = io.StringIO()
    code = cli.main(["audit", "--run-dir", str(Path(env["UPCFAN_STACK_LOGS"]).parent / "run")], out=out)
    if code == 1:
        pytest.fail(f"python -m infra audit found IAM problems after {request.module.__name__}:\n{out.getvalue()}")
