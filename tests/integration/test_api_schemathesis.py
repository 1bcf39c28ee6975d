"""Property-based check of the running api function against the OpenAPI document it serves: no 5xx."""

from __future__ import annotations

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

pytestmark = pytest.mark.integration

# Bounded so the whole run stays well under a minute on the local stack (8 operations).
MAX_EXAMPLES = 30


def _api_url(stack_env) -> str:
    env = stack_env if hasattr(stack_env, "get") else {}
    url = env.get("UPCFAN_API_URL") or os.environ.get("UPCFAN_API_URL")
    if not url:
        pytest.fail("stack_env has no UPCFAN_API_URL; is the local stack up (scripts/dev up)?")
    return url.rstrip("/")


def test_api_never_answers_5xx(stack_env):
    """Every operation of the served schema, with bounded generated inputs; any 5xx fails the test."""
    url = _api_url(stack_env)
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json", wait_for_schema=15.0)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 7  # schemathesis leaves out the schema document itself
    failures = []
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
        def check(case):
            case.call_and_validate(base_url=url, checks=[not_a_server_error], timeout=10)

        try:
            check()
        except Exception as exc:  # collect every failing operation, not only the first
            failures.append(f"{operation.method.upper()} {operation.path}: {exc}")
    assert not failures, "\n\n".join(failures)
